"""Blocks that end by themselves: ``accounts.blocked_until``.

A block with a cooldown (the collector's ``cooldown_seconds`` on ``job.finish`` blocked, or the
site's ``block_cooldown_seconds``) sets it; the block-cooldowns sweep returns the account to
ACTIVE once it has passed. NULL on a BLOCKED account: the block stays until an operator acts.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE accounts ADD COLUMN blocked_until timestamptz")
    op.execute(
        "ALTER TABLE accounts ADD CONSTRAINT accounts_blocked_until_only_when_blocked "
        "CHECK (status = 'BLOCKED' OR blocked_until IS NULL)"
    )
    # the sweep's scan: blocks that end by themselves, soonest first
    op.execute(
        "CREATE INDEX accounts_block_ends ON accounts (blocked_until, id) "
        "WHERE status = 'BLOCKED' AND blocked_until IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS accounts_block_ends")
    op.execute(
        "ALTER TABLE accounts DROP CONSTRAINT IF EXISTS accounts_blocked_until_only_when_blocked"
    )
    op.execute("ALTER TABLE accounts DROP COLUMN IF EXISTS blocked_until")
