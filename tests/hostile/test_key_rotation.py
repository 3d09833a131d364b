"""Secrets at rest sealed under a key about to be dropped from ``QM_SECRET_KEYS``: `qm keys
rotate` re-encrypts them, so once the old key is gone every account is still granted, with its
secret and its session (before, nothing re-encrypted old rows: dropping the key made each such
account unusable)."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from app.crypto import SecretBox
from app.settings import Settings
from app.store import Database, sessions
from tests.support.cli import Qm
from tests.support.leasing import CANARY, make_site, opened_secret, opened_session, replies, start
from workers.requests import RequestProcessor

STATE = {"cookies": [{"name": "sid", "value": "v", "domain": "board.example.com", "path": "/"}],
         "origins": []}  # fmt: skip


async def test_after_rotation_the_old_key_is_dropped_and_every_account_is_still_granted(
    settings: Settings, engine: AsyncEngine, db: Database, qm: Qm, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = SecretBox.from_settings(settings)
    new_key = Fernet.generate_key().decode()
    [account, _] = await make_site(engine, settings, "board", capacity=2, n_accounts=2)
    async with engine.begin() as conn:
        await sessions.save_session(conn, account, old.seal_json(STATE), None)

    monkeypatch.setenv("QM_SECRET_KEYS", f"{new_key},{settings.secret_keys.get_secret_value()}")
    rotated = await qm("keys", "rotate")
    assert rotated.exit_code == 0, rotated.output
    monkeypatch.setenv("QM_SECRET_KEYS", new_key)
    assert (await qm("keys", "check")).exit_code == 0  # every value opens with the new key alone

    dropped = settings.model_copy(update={"secret_keys": SecretStr(new_key)})
    processor = RequestProcessor(dropped, db)
    for job_id in ("job-1", "job-2"):
        await processor.process(start(dropped, job_id))
    grants = {
        reply["job_id"]: reply
        for reply in await replies(engine, dropped)
        if reply["type"] == "job.granted"
    }
    assert sorted(opened_secret(grant) for grant in grants.values()) == [
        f"{CANARY}-0",
        f"{CANARY}-1",
    ]
    [with_session] = [g for g in grants.values() if g["account"]["id"] == str(account)]
    assert opened_session(with_session)["cookies"] == STATE["cookies"]
