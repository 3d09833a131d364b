"""Sealed grants: the requester's public key on its job; no plaintext grant left in the inbox.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # the X25519 public key (base64) the grant's secret and session are sealed to
    op.execute("ALTER TABLE jobs ADD COLUMN public_key text CHECK (length(public_key) = 44)")
    # grants kept before sealing carried the secret and the session in the clear: forget them
    # (a repeat of such a request gets no reply again; its collector has long had one)
    op.execute(
        "UPDATE inbox SET reply = NULL, reply_topic = NULL WHERE reply ->> 'type' = 'job.granted'"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE jobs DROP COLUMN public_key")
