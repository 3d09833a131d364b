"""What every message of the contract is: a ``type`` and a schema version ``v``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Message(BaseModel):
    """Every message: a ``type`` and a schema version ``v``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
