"""A small HTTP client for tests of the processes' endpoints (stdlib, in a thread)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, b""  # nothing listens yet


async def get(url: str) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 while nothing answers on the port."""
    return await asyncio.to_thread(_get, url)


async def get_json(url: str) -> tuple[int, Any]:
    status, body = await get(url)
    return status, json.loads(body) if body else None
