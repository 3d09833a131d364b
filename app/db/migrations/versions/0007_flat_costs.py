"""Costs that stay flat as history grows: indexes for the heartbeat, the site lock and retention,
and statistics that follow the tables' growth.

- ``accounts_holder``: the heartbeat's and release's account step finds the held account by its
  holder; only USING accounts have one, so the index holds one row per running job.
- ``accounts_grantable``: the site lock's "has accounts" check (``min(available_at)`` of a site's
  accounts that are not INACTIVE) is one index probe, however many accounts the site has: no
  other index yields that order, so the alternative is reading them all.
- ``jobs_lease_expiry`` also requires ``granted_at IS NOT NULL`` (true of every RUNNING job, now a
  CHECK), and only the expired-leases sweep names that condition: a statement that finds a RUNNING
  job by id (finish, heartbeat, release, cancel, …) can no longer pick this index and scan every
  running job with a filter on ``id``, as the planner did whenever its statistics had seen few
  running jobs; the primary key is its only index.
- ``jobs_finished`` and ``job_grants_job``: job retention finds finished jobs oldest first and
  deletes their grants; ``captures_job`` checks a job has no captures (and serves the foreign key).
- Autoanalyze after 2% of a hot table changes (the default 10% lets a million-row history go
  unanalyzed for a hundred thousand changes), so plans follow growth without a manual ANALYZE.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

from app.db.scripts import execute_script

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

HOT_TABLES = ("jobs", "job_grants", "inbox", "accounts", "outbox")

UPGRADE = r"""
ALTER TABLE jobs ADD CONSTRAINT jobs_running_granted CHECK (status <> 'RUNNING' OR granted_at IS NOT NULL);
DROP INDEX jobs_lease_expiry;
CREATE INDEX jobs_lease_expiry ON jobs (lease_expires_at)
    WHERE status = 'RUNNING' AND granted_at IS NOT NULL;
CREATE INDEX accounts_holder ON accounts (holder_job_id) WHERE holder_job_id IS NOT NULL;
CREATE INDEX accounts_grantable ON accounts (site, available_at) WHERE status <> 'INACTIVE';
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX job_grants_job ON job_grants (job_id);
CREATE INDEX captures_job ON captures (job_id)
"""

DOWNGRADE = r"""
DROP INDEX IF EXISTS captures_job;
DROP INDEX IF EXISTS job_grants_job;
DROP INDEX IF EXISTS jobs_finished;
DROP INDEX IF EXISTS accounts_grantable;
DROP INDEX IF EXISTS accounts_holder;
DROP INDEX IF EXISTS jobs_lease_expiry;
CREATE INDEX jobs_lease_expiry ON jobs (lease_expires_at) WHERE status = 'RUNNING';
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_running_granted
"""


def upgrade() -> None:
    execute_script(UPGRADE)
    for table in HOT_TABLES:
        op.execute(
            f"ALTER TABLE {table} SET (autovacuum_analyze_scale_factor = 0.02, "
            "autovacuum_vacuum_scale_factor = 0.05)"
        )


def downgrade() -> None:
    for table in HOT_TABLES:
        op.execute(
            f"ALTER TABLE {table} RESET (autovacuum_analyze_scale_factor, "
            "autovacuum_vacuum_scale_factor)"
        )
    execute_script(DOWNGRADE)
