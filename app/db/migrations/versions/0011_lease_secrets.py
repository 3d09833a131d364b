"""A lease's secret: the SHA-256 of the per-grant secret only its holder was sent (sealed).

Every grant writes a new hash; every follow-up of the lease (heartbeat, finish, cancel of a
running job, session upload, seeds claim, capture submit) must present the secret whose hash
matches, besides the lease token. The secret itself is never stored. Rows written before hold
null: no secret matches it, so a lease granted before this revision ends at its next follow-up
(``job.lease_lost``, ``wrong_secret``) or when it lapses.

Revision ID: 0011
Revises: 0010
"""

from app.db.scripts import execute_script

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE jobs ADD COLUMN lease_secret_hash bytea;
"""

DOWNGRADE = r"""
ALTER TABLE jobs DROP COLUMN IF EXISTS lease_secret_hash;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
