"""The console's sign-in checks as pure logic: scrypt hashes, the users file, the token."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

import app.cli
from app.console.auth import (
    Authenticator,
    Identity,
    Throttle,
    UsersFileError,
    check_password,
    hash_password,
    read_users,
    users_line,
)
from app.settings import Settings


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
    auth = Authenticator(Settings(console_token=SecretStr("tok-1"), console_users_file=str(path)))
    assert auth.configured
    assert auth.by_token("tok-1", "nora") == Identity("nora (token)", "operator")
    assert auth.by_token("tok-2", "nora") is None
    assert auth.by_password("victor", "pw-victor-1") == Identity("victor", "viewer")
    assert auth.by_password("victor", "pw-victor-2") is None
    assert auth.by_password("nobody", "pw-victor-1") is None
    assert auth.by_header("mallory") is None  # no trusted header configured
    assert not Authenticator(Settings()).configured


def test_the_throttle_refuses_an_address_after_its_failures_until_the_window_passes() -> None:
    throttle = Throttle(limit=3, window=60.0, addresses=2)
    for at in (0.0, 1.0, 2.0):
        assert not throttle.refuses("a", at)
        throttle.failed("a", at)
    assert throttle.refuses("a", 3.0) and not throttle.refuses("b", 3.0)
    assert not throttle.refuses("a", 60.5)  # the first failure left the window
    throttle.failed("b", 61.0)
    throttle.failed("c", 61.0)  # a third address: the longest-known one is forgotten
    assert not throttle.refuses("a", 61.0)


def test_a_session_holds_while_its_user_or_token_does(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(users_line("olga", "operator", "pw-olga-123") + "\n")
    settings = Settings(console_token=SecretStr("tok-1"), console_users_file=str(path))
    auth = Authenticator(settings)
    by_password = auth.session(Identity("olga", "operator"), "password")
    by_token = auth.session(Identity("nora (token)", "operator"), "token")
    assert "tok-1" not in str(by_token)
    assert auth.by_session(by_password) == Identity("olga", "operator")
    assert auth.by_session(by_token) == Identity("nora (token)", "operator")
    path.write_text(users_line("olga", "viewer", "pw-olga-123") + "\n")
    assert auth.by_session(by_password) == Identity("olga", "viewer")  # demoted at once
    path.write_text("")
    assert auth.by_session(by_password) is None
    rotated = Authenticator(settings.model_copy(update={"console_token": SecretStr("tok-2")}))
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
