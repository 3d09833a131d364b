"""`qm keys rotate|check` against the real database: secrets sealed under an old key re-encrypted
under the new one and still opened; a value under a dropped key listed and skipped; a second
run writes nothing; a value changed meanwhile is never overwritten."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import Result
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.commands.rotation import rotate_column
from app.crypto import SecretBox
from app.settings import Settings
from app.store import Database, accounts, captures, sessions
from app.store.sealed_columns import SEALED_COLUMNS, SealedColumn, SealedValue
from tests.support.cli import Qm, assert_one_red_line, qm_fixture  # noqa: F401 - the fixture
from tests.support.leasing import CANARY, make_site
from tests.support.proxies import PROXY_PASSWORD, make_proxies, proxy_url

WEBHOOK = "https://hooks.example.com/deliver?token=hook-canary"
STATE = {"cookies": [{"name": "sid", "value": "cookie-canary"}], "origins": []}


def _lines(result: Result, exit_code: int = 0) -> list[dict[str, Any]]:
    assert result.exit_code == exit_code, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


async def _sealed(engine: AsyncEngine) -> dict[str, bytes]:
    """Every sealed value by column and row."""
    found: dict[str, bytes] = {}
    async with engine.connect() as conn:
        for column in SEALED_COLUMNS:
            result = await conn.execute(
                text(f"SELECT {column.key}, {column.column} FROM {column.table}")
            )
            for key, value in result:
                if value is not None:
                    found[f"{column.name}:{key}"] = bytes(value)
    return found


async def _world(engine: AsyncEngine, settings: Settings, dropped: SecretBox) -> list[int]:
    """Two accounts, a session, a webhook and a proxy under the test's key; one account under
    ``dropped``."""
    old = SecretBox.from_settings(settings)
    ids = await make_site(engine, settings, "board", n_accounts=2)
    async with engine.begin() as conn:
        lost = await accounts.add_account(
            conn, site="board", username="lost@board", sealed_secret=dropped.seal(CANARY)
        )
        assert lost is not None
        assert await sessions.save_session(conn, ids[0], old.seal_json(STATE), None) == 1
        assert await captures.set_site_webhook(conn, "board", "https://hooks.example.com",
                                               old.seal(WEBHOOK))  # fmt: skip
    await make_proxies(engine, settings)  # a proxy's URL, with its password
    return [*ids, int(lost["id"])]


async def test_rotate_re_encrypts_under_the_new_key_and_check_lists_what_no_key_opens(
    settings: Settings, engine: AsyncEngine, qm: Qm, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_key = settings.secret_keys.get_secret_value()
    new_key = Fernet.generate_key().decode()
    dropped = SecretBox(Fernet.generate_key().decode())
    first, second, lost = await _world(engine, settings, dropped)
    monkeypatch.setenv("QM_SECRET_KEYS", f"{new_key},{old_key}")  # the new key first
    before = await _sealed(engine)

    checked = await qm("keys", "check", "--json")
    assert _lines(checked, exit_code=1) == [
        {"table": "accounts", "column": "secret", "id": lost, "site": "board",
         "username": "lost@board"}
    ]  # fmt: skip
    shown = await qm("keys", "check")
    assert shown.exit_code == 1 and "lost@board" in shown.stdout
    assert (
        "6 sealed values: 0 under the first key, 5 under an older key (`qm keys rotate`), 1 no"
        in shown.stdout
    )

    rotated = {
        r["column"]: r for r in _lines(await qm("keys", "rotate", "--batch-size", "1", "--json"))
    }
    assert rotated["accounts.secret"] == {
        "column": "accounts.secret", "rows": 3, "rotated": 2, "already_newest": 0,
        "no_key_opens": 1, "changed_meanwhile": 0, "left": 0,
    }  # fmt: skip
    assert (
        rotated["sessions.storage_state"]["rotated"],
        rotated["sites.webhook_sealed"]["rotated"],
        rotated["proxies.url_sealed"]["rotated"],
    ) == (1, 1, 1)

    after = await _sealed(engine)
    new_only = SecretBox(new_key)
    assert new_only.open(after[f"accounts.secret:{first}"]) == f"{CANARY}-0"
    assert new_only.open(after[f"accounts.secret:{second}"]) == f"{CANARY}-1"
    assert new_only.open_json(after[f"sessions.storage_state:{first}"]) == STATE
    assert new_only.open(after["sites.webhook_sealed:board"]) == WEBHOOK
    assert new_only.open(after["proxies.url_sealed:1"]) == proxy_url(1)
    assert after[f"accounts.secret:{lost}"] == before[f"accounts.secret:{lost}"]  # skipped
    async with engine.connect() as conn:  # the session's content is the same: its version too
        version = await conn.scalar(text("SELECT version FROM sessions"))
    assert version == 1

    again = _lines(await qm("keys", "rotate", "--json"))
    assert [(r["rotated"], r["already_newest"]) for r in again] == [(0, 2), (0, 1), (0, 1), (0, 1)]
    assert await _sealed(engine) == after  # a second run writes nothing

    table = await qm("keys", "rotate")
    assert table.exit_code == 0 and "qm keys check" in table.stdout
    for result in (checked, shown, table):
        assert CANARY not in result.output and "canary" not in result.output
        assert PROXY_PASSWORD not in result.output
    # once the old key is dropped, only the value under the key dropped before stays unopened
    monkeypatch.setenv("QM_SECRET_KEYS", new_key)
    assert [line["id"] for line in _lines(await qm("keys", "check", "--json"), 1)] == [lost]


async def test_a_value_changed_meanwhile_is_read_again_never_overwritten(
    settings: Settings, engine: AsyncEngine
) -> None:
    old = SecretBox.from_settings(settings)
    new_key = Fernet.generate_key().decode()
    box = SecretBox(f"{new_key},{settings.secret_keys.get_secret_value()}")
    [account] = await make_site(engine, settings, "board")
    async with engine.begin() as conn:
        await sessions.save_session(conn, account, old.seal_json(STATE), None)
    merged = {**STATE, "origins": [{"origin": "https://board.example.com", "localStorage": []}]}
    writes: list[int | str] = []

    async def merge_meanwhile(column: SealedColumn, value: SealedValue) -> None:
        writes.append(value.id)
        if len(writes) == 1:  # a worker merges the session, sealed by one still on the old key
            async with engine.begin() as conn:
                assert await sessions.save_session(conn, account, old.seal_json(merged), 1) == 2

    [column] = [c for c in SEALED_COLUMNS if c.table == "sessions"]
    db = Database(engine)
    report = await rotate_column(db, box, column, before_write=merge_meanwhile)

    assert (report.rows, report.changed, report.rotated, report.left) == (1, 1, 1, 0)
    assert writes == [account, account]  # read again, then rotated
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT storage_state, version FROM sessions"))).one()
    assert SecretBox(new_key).open_json(bytes(row[0])) == merged  # the merge stands, rotated
    assert row[1] == 2


async def test_a_rotation_cut_short_is_finished_by_running_it_again(
    settings: Settings, engine: AsyncEngine
) -> None:
    new_key = Fernet.generate_key().decode()
    box = SecretBox(f"{new_key},{settings.secret_keys.get_secret_value()}")
    ids = await make_site(engine, settings, "board", n_accounts=5)
    [column] = [c for c in SEALED_COLUMNS if c.name == "accounts.secret"]
    db = Database(engine)
    writes = 0

    async def cut_short(column: SealedColumn, value: SealedValue) -> None:
        nonlocal writes
        writes += 1
        if writes == 3:  # the run dies in its third batch (its transaction rolls back)
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        await rotate_column(db, box, column, batch_size=1, before_write=cut_short)

    report = await rotate_column(db, box, column, batch_size=2)
    assert (report.rows, report.current, report.rotated) == (5, 2, 3)
    sealed = await _sealed(engine)
    assert [SecretBox(new_key).open(sealed[f"accounts.secret:{id_}"]) for id_ in ids] == [
        f"{CANARY}-{n}" for n in range(5)
    ]


@pytest.mark.parametrize("keys", ["", "not-a-fernet-key"])
async def test_keys_that_cannot_be_used_are_one_line(
    keys: str, qm: Qm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QM_SECRET_KEYS", keys)
    for command in ("rotate", "check"):
        assert_one_red_line(await qm("keys", command), "QM_SECRET_KEYS")
