"""What a grant gives a job, opened with the client's private key: its lease secret, account
and session (each sealed to the client's public key, docs/security.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, SecretStr

from app.sdk import errors
from schemas import messages as wire


class Opener(Protocol):
    """What opens the values of a grant: the client whose public key they were sealed to."""

    def open_sealed(self, sealed: str, context: str) -> bytes: ...


class Requester(Opener, Protocol):
    """What a job asks of its client (``QuartermasterClient`` is one): requests and their
    replies, releases, lease watching and the opening of sealed grants."""

    @property
    def public_key(self) -> str: ...

    async def request(
        self, message: wire.AnyRequest, timeout: float | None = None
    ) -> wire.AnyReply: ...

    def release(
        self,
        job_id: str,
        why: str,
        lease_token: int | None = None,
        lease_secret: str | None = None,
    ) -> None: ...

    def watch_lease(
        self, start_request_id: str, job_id: str, on_lost: Callable[[str], None] | None
    ) -> None: ...


class Account(BaseModel):
    """The granted account; ``secret`` is opened but prints as ``**********``."""

    model_config = ConfigDict(frozen=True)

    id: str
    username: str
    secret: SecretStr


class Session(BaseModel):
    """The account's browser session as granted: Playwright ``storage_state``, opened."""

    model_config = ConfigDict(frozen=True)

    version: int
    storage_state: SecretStr  # JSON text; ``state()`` parses it

    def state(self) -> dict[str, Any]:
        """The storage state, for ``browser.new_context(storage_state=...)``."""
        return dict(json.loads(self.storage_state.get_secret_value()))


def open_grant(client: Opener, grant: wire.JobGranted) -> tuple[Account | None, Session | None]:
    """The account and session of a grant, opened with the client's private key."""
    account = session = None
    if grant.account is not None:
        context = wire.seal_context("account.secret", grant.job_id)
        try:
            secret = client.open_sealed(grant.account.secret, context).decode()
        except errors.SecretUndecryptable as exc:
            raise errors.SecretUndecryptable(f"account {grant.account.id}: {exc}") from None
        account = Account(
            id=grant.account.id, username=grant.account.username, secret=SecretStr(secret)
        )
    if grant.session is not None:
        context = wire.seal_context("session.storage_state", grant.job_id)
        state = client.open_sealed(grant.session.storage_state, context).decode()
        session = Session(version=grant.session.version, storage_state=SecretStr(state))
    return account, session


def open_proxy(client: Opener, grant: wire.JobGranted) -> dict[str, str] | None:
    """The grant's proxy as Playwright's ``proxy`` option takes it (``server``, and
    ``username`` and ``password`` when it has credentials), opened with the client's private
    key; None when the account has no proxy."""
    if grant.proxy is None:
        return None
    context = wire.seal_context("proxy.url", grant.job_id)
    try:
        url = urlsplit(client.open_sealed(grant.proxy.url, context).decode())
    except errors.SecretUndecryptable as exc:
        raise errors.SecretUndecryptable(f"proxy {grant.proxy.label}: {exc}") from None
    proxy = {"server": grant.proxy.label}  # scheme://host:port, as Quartermaster labels it
    if url.username is not None:
        proxy["username"] = unquote(url.username)
        proxy["password"] = unquote(url.password or "")
    return proxy


def open_lease_secret(client: Opener, grant: wire.JobGranted) -> SecretStr:
    """The lease's secret of a grant, opened with the client's private key: every follow-up of
    the lease presents it (the token alone, public on the reply topic, acts on nothing)."""
    context = wire.seal_context("lease.secret", grant.job_id)
    try:
        return SecretStr(client.open_sealed(grant.lease_secret, context).decode())
    except errors.SecretUndecryptable as exc:
        raise errors.SecretUndecryptable(f"lease secret of {grant.job_id}: {exc}") from None
