"""One saga over three kinds of storage: stock in Redis, a wallet in PostgreSQL and
shipments in MariaDB, each behind the barrier of its own store.

The Redis branch uses the SDK's Redis barrier, whose Lua script checks the barrier keys
and changes the stock in one step, refusing to go below zero. Run:
``python -m examples.mixed_branches``.
"""
