"""Sealed grants: the requester's public key on its job; no plaintext grant left in the inbox;
no job left waiting for a grant that could not be sealed.

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
    # a job waiting for an account from before has no key to seal its grant to: it ends here
    # (its collector, of the old contract, could not open a sealed grant anyway)
    op.execute(
        "UPDATE jobs SET status = 'TIMED_OUT', reason = 'public_key_required',"
        " finished_at = now(), updated_at = now()"
        " WHERE status = 'QUEUED' AND needs_account AND public_key IS NULL"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE jobs DROP COLUMN public_key")
