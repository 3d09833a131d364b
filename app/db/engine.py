"""The async SQLAlchemy engine: one per process, built from settings."""

from __future__ import annotations

import ssl
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.settings import Settings


def make_engine(
    settings: Settings, *, pool_size: int | None = None, pre_ping: bool = True, **kwargs: Any
) -> AsyncEngine:
    """An asyncpg engine; TLS when ``QM_DATABASE_SSL`` is set.

    ``hide_parameters``: a database error's text never carries the statement's bound values
    (sealed secrets, sealed sessions, reasons), so no log line or dead letter can echo them.

    ``pre_ping=False`` skips the test query on each checkout; for callers that retry a failed
    transaction anyway (the claim worker), where it would be one more round trip per request.
    """
    return create_async_engine(
        settings.database_url,
        pool_size=pool_size or settings.database_pool_size,
        max_overflow=5,
        pool_pre_ping=pre_ping,
        hide_parameters=True,
        connect_args=connect_args(settings),
        **kwargs,
    )


def connect_args(settings: Settings) -> dict[str, Any]:
    """asyncpg's connection options: with ``QM_DATABASE_SSL``, TLS that verifies the server's
    certificate (against ``QM_DATABASE_SSL_CAFILE``, else the system's CAs) and host name."""
    if not settings.database_ssl:
        return {}
    return {"ssl": ssl.create_default_context(cafile=settings.database_ssl_cafile)}
