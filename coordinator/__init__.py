"""A Redis-backed distributed transaction coordinator that speaks dtm's HTTP protocol."""

__version__ = "0.1.0"
