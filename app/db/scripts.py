"""Migrations written as SQL scripts: split into statements and run one at a time."""

from __future__ import annotations

from alembic import op


def statements(script: str) -> list[str]:
    """Split a script on statement-ending semicolons (asyncpg prepares one statement at a time)."""
    return [part.strip() for part in script.split(";\n") if part.strip()]


def execute_script(script: str) -> None:
    """Run every statement of ``script`` in the migration's transaction, in order."""
    for statement in statements(script):
        op.execute(statement)
