"""Captures' second stage: who holds a handoff, when its record was last dispatched, the body's
fingerprint (capture_id is an idempotency key), and a site's webhook.

Revision ID: 0003
Revises: 0002
"""

from app.db.scripts import execute_script

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE captures
    -- the handoff worker that holds the claim (with handoff_token and handoff_expires_at)
    ADD COLUMN handoff_holder text,
    -- when the record of the capture's next attempt was written to the outbox; NULL: none is
    -- in flight, so the reaper publishes one once next_attempt_at is due
    ADD COLUMN dispatched_at timestamptz,
    -- sha256 of the submitted body: the same capture_id with another body is a conflict
    ADD COLUMN fingerprint text NOT NULL DEFAULT '',
    ADD COLUMN handed_off_at timestamptz,
    ADD COLUMN failed_at timestamptz,
    ADD CONSTRAINT captures_handing_off_holder
        CHECK (status <> 'HANDING_OFF' OR handoff_holder IS NOT NULL),
    ADD CONSTRAINT captures_handed_off_at CHECK (status <> 'HANDED_OFF' OR handed_off_at IS NOT NULL),
    ADD CONSTRAINT captures_failed_reason
        CHECK (status <> 'FAILED' OR (failed_at IS NOT NULL AND last_error IS NOT NULL));
CREATE INDEX captures_site_status ON captures (site, status);
ALTER TABLE sites ADD COLUMN webhook_url text CHECK (webhook_url ~ '^https?://');
"""

DOWNGRADE = """
ALTER TABLE sites DROP COLUMN IF EXISTS webhook_url;
DROP INDEX IF EXISTS captures_site_status;
ALTER TABLE captures
    DROP CONSTRAINT IF EXISTS captures_failed_reason,
    DROP CONSTRAINT IF EXISTS captures_handed_off_at,
    DROP CONSTRAINT IF EXISTS captures_handing_off_holder,
    DROP COLUMN IF EXISTS failed_at,
    DROP COLUMN IF EXISTS handed_off_at,
    DROP COLUMN IF EXISTS fingerprint,
    DROP COLUMN IF EXISTS dispatched_at,
    DROP COLUMN IF EXISTS handoff_holder;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
