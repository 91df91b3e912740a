"""A database row and its Redis cache entry kept consistent with a two-phase message.

The writer changes a product's price in PostgreSQL and, in the same local transaction,
records the message's barrier row (``Msg.do_and_submit``); the message's action then
deletes the cache entry, and readers refill it from the database. If the writer dies
between its commit and the submit, the coordinator's back-check finds the barrier row
and delivers the message anyway; if it dies before the commit, the back-check fails
the message and nothing is deleted. Run: ``python -m examples.cache_consistency``.
"""
