"""The console's sign-in checks as pure logic: scrypt hashes, the users file, the token."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from typer.testing import CliRunner

import app.cli
from app.console.auth import (
    Authenticator,
    Identity,
    SignedOut,
    Throttle,
    UsersFileError,
    check_password,
    hash_password,
    read_users,
    users_line,
)
from app.console.live import SharedSnapshot, StreamSlots
from app.settings import Settings, settings_error

KEY = "k" * 32  # the key that signs the session cookie


def test_a_password_hash_checks_its_password_only_and_never_holds_it() -> None:
    stored = hash_password("correct horse", n=2**10)
    assert stored.startswith("scrypt$1024$8$1$") and "correct horse" not in stored
    assert check_password("correct horse", stored)
    assert not check_password("correct hors", stored)
    assert hash_password("correct horse", n=2**10) != stored  # a fresh salt each time
    assert not check_password("correct horse", "scrypt$not$a$hash$at$all")
    assert not check_password("correct horse", "md5$whatever")


def test_the_users_file_gives_names_roles_and_refuses_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"# who\n\n{users_line('olga', 'operator', 'pw-olga-123')}\n")
    assert read_users(str(path))["olga"][0] == "operator"
    path.write_text("olga:admin:scrypt$1$2$3$4$5\n")
    with pytest.raises(UsersFileError, match="line 1"):
        read_users(str(path))
    with pytest.raises(UsersFileError):
        users_line("bad:name", "viewer", "pw")


def test_the_token_and_passwords_sign_in_and_nothing_else_does(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(users_line("victor", "viewer", "pw-victor-1") + "\n")
    auth = Authenticator(
        Settings(console_token=SecretStr("tok-1"), console_users_file=str(path)), KEY
    )
    assert auth.configured
    assert auth.by_token("tok-1", "nora") == Identity("nora (token)", "operator")
    assert auth.by_token("tok-2", "nora") is None
    assert auth.by_password("victor", "pw-victor-1") == Identity("victor", "viewer")
    assert auth.by_password("victor", "pw-victor-2") is None
    assert auth.by_password("nobody", "pw-victor-1") is None
    assert auth.by_header("mallory") is None  # no trusted header configured
    assert not Authenticator(Settings(), KEY).configured


def test_the_throttle_refuses_an_address_after_its_tries_until_the_window_passes() -> None:
    throttle = Throttle(limit=3, window=60.0, addresses=2)
    for at in (0.0, 1.0, 2.0):  # three tries under way, none finished: the fourth is refused
        assert throttle.attempt("a", at)
    assert not throttle.attempt("a", 3.0) and throttle.attempt("b", 3.0)
    assert throttle.attempt("a", 60.5)  # the first try left the window
    throttle.succeeded("a")  # that one signed in: not held against it
    assert throttle.attempt("a", 60.6)
    assert not throttle.attempt("a", 60.7)
    assert throttle.attempt("c", 61.0)  # a third address: the longest-known one is forgotten
    assert throttle.attempt("a", 61.0)


def test_a_session_holds_while_its_user_or_token_does(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(users_line("olga", "operator", "pw-olga-123") + "\n")
    settings = Settings(console_token=SecretStr("tok-1"), console_users_file=str(path))
    auth = Authenticator(settings, KEY)
    by_password = auth.session(Identity("olga", "operator"), "password")
    by_token = auth.session(Identity("nora (token)", "operator"), "token")
    assert "tok-1" not in str(by_token)
    assert auth.by_session(by_password) == Identity("olga", "operator")
    assert auth.by_session(by_token) == Identity("nora (token)", "operator")
    path.write_text(users_line("olga", "viewer", "pw-olga-123") + "\n")
    assert auth.by_session(by_password) == Identity("olga", "viewer")  # demoted at once
    path.write_text("")
    assert auth.by_session(by_password) is None
    rotated = Authenticator(settings.model_copy(update={"console_token": SecretStr("tok-2")}), KEY)
    assert rotated.by_session(by_token) is None
    assert auth.by_session({"user": "x", "role": "operator"}) is None  # how it signed in: unsaid


def test_qm_console_hash_password_prints_a_users_file_line_and_never_the_password() -> None:
    runner = CliRunner()
    made = runner.invoke(
        app.cli.app,
        ["console", "hash-password", "alice", "--role", "operator", "--password-stdin"],
        input="a long password\n",
    )
    assert made.exit_code == 0, made.output
    [line] = made.stdout.splitlines()
    name, role, stored = line.split(":")
    assert (name, role) == ("alice", "operator") and check_password("a long password", stored)
    assert "a long password" not in made.output
    short = runner.invoke(
        app.cli.app, ["console", "hash-password", "bob", "--password-stdin"], input="short\n"
    )
    assert short.exit_code == 2 and "shorter than 8" in short.stderr


def test_an_unknown_name_costs_one_scrypt_as_a_known_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users"
    path.write_text(users_line("victor", "viewer", "pw-victor-1") + "\n")
    auth = Authenticator(Settings(console_users_file=str(path)), KEY)
    runs: list[int] = []
    scrypt = hashlib.scrypt

    def counted(*args: Any, **kwargs: Any) -> bytes:
        runs.append(1)
        return scrypt(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counted)
    assert auth.by_password("victor", "wrong") is None
    known = len(runs)
    assert auth.by_password("nobody", "wrong") is None
    assert len(runs) - known == known == 1  # timing does not tell which names exist


def test_the_token_session_mark_is_keyed_by_the_session_secret_too() -> None:
    settings = Settings(console_token=SecretStr("tok-1"))
    nora = Identity("nora (token)", "operator")
    one = Authenticator(settings, session_key=KEY).session(nora, "token")
    two = Authenticator(settings, session_key="q" * 32).session(nora, "token")
    assert one["token"] != two["token"]  # the token alone cannot be guessed from a cookie
    assert Authenticator(settings, session_key=KEY).by_session(one) == nora
    assert Authenticator(settings, session_key="q" * 32).by_session(one) is None


@pytest.mark.parametrize("field", ["console_session_secret", "console_trusted_proxy_secret"])
def test_a_console_secret_shorter_than_32_characters_is_refused(field: str) -> None:
    proxied: dict[str, Any] = {
        "console_trusted_header": "X-User",
        "console_trusted_proxy_secret": SecretStr("p" * 32),
    }
    with pytest.raises(ValidationError) as caught:
        Settings(**{**proxied, field: SecretStr("s" * 31)})
    said = str(settings_error(caught.value))
    assert f"QM_{field.upper()}" in said and "32" in said and "s" * 31 not in said
    Settings(**{**proxied, field: SecretStr("s" * 32)})


def test_a_trusted_header_needs_the_proxy_secret() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(console_trusted_header="X-User")
    assert "QM_CONSOLE_TRUSTED_PROXY_SECRET" in str(settings_error(caught.value))


@pytest.mark.parametrize("name", ["eve\nmallory", "eve\u202ellams", "eve\tx", "e" * 65])
def test_a_name_given_with_the_token_must_be_a_valid_name(name: str) -> None:
    auth = Authenticator(Settings(console_token=SecretStr("tok-1")), KEY)
    assert auth.by_token("tok-1", name) is None
    assert auth.by_token("tok-1", "") == Identity("operator (token)", "operator")


def test_the_users_file_refuses_a_name_twice_or_an_unprintable_one(tmp_path: Path) -> None:
    path = tmp_path / "users"
    line = users_line("olga", "viewer", "pw-olga-123")
    path.write_text(f"{line}\n{line.replace('viewer', 'operator', 1)}\n")
    with pytest.raises(UsersFileError, match="line 2 names olga again"):
        read_users(str(path))
    path.write_text(line.replace("olga", "ol\u202ega", 1) + "\n")
    with pytest.raises(UsersFileError, match="line 1"):
        read_users(str(path))


async def test_streams_share_one_snapshot_a_refresh() -> None:
    shared, reads = SharedSnapshot(), []

    async def read() -> Any:
        reads.append(1)
        await asyncio.sleep(0)  # another stream asks while this read is under way
        return len(reads)

    got = await asyncio.gather(*(shared.latest(read, max_age=60) for _ in range(20)))
    assert got == [1] * 20 and len(reads) == 1
    assert await shared.latest(read, max_age=0) == 2  # an older one is read again


def test_stream_slots_bound_a_session_and_all_sessions() -> None:
    slots = StreamSlots(per_session=2, total=3)
    assert slots.take("a") and slots.take("a") and not slots.take("a")
    assert slots.take("b") and not slots.take("c")  # three open in all
    slots.give_back("a")
    assert slots.take("c") and not slots.take("a")


def test_a_signed_out_session_stays_out_while_its_cookie_could_last() -> None:
    ended = SignedOut(lasts=100.0, sessions=2)
    ended.add("s1", 0.0)
    assert ended.holds("s1", 99.0) and not ended.holds("s2", 99.0)
    assert not ended.holds("s1", 100.0)  # its cookie has expired by now anyway
    ended.add("s2", 1.0)
    ended.add("s3", 2.0)  # at most two remembered: the oldest goes
    assert not ended.holds("s1", 2.0) and ended.holds("s2", 2.0) and ended.holds("s3", 2.0)
