"""Where the browser tests find Debian's Chromium; a missing one fails them, never skips them."""

from __future__ import annotations

import os
import shutil

import pytest


def chromium_path(configured: str | None = None) -> str:
    """The Chromium binary (``QM_CHROMIUM``, else ``chromium`` on PATH); fails the test if absent."""
    path = configured or os.environ.get("QM_CHROMIUM") or shutil.which("chromium")
    if path is None or not os.access(path, os.X_OK):
        pytest.fail(f"Chromium not found ({path or 'no chromium on PATH'}): run `make browser`")
    return path
