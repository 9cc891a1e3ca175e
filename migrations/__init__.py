"""Alembic migrations of the apmon database (one metadata, one head)."""
