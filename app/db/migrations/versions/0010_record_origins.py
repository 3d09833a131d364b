"""The record that first claimed a request: its topic, partition, offset and timestamp.

A redelivery of that very record (a worker died after its transaction committed, before its
offset did) is recognised by them and adds no second reply; a client's retry is a new record
and is answered again. The topic and timestamp are needed besides the position: a topic deleted
and made again numbers its offsets from 0 again, and the requests topic of another prefix has
offsets of its own, so a retry read there may take the first record's partition and offset. All
four are null on rows written before (no record is taken for their redelivery, so their repeats
are answered, as before).

Revision ID: 0010
Revises: 0009
"""

from app.db.scripts import execute_script

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE inbox ADD COLUMN record_topic text, ADD COLUMN record_partition integer,
                  ADD COLUMN record_offset bigint, ADD COLUMN record_timestamp bigint;
"""

DOWNGRADE = r"""
ALTER TABLE inbox DROP COLUMN IF EXISTS record_timestamp, DROP COLUMN IF EXISTS record_offset,
                  DROP COLUMN IF EXISTS record_partition, DROP COLUMN IF EXISTS record_topic;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
