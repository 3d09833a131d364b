"""Seeds and domain rewrites: failure counters, the disabled reason, the hand-out history, and
which rewrite changed how many handed-out URLs.

Revision ID: 0002
Revises: 0001
"""

from app.db.scripts import execute_script

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = r"""
-- a rule may move a host's subdomains along with it (m.old.example -> m.new.example)
ALTER TABLE domain_rewrites ADD COLUMN subdomains boolean NOT NULL DEFAULT false;
ALTER TABLE domain_rewrites ADD CONSTRAINT domain_rewrites_hosts_lower
    CHECK (from_host = lower(from_host) AND to_host = lower(to_host));

-- How many handed-out URLs each rule changed. Insert-only, so hand-outs of many jobs never
-- queue on one counter row; `qm domains list` sums it.
CREATE TABLE domain_rewrite_uses (
    rewrite_id bigint NOT NULL REFERENCES domain_rewrites (id) ON DELETE CASCADE,
    urls       integer NOT NULL CHECK (urls > 0),
    used_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX domain_rewrite_uses_rule ON domain_rewrite_uses (rewrite_id);

-- failures in a row (a success resets it), the last one's reason, and why a seed is DISABLED
ALTER TABLE seeds ADD COLUMN failure_count integer NOT NULL DEFAULT 0 CHECK (failure_count >= 0);
ALTER TABLE seeds ADD COLUMN last_error text;
ALTER TABLE seeds ADD COLUMN disabled_reason text;
ALTER TABLE seeds ADD COLUMN last_done_at timestamptz;
ALTER TABLE seeds ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE seeds ADD CONSTRAINT seeds_disabled_has_reason
    CHECK (status <> 'DISABLED' OR disabled_reason IS NOT NULL);

-- Every hand-out of a seed: which lease held it and when it came back. Operators read who
-- crawled a seed; the exclusivity tests read that no two holds of a seed overlap. The times are
-- clock_timestamp(), so a hold that begins after another ended (and committed) starts later.
CREATE TABLE seed_assignments (
    seed_id     bigint NOT NULL REFERENCES seeds (id) ON DELETE CASCADE,
    lease_token bigint NOT NULL,
    job_id      text NOT NULL,
    assigned_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at    timestamptz,
    end_reason  text,
    PRIMARY KEY (seed_id, lease_token)
);
CREATE INDEX seed_assignments_open ON seed_assignments (lease_token) WHERE ended_at IS NULL;
"""

DOWNGRADE = """
DROP TABLE IF EXISTS seed_assignments, domain_rewrite_uses;
ALTER TABLE seeds DROP CONSTRAINT IF EXISTS seeds_disabled_has_reason;
ALTER TABLE seeds DROP COLUMN IF EXISTS failure_count, DROP COLUMN IF EXISTS last_error,
    DROP COLUMN IF EXISTS disabled_reason, DROP COLUMN IF EXISTS last_done_at,
    DROP COLUMN IF EXISTS updated_at;
ALTER TABLE domain_rewrites DROP CONSTRAINT IF EXISTS domain_rewrites_hosts_lower;
ALTER TABLE domain_rewrites DROP COLUMN IF EXISTS subdomains;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
