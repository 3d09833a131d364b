"""What a collector passes the SDK, checked against the wire contract before anything is sent:
an argument it does not allow is ``InvalidArgument``, never the validation library's error."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from app.sdk.errors import InvalidArgument


def _problems(exc: ValidationError, *within: str) -> list[str]:
    """Each error as ``argument: what it takes`` (never the value: it may be a secret)."""
    return [
        f"{'.'.join([*within, *(str(part) for part in error['loc'])]) or 'value'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False)
    ]


@contextmanager
def checked(what: str) -> Iterator[None]:
    """Turn a ``ValidationError`` raised inside into ``InvalidArgument`` for ``what`` (the call)."""
    try:
        yield
    except ValidationError as exc:
        raise InvalidArgument(what, _problems(exc)) from None  # its text would carry the values


@cache
def _field(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    annotation = model.model_fields[name].annotation
    assert annotation is not None  # every field of the contract is annotated
    return TypeAdapter(annotation)


def field_value(model: type[BaseModel], name: str, value: object, what: str) -> Any:
    """``value`` checked as field ``name`` of ``model``, constraints and all."""
    try:
        return _field(model, name).validate_python(value)
    except ValidationError as exc:
        raise InvalidArgument(what, _problems(exc, name)) from None
