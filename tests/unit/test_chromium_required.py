"""The browser tests fail, never skip, when Chromium is missing."""

from __future__ import annotations

import pytest

from tests.support.chromium import chromium_path


def test_a_missing_chromium_fails_the_test() -> None:
    with pytest.raises(pytest.fail.Exception, match="make browser"):
        chromium_path("/nonexistent/chromium")


def test_the_installed_chromium_is_found() -> None:
    assert chromium_path().endswith("chromium")
