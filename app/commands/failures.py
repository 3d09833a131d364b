"""How `qm` answers what goes wrong: one line saying what and how to fix it, exit code 2.

Mistakes in the command line (a bad option value, a missing argument) name the option and point
at ``--help``. A database or broker that cannot be reached is said to be one only when it is
one, naming where it was looked for. No message carries SQL, a password or a traceback; an
error that is none of these is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer bundles its click
from typer.core import TyperGroup

# every `qm` command loads this module: what only a failure needs (the database's, the broker's
# and the settings' libraries) is imported when one is explained (docs/performance.md, "The CLI")
if TYPE_CHECKING:
    from sqlalchemy.exc import DBAPIError

DEV_ENV_HINT = (
    "to use a running `make dev`, load its settings first: set -a; . ./.qm-dev.env; set +a"
)
# SQLSTATE classes of a database that is there but will not serve: connection exceptions,
# failed logins, missing database, too many connections, shutting down
_UNREACHABLE_SQLSTATES = ("08", "28", "3D", "53", "57P")
_NOT_MIGRATED_SQLSTATES = ("42P01", "42703", "42704", "42883")


def _unset(*names: str) -> bool:
    return not any(os.environ.get(name) for name in names)


def database_target() -> str:
    """Where the database is looked for, without the password."""
    from sqlalchemy.engine import make_url

    from app.settings import get_settings

    url = make_url(get_settings().database_url)
    host = url.host or url.query.get("host") or "localhost"
    return f"{host}:{url.port or 5432}/{url.database or ''}"


def database_unreachable(detail: str) -> str:
    message = f"the database at {database_target()} cannot be reached ({detail})"
    if _unset("QM_DATABASE_URL", "DATABASE_URL"):
        message += f"; QM_DATABASE_URL is not set: {DEV_ENV_HINT}"
    return message


def broker_unreachable(detail: str) -> str:
    import asyncio

    from app.kafka import client_options  # the probe speaks as the failed client did
    from app.sdk.connection_check import refusal
    from app.settings import get_settings

    settings = get_settings()
    servers = settings.kafka_bootstrap_servers
    reason = asyncio.run(refusal(servers, client_options(settings)))
    if reason:
        return f"the Kafka broker cannot be used: {reason} ({_kafka_variables(reason)})"
    message = f"the Kafka broker at {servers} cannot be reached ({detail})"
    if _unset("QM_KAFKA_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS"):
        message += f"; QM_KAFKA_BOOTSTRAP_SERVERS is not set: {DEV_ENV_HINT}"
    return message


def _kafka_variables(reason: str) -> str:
    """The settings that decide what ``reason`` names."""
    if "credentials" in reason:
        return "QM_KAFKA_SASL_USERNAME, QM_KAFKA_SASL_PASSWORD"
    if "certificate" in reason or "TLS" in reason:
        return "QM_KAFKA_SSL_CAFILE, QM_KAFKA_SECURITY_PROTOCOL"
    if "PLAINTEXT" in reason:
        return "QM_KAFKA_SECURITY_PROTOCOL"
    return "QM_KAFKA_BOOTSTRAP_SERVERS"


def _database_message(exc: DBAPIError) -> str:
    """The server's own message (first line), never the statement SQLAlchemy appends."""
    orig = exc.orig
    cause = getattr(orig, "__cause__", None) or orig
    text = str(getattr(cause, "message", None) or cause or type(exc).__name__)
    return text.splitlines()[0] if text else type(exc).__name__


def _raised_in(exc: BaseException, package: str) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return any(f"{os.sep}{package}{os.sep}" in frame.filename for frame in frames)


