"""Costs that stay flat as history grows: indexes for the heartbeat, the site lock and retention,
and statistics that follow the tables' growth.

- ``accounts_holder``: the heartbeat's and release's account step finds the held account by its
  holder; only USING accounts have one, so the index holds one row per running job.
- ``accounts_grantable``: the site lock's "has accounts" check (``min(id)`` of a site's accounts
  that are not INACTIVE) is one index probe, however many accounts the site has.
- ``jobs_finished`` and ``job_grants_job``: job retention finds finished jobs oldest first and
  deletes their grants; ``captures_job`` checks a job has no captures (and serves the foreign key).
- Autoanalyze after 2% of a hot table changes (the default 10% lets a million-row history go
  unanalyzed for a hundred thousand changes), so plans follow growth without a manual ANALYZE.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

HOT_TABLES = ("jobs", "job_grants", "inbox", "accounts", "outbox")

UPGRADE = r"""
CREATE INDEX accounts_holder ON accounts (holder_job_id) WHERE holder_job_id IS NOT NULL;
CREATE INDEX accounts_grantable ON accounts (site, id) WHERE status <> 'INACTIVE';
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX job_grants_job ON job_grants (job_id);
CREATE INDEX captures_job ON captures (job_id)
"""

DOWNGRADE = r"""
DROP INDEX IF EXISTS captures_job;
DROP INDEX IF EXISTS job_grants_job;
DROP INDEX IF EXISTS jobs_finished;
DROP INDEX IF EXISTS accounts_grantable;
DROP INDEX IF EXISTS accounts_holder
"""


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";\n") if part.strip()]


def upgrade() -> None:
    for statement in _statements(UPGRADE):
        op.execute(statement)
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
    for statement in _statements(DOWNGRADE):
        op.execute(statement)
