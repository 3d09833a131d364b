"""Dead letters that lose nothing: null payloads, values kept by reference, refused outbox rows.

- ``outbox.payload`` may be null: a record whose value was null is dead-lettered with a null value.
- ``outbox.attempts`` counts the relay's failed tries of a row the broker refused; after
  ``outbox_max_attempts`` the row is dead-lettered (``parked_at`` when even that is refused), so it
  never holds back the rows behind it.
- ``dlt_values`` keeps a value too large to travel in its dead letter; the dead letter carries its
  id and SHA-256 digest.

Revision ID: 0005
Revises: 0004
"""

from app.db.scripts import execute_script

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL;
ALTER TABLE outbox ADD COLUMN attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0);
ALTER TABLE outbox ADD COLUMN parked_at timestamptz;

CREATE TABLE dlt_values (
    id         uuid PRIMARY KEY,
    sha256     text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    value      bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""

DOWNGRADE = r"""
DROP TABLE IF EXISTS dlt_values;
ALTER TABLE outbox DROP COLUMN IF EXISTS parked_at;
ALTER TABLE outbox DROP COLUMN IF EXISTS attempts;
DELETE FROM outbox WHERE payload IS NULL;
ALTER TABLE outbox ALTER COLUMN payload SET NOT NULL;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
