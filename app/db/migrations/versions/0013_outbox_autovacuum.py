"""The outbox is vacuumed after a few thousand deleted rows, not after a share of the table.

Every row the relay publishes is deleted, so the outbox holds few live rows and many dead ones
between two vacuums. A scale factor (0007's 5 %) of a table that is nearly empty when analyzed
means a vacuum after a few dozen deletes or, once statistics saw a burst, after tens of
thousands; a fixed threshold of 2,000 dead rows makes the next autovacuum visit take them, and
no cost delay lets it finish in one pass (the table is small: its live rows are a backlog). How
often autovacuum visits the database at all is the server's ``autovacuum_naptime`` (a minute by
default; docs/performance.md, "The relay's read past deleted rows"). Neither autovacuum nor the
relay's own vacuum truncates the table (or its TOAST table): truncating takes an ACCESS EXCLUSIVE
lock, which every business transaction writing the outbox would queue behind.

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0, "
        "autovacuum_vacuum_threshold = 2000, autovacuum_vacuum_cost_delay = 0, "
        "vacuum_truncate = false, toast.vacuum_truncate = false)"
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE outbox RESET (autovacuum_vacuum_threshold, autovacuum_vacuum_cost_delay, "
        "vacuum_truncate, toast.vacuum_truncate)"
    )
    op.execute("ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.05)")
