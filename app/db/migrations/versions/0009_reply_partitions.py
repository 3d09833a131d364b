"""Reply routing: the partition of its reply topic a job's start request asked for, and the
partition an outbox row is sent to (NULL in both: keyed by job id, Kafka's partitioner picks).

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # every later reply of the job to its start's reply topic goes to this partition
    op.execute("ALTER TABLE jobs ADD COLUMN reply_partition integer CHECK (reply_partition >= 0)")
    op.execute("ALTER TABLE outbox ADD COLUMN partition integer CHECK (partition >= 0)")


def downgrade() -> None:
    op.execute("ALTER TABLE outbox DROP COLUMN partition")
    op.execute("ALTER TABLE jobs DROP COLUMN reply_partition")
