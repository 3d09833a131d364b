"""Sealed webhooks: a site's webhook URL (whose path or query may hold a token) is kept sealed
with ``QM_SECRET_KEYS``; beside it, only its scheme and host, for operators to see.

URLs set before are sealed here, with the keys the migrating process is given.

Revision ID: 0008
Revises: 0007
"""

from alembic import op
from sqlalchemy import text

from app.crypto import SecretBox
from app.settings import Settings
from app.urls import webhook_shown

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE sites RENAME COLUMN webhook_url TO webhook_shown")
    op.execute("ALTER TABLE sites ADD COLUMN webhook_sealed bytea")
    bind = op.get_bind()
    rows = bind.execute(
        text("SELECT slug, webhook_shown FROM sites WHERE webhook_shown IS NOT NULL")
    ).all()
    if rows:
        box = SecretBox.from_settings(Settings())
        for slug, url in rows:
            bind.execute(
                text(
                    "UPDATE sites SET webhook_shown = :shown, webhook_sealed = :sealed"
                    " WHERE slug = :slug"
                ),
                {"slug": slug, "shown": webhook_shown(url), "sealed": box.seal(url)},
            )
    op.execute(
        "ALTER TABLE sites ADD CONSTRAINT sites_webhook_sealed"
        " CHECK ((webhook_shown IS NULL) = (webhook_sealed IS NULL))"
    )


def downgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        text("SELECT slug, webhook_sealed FROM sites WHERE webhook_sealed IS NOT NULL")
    ).all()
    box = SecretBox.from_settings(Settings()) if rows else None
    for slug, sealed in rows:
        assert box is not None
        bind.execute(
            text("UPDATE sites SET webhook_shown = :url WHERE slug = :slug"),
            {"slug": slug, "url": box.open(bytes(sealed))},
        )
    op.execute("ALTER TABLE sites DROP CONSTRAINT sites_webhook_sealed")
    op.execute("ALTER TABLE sites DROP COLUMN webhook_sealed")
    op.execute("ALTER TABLE sites RENAME COLUMN webhook_shown TO webhook_url")
