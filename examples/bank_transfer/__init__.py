"""Bank transfers between MariaDB and PostgreSQL as SAGA, TCC and XA.

The sending bank keeps its accounts in MariaDB, the receiving bank in PostgreSQL; every
SAGA and TCC branch runs behind the sub-transaction barrier of its own database. XA
needs prepared transactions, which this PostgreSQL does not allow by default
(``max_prepared_transactions = 0``) and for which the SDK has a MariaDB/MySQL helper
only, so the XA transfer credits a second copy of the receiving bank kept in another
MariaDB database. Run: ``python -m examples.bank_transfer``.
"""
