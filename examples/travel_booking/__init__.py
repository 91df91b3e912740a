"""A trip booked with TCC across three services: flight, hotel and car rental.

Each service has its own PostgreSQL tables. A try holds one unit (a seat, a room, a
car); confirm makes the hold a booking, cancel releases it. Either all three are
confirmed, or every hold is cancelled. Run: ``python -m examples.travel_booking``.
"""
