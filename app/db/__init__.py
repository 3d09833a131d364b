"""Database access: the async engine and the Alembic migrations."""