def explain(exc: BaseException) -> str | None:
    """The one line for ``exc``, or None for an error no operator can fix (a bug)."""
    from app.installs import OURS, SERVER

    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] not in OURS:
        # the client install (`pip install quartermaster`) with typer at hand: no server libraries
        return f"qm runs Quartermaster's server: pip install '{SERVER}' (missing: {exc.name})"
    import ssl

    from aiokafka.errors import (
        ClusterAuthorizationFailedError,
        GroupAuthorizationFailedError,
        KafkaError,
        TopicAuthorizationFailedError,
    )
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from app.crypto import MissingKey
    from app.devstack import ServiceUnavailable
    from app.errors import _sqlstate as sqlstate_of
    from app.settings import SettingsError, get_settings
    from app.transport import BrokerRefused

    if isinstance(exc, BrokerRefused):
        return f"{exc} ({_kafka_variables(str(exc))})"
    if isinstance(exc, ServiceUnavailable | MissingKey | SettingsError):
        return str(exc)
    if isinstance(exc, ArgumentError):
        return (
            "QM_DATABASE_URL is not a database URL: give one like "
            "postgresql://user:password@host:5432/database"
        )
    refused = (
        TopicAuthorizationFailedError,
        GroupAuthorizationFailedError,
        ClusterAuthorizationFailedError,
    )
    if isinstance(exc, refused):
        user = get_settings().kafka_sasl_username or "ANONYMOUS"
        return (
            f"the Kafka broker refused user {user!r}: {str(exc) or type(exc).__name__}; "
            "its ACLs must allow what `qm topics --acls` prints (QM_TOPIC_PREFIX and the "
            "consumer groups must match them)"
        )
    if isinstance(exc, KafkaError):
        return broker_unreachable(type(exc).__name__)
    if isinstance(exc, ssl.SSLError) and not (
        _raised_in(exc, "asyncpg") or _raised_in(exc, "sqlalchemy")
    ):
        return broker_unreachable(type(exc).__name__)
    if isinstance(exc, DBAPIError):
        code = sqlstate_of(exc)
        lost = exc.connection_invalidated or isinstance(exc.orig, OSError)
        if lost or (code and code.startswith(_UNREACHABLE_SQLSTATES)):
            return database_unreachable(_database_message(exc))
        if code and code.startswith(_NOT_MIGRATED_SQLSTATES):
            return (
                f"the database at {database_target()} is not migrated to this version "
                f"({_database_message(exc)}): run `qm migrate`"
            )
        return f"the database refused the change: {_database_message(exc)}"
    if isinstance(exc, OSError):
        detail = exc.strerror or type(exc).__name__
        if _raised_in(exc, "asyncpg") or _raised_in(exc, "sqlalchemy"):
            if isinstance(exc, ssl.SSLError):
                detail += "; check QM_DATABASE_SSL_CAFILE"
            return database_unreachable(detail)
        if _raised_in(exc, "aiokafka"):
            return broker_unreachable(detail)
        return f"{detail}: {exc.filename}" if exc.filename else f"{type(exc).__name__}: {detail}"
    return None


def usage_line(exc: typer.TyperException) -> str:
    """A command-line mistake as one line, with the command whose help explains it."""
    message = " ".join(exc.format_message().split())
    if isinstance(exc, UsageError) and exc.ctx is not None:
        message += f" (see `{exc.ctx.command_path} --help`)"
    return message


def quiet_kafka_client() -> None:
    """Silence the Kafka client's log of every failed connection attempt: a command says it once."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def say(line: str) -> None:
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True).print(Text(line, style="red"), soft_wrap=True)


class OneLineErrors(TyperGroup):
    """The root command: runs non-standalone and turns every failure into ``explain``'s line."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        run = super().main
        if not standalone_mode:
            return run(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = run(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:  # a command group named alone: its help
            exc.show()
            sys.exit(exc.exit_code)
        except typer.TyperException as exc:
            say(usage_line(exc))
            sys.exit(exc.exit_code)
        except typer.Abort:
            say("aborted")
            sys.exit(1)
        except Exception as exc:
            line = explain(exc)
            if line is None:
                raise
            say(line)
            sys.exit(2)
        sys.exit(code if isinstance(code, int) else 0)
