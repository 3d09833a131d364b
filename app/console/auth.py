"""Who may see the console and who may act: an operator token, users with scrypt-hashed
passwords from a file, or a trusted header an authenticating proxy sets; roles viewer and
operator.

The users file has one user a line, ``name:role:hash`` (``#`` starts a comment), where the hash
is ``scrypt$n$r$p$salt$key`` with salt and key in URL-safe base64 (``hash_password`` makes one;
`qm console hash-password NAME` prints the whole line). It is read at every sign-in, so a line
added or removed takes effect without a restart.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from app.settings import Settings

ROLES = ("viewer", "operator")
# scrypt's cost: 2**15 x 8 x 1 takes 32 MiB and some 50 ms a check (OWASP's minimum is 2**17 x 8
# x 1 at 128 MiB; a console signs in rarely, so a file may raise it: the hash names its cost)
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_MAXMEM = 256 * 1024 * 1024
NAME_CHARS = 64


class UsersFileError(ValueError):
    """A users file line that cannot be read; the message names the line, never its hash."""


@dataclass(frozen=True)
class Identity:
    """Who is signed in: the name events record and the role that says what they may do."""

    name: str
    role: str

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$key`` of ``password`` with a fresh random salt."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` is the one ``stored`` (a ``hash_password`` text) was made from."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(key)
        found = hashlib.scrypt(
            password.encode(),
            salt=_unb64(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=SCRYPT_MAXMEM,
            dklen=len(expected),
        )
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(found, expected)


def users_line(name: str, role: str, password: str) -> str:
    """One line of the users file."""
    if not valid_name(name) or ":" in name:
        raise UsersFileError("a user name is 1 to 64 printable characters without ':'")
    if role not in ROLES:
        raise UsersFileError(f"a role is one of {', '.join(ROLES)}")
    return f"{name}:{role}:{hash_password(password)}"


def read_users(path: str) -> dict[str, tuple[str, str]]:
    """The users file: name -> (role, hash). A bad line is an error naming its number."""
    users: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        role, _, stored = rest.partition(":")
        if not name or role not in ROLES or not stored.startswith("scrypt$"):
            raise UsersFileError(f"{path} line {number} is not name:role:scrypt$...")
        users[name] = (role, stored)
    return users


def valid_name(name: str) -> bool:
    return 1 <= len(name) <= NAME_CHARS and name.isprintable() and name == name.strip()


@dataclass(frozen=True)
class Authenticator:
    """Checks the credentials a sign-in gives, and the trusted header, against the settings."""

    settings: Settings

    @property
    def configured(self) -> bool:
        """Whether any way to sign in is configured (without one, no page is served)."""
        s = self.settings
        return bool(s.console_token or s.console_users_file or s.console_trusted_header)

    def by_token(self, token: str, name: str) -> Identity | None:
        """The operator token: the operator role, under the name they give (said as such)."""
        configured = self.settings.console_token
        if configured is None or not configured.get_secret_value():
            return None
        if not hmac.compare_digest(token.encode(), configured.get_secret_value().encode()):
            return None
        name = name.strip() or "operator"
        return Identity(f"{name[:NAME_CHARS]} (token)", "operator")

    def by_password(self, name: str, password: str) -> Identity | None:
        """A user of the users file with their password."""
        path = self.settings.console_users_file
        if path is None:
            return None
        found = read_users(path).get(name)
        if found is None:
            # the same work for an unknown name, so timing does not tell which names exist
            check_password(password, hash_password("-", n=SCRYPT_N))
            return None
        role, stored = found
        return Identity(name, role) if check_password(password, stored) else None

    def session(self, found: Identity, via: str) -> dict[str, str]:
        """What a signed-in session keeps: who, their role, how they signed in, and for the token
        a fingerprint of it (an HMAC keyed by the token: it tells nothing of the token)."""
        kept = {"user": found.name, "role": found.role, "via": via}
        if via == "token":
            kept["token"] = self._token_mark()
        return kept

    def by_session(self, session: Mapping[str, object]) -> Identity | None:
        """The user a session names, if it still holds: a user still in the users file (with
        the role it says now), a token that is still the configured one."""
        name, role, via = session.get("user"), session.get("role"), session.get("via")
        if not isinstance(name, str) or role not in ROLES:
            return None
        if via == "token":
            mark = session.get("token")
            if not isinstance(mark, str) or not hmac.compare_digest(mark, self._token_mark()):
                return None
            return Identity(name, str(role))
        if via == "password" and self.settings.console_users_file:
            try:
                found = read_users(self.settings.console_users_file).get(name)
            except (UsersFileError, OSError):
                return None
            return None if found is None else Identity(name, found[0])
        return None

    def _token_mark(self) -> str:
        token = self.settings.console_token
        if token is None or not token.get_secret_value():
            return ""
        key = token.get_secret_value().encode()
        return hmac.new(key, b"qm-console-session", hashlib.sha256).hexdigest()[:32]

    def by_header(self, value: str | None) -> Identity | None:
        """The user an authenticating proxy named, when the trusted header is configured."""
        if self.settings.console_trusted_header is None or value is None:
            return None
        value = value.strip()
        if not valid_name(value):
            return None
        role: str = self.settings.console_trusted_role
        if self.settings.console_users_file:
            try:
                role = read_users(self.settings.console_users_file).get(value, (role, ""))[0]
            except (UsersFileError, OSError):
                return None  # a role cannot be read: nobody is let in on a guess
        return Identity(value, role)


class Throttle:
    """At most ``limit`` failed sign-ins a ``window`` from one address (then 429 until the window
    passes), remembering at most ``addresses`` addresses."""

    def __init__(self, limit: int = 10, window: float = 60.0, addresses: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.addresses = addresses
        self._failures: dict[str, deque[float]] = {}

    def refuses(self, address: str, now: float) -> bool:
        failures = self._failures.get(address)
        if failures is None:
            return False
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return len(failures) >= self.limit

    def failed(self, address: str, now: float) -> None:
        if address not in self._failures and len(self._failures) >= self.addresses:
            self._failures.pop(next(iter(self._failures)))  # the longest-known address goes
        self._failures.setdefault(address, deque(maxlen=self.limit)).append(now)
