"""An order service (PostgreSQL) and a stock service (MariaDB) kept consistent by a saga.

The saga creates the order, then deducts the stock of each order line; when a line is
out of stock, the deductions already made are restored and the order is cancelled.
Run: ``python -m examples.order_stock``.
"""
