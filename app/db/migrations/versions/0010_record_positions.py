"""The record that first claimed a request: its partition and offset on the requests topic.

A redelivery of that very record (a worker died after its transaction committed, before its
offset did) is recognised by them and adds no second reply; a client's retry is a new record
and is answered again. Both are null on rows written before (those are answered again, as
before).

Revision ID: 0010
Revises: 0009
"""

from app.db.scripts import execute_script

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE inbox ADD COLUMN record_partition integer, ADD COLUMN record_offset bigint;
"""

DOWNGRADE = r"""
ALTER TABLE inbox DROP COLUMN IF EXISTS record_offset, DROP COLUMN IF EXISTS record_partition;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
