"""Hostile producers and hostile collectors, against the real broker and database: what each
sends, and that nothing it sends wedges a worker, a sweep or another collector's lease."""

from __future__ import annotations

from tests.integration.conftest import db, processor
from tests.support.cli import qm_fixture

__all__ = ["db", "processor", "qm_fixture"]
