"""The flash-sale example: a buyer endpoint, stock in Redis, orders created by messages."""
