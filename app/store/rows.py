"""The one row type of the store: a row read by column name, whichever way its statement ran
(through SQLAlchemy, a ``RowMapping``, or as a prepared statement, a dict)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Row = Mapping[Any, Any]
