"""The console's sign-in checks as pure logic: scrypt hashes, the users file, the token."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from app.console.auth import (
    Authenticator,
    Identity,
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
