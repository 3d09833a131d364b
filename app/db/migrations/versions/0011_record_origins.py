"""The topic and timestamp of the record that first claimed a request, beside its position.

A topic deleted and made again numbers its offsets from 0 again, and the requests topic of another
prefix has offsets of its own: a client's retry read there may take the partition and offset of
the first record. Only the very record, read again, has the same topic, partition, offset and
timestamp; a retry is answered. Null on rows written before (compared as they are: such a row is
taken for a redelivery by no record, so its repeats are answered, as before 0010).

Revision ID: 0011
Revises: 0010
"""

from app.db.scripts import execute_script

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE inbox ADD COLUMN record_topic text, ADD COLUMN record_timestamp bigint;
"""

DOWNGRADE = r"""
ALTER TABLE inbox DROP COLUMN IF EXISTS record_timestamp, DROP COLUMN IF EXISTS record_topic;
"""


def upgrade() -> None:
    execute_script(UPGRADE)


def downgrade() -> None:
    execute_script(DOWNGRADE)
