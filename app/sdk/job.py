"""One collector job: acquire an account (and session, seeds), heartbeat, release with an outcome.

async with client.job(site="example", lease_seconds=300, wait_seconds=60) as job:
    await login(job.account.username, job.account.secret.get_secret_value())
    ...
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr, TypeAdapter

from app.sdk import errors
from app.sdk.arguments import checked
from app.sdk.grants import Account, Requester, Session, open_grant, open_lease_secret, open_proxy
from app.sdk.ids import new_id, new_uuid
from app.sdk.logs import sdk_logger
from app.sdk.outcome import MAX_REASON_CHARS, Outcome, refusal
from app.sealing import load_public_key, seal_json
from schemas import messages as wire

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from playwright.async_api import Browser, BrowserContext

log = sdk_logger(__name__)

MIN_HEARTBEAT_SECONDS = 0.1
_SESSION_STATE = TypeAdapter(wire.JsonObject)


class Job:
    """An async context manager: enter acquires, the body works, exit releases with an outcome.

    Entering raises ``JobRejected`` when Quartermaster refuses and ``RequestTimeout`` (a
    ``TimeoutError``) when no answer came in ``wait_seconds + timeout``. Exiting sends
    ``job.finish``: ``succeeded``; ``failed`` with the exception's class name when the body raised;
    ``blocked`` after ``job.blocked(reason)``; ``rate_limited`` after ``job.rate_limited(…)``, with
    the ``job.units`` counted. Create it with ``QuartermasterClient.job``.
    """

    def __init__(
        self,
        client: Requester,
        *,
        site: str,
        lease_seconds: int | None,
        wait_seconds: int,
        needs_account: bool,
        seeds: int,
        collector: str,
        job_id: str,
        timeout: float,
        scope: str | None = None,
    ) -> None:
        self._client = client
        self.job_id = job_id
        self.site = site
        self.collector = collector
        self.lease_seconds = lease_seconds
        self.wait_seconds = wait_seconds
        self.timeout = timeout
        with checked("client.job"):  # a bad argument is refused here, before anything is sent
            self._start = wire.JobStart(
                request_id=new_uuid(),
                job_id=job_id,
                site=site,
                collector=collector,
                needs=wire.Needs(account=needs_account, seeds=seeds),
                lease_seconds=lease_seconds,
                wait_seconds=wait_seconds,
                public_key=client.public_key,
                scope=scope,
            )
        self._grant: wire.JobGranted | None = None
        self._lease_secret = SecretStr("")  # opened from the grant at enter
        self._expires_at: datetime | None = None
        self.account: Account | None = None
        # the account's proxy, for Playwright (``browser.new_context(proxy=job.proxy)``)
        self.proxy: dict[str, str] | None = None
        self._session: Session | None = None
        self.lost = False
        self.lost_reason: str | None = None
        self.status: str | None = None  # the job's final status once job.finished came back
        self._outcome = Outcome()  # how it went: sent with job.finish
        self._session_state: str | None = None  # sealed to Quartermaster
        self._seeds: list[wire.GrantedSeed] = []
        self._heartbeats: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        account = self.account.id if self.account is not None else None
        token = self._grant.lease_token if self._grant is not None else None
        return (
            f"Job(job_id={self.job_id!r}, site={self.site!r}, lease_token={token}, "
            f"lease_expires_at={self._expires_at}, account_id={account!r}, lost={self.lost})"
        )

    # --- what the grant gave -------------------------------------------------------------

    def _granted(self) -> wire.JobGranted:
        if self._grant is None:
            raise RuntimeError("the job is not acquired yet: use `async with client.job(...)`")
        return self._grant

    @property
    def lease_token(self) -> int:
        """The fencing token every follow-up request presents."""
        return self._granted().lease_token

    def _lease(self) -> dict[str, Any]:
        """The fields every follow-up of the lease presents: its token and its secret."""
        return {
            "lease_token": self.lease_token,
            "lease_secret": self._lease_secret.get_secret_value(),
        }

    @property
    def lease_expires_at(self) -> datetime:
        """When the lease lapses unless extended (updated by every ``job.extended``)."""
        self._granted()
        assert self._expires_at is not None
        return self._expires_at

    @property
    def session(self) -> Session | None:
        """The account's browser session (Playwright ``storage_state``) and its version."""
        self._granted()
        return self._session

    @property
    def seeds(self) -> list[wire.GrantedSeed]:
        """The seeds this lease holds: those of the grant and of every ``claim_seeds``, URLs
        already rewritten. Each goes back at finish: by its ``seed_done`` result, or due again
        at once when it has none."""
        self._granted()
        return list(self._seeds)

    # --- what the body tells ---------------------------------------------------------------

    @property
    def scope(self) -> str | None:
        """What the job does on the site (``search``, ``profile``), as ``client.job`` named it."""
        return self._start.scope

    def blocked(self, reason: str, cooldown_seconds: int | None = None) -> None:
        """Mark the outcome ``blocked``: the site blocked this account (it rests, or an operator looks)."""
        self._outcome.block(reason, cooldown_seconds)

    def rate_limited(
        self,
        retry_after: float | None = None,
        *,
        reset_at: datetime | None = None,
        scope: str | None = None,
        reason: str | None = None,
    ) -> None:
        """Mark the outcome ``rate_limited``: the site limits this account for ``scope`` (the
        job's own by default) for ``retry_after`` seconds, or until ``reset_at``. The account
        rests for that scope only; the job ends FAILED (docs/policy.md, "Scopes")."""
        self._outcome.limit(scope, retry_after, reset_at, reason)

    def units(self, n: int = 1) -> int:
        """Count ``n`` more units (pages, API calls) against the account's budget; returns the
        lease's total, sent with the next heartbeat and the finish."""
        return self._outcome.add_units(n)

    def proxy_failed(self) -> None:
        """Report at finish that the proxy failed (not the account): it rests, and is blocked
        and its accounts moved if it keeps failing."""
        self._outcome.proxy_failed = True

    def set_session_state(self, state: dict[str, Any]) -> None:
        """The browser state (Playwright ``storage_state``) to merge back at finish; sealed to
        Quartermaster at once (``NoUploadKey`` when it announced no key to seal to)."""
        with checked("job.set_session_state"):
            state = _SESSION_STATE.validate_python(state)
        self._session_state = self._seal_session(state, "job.finish")

    def browser_context(
        self, browser: Browser, **options: Any
    ) -> AbstractAsyncContextManager[BrowserContext]:
        """A Playwright context that starts from the account's session and hands its state back
        on the way out; ``options`` as ``app.sdk.browser.browser_context`` takes them."""
        from app.sdk.browser import browser_context

        options.setdefault("check_url", self._granted().session_check_url)
        if self.proxy is not None:  # the account's own address, every time
            options.setdefault("proxy", self.proxy)
        return browser_context(self, browser, **options)

    def seed_done(
        self,
        seed_id: str,
        *,
        ok: bool,
        next_due_seconds: int | None = None,
        reason: str | None = None,
    ) -> None:
        """Record how one seed went; the results are sent with ``job.finish`` (the last one of a
        seed counts). ``next_due_seconds`` overrides when the seed is due again (its interval
        after a success, a backoff after a failure); ``reason`` says why it failed."""
        with checked("job.seed_done"):
            self._outcome.seed_results[seed_id] = wire.SeedResult(
                seed_id=seed_id,
                ok=ok,
                next_due_seconds=next_due_seconds,
                reason=None if reason is None else reason[:MAX_REASON_CHARS],
            )

    def report_seed(self, seed_id: str, ok: bool, next_due_seconds: int | None = None) -> None:
        """Same as ``seed_done``."""
        self.seed_done(seed_id, ok=ok, next_due_seconds=next_due_seconds)

    async def claim_seeds(self, n: int) -> list[wire.GrantedSeed]:
        """Up to ``n`` more due seeds of the job's site for this lease (an empty list when none
        is due). Raises ``LeaseLost`` when the lease is gone."""
        with checked("job.claim_seeds"):
            claim = wire.SeedsClaim(
                request_id=new_uuid(), job_id=self.job_id, limit=n, **self._lease()
            )
        reply = await self._client.request(claim, timeout=self.timeout)
        if isinstance(reply, wire.JobLeaseLost):
            self._lose(reply.reason)
            raise errors.LeaseLost(self.job_id, reply.reason)
        if not isinstance(reply, wire.SeedsClaimed):
            raise refusal(self.job_id, reply)
        self._seeds.extend(reply.seeds)
        log.info("seeds_claimed", job_id=self.job_id, asked=n, seeds=len(reply.seeds))
        return list(reply.seeds)

    async def submit_capture(
        self,
        *,
        url: str,
        storage_uri: str,
        sha256: str,
        content_type: str,
        size: int,
        captured_at: datetime | None = None,
        meta: dict[str, Any] | None = None,
        capture_id: str | None = None,
    ) -> str:
        """Hand a capture over for delivery downstream; returns its id once accepted.

        ``capture_id`` is the idempotency key: submitting the same capture again is accepted
        again, the same id with another body raises ``RequestConflict``. Raises ``LeaseLost``
        when the job's lease is gone.
        """
        with checked("job.submit_capture"):
            submit = wire.CaptureSubmit(
                request_id=new_uuid(),
                job_id=self.job_id,
                **self._lease(),
                capture_id=capture_id or new_id(),
                url=url,
                storage_uri=storage_uri,
                sha256=sha256,
                content_type=content_type,
                size=size,
                captured_at=captured_at or datetime.now(UTC),
                meta=meta,
            )
        reply = await self._client.request(submit, timeout=self.timeout)
        if isinstance(reply, wire.CaptureAccepted):
            return reply.capture_id
        if isinstance(reply, wire.JobLeaseLost):
            self._lose(reply.reason)
            raise errors.LeaseLost(self.job_id, reply.reason)
        raise refusal(self.job_id, reply)

    # --- acquire -------------------------------------------------------------------------

    async def __aenter__(self) -> Job:
        if self._grant is not None:
            raise RuntimeError("a job is entered once; ask the client for a new one")
        start = self._start
        reply = await self._client.request(start, timeout=self.timeout)
        if not isinstance(reply, wire.JobGranted):
            raise refusal(self.job_id, reply)
        # without its lease secret nothing can end the lease: it lapses by itself
        self._lease_secret = open_lease_secret(self._client, reply)
        try:
            self.account, self._session = open_grant(self._client, reply)
            self.proxy = open_proxy(self._client, reply)
        except errors.SecretUndecryptable:
            self._client.release(
                self.job_id,
                "secret_undecryptable",
                reply.lease_token,
                self._lease_secret.get_secret_value(),
            )
            raise
        self._grant = reply
        self._expires_at = reply.lease_expires_at
        self._seeds = list(reply.seeds)
        log.info(
            "job_granted",
            job_id=self.job_id,
            site=self.site,
            lease_token=reply.lease_token,
            account_id=self.account.id if self.account else None,
            seeds=len(reply.seeds),
        )
        # the lease may be taken back before this job ends (expiry, an operator's revoke): the
        # start request's later job.lease_lost says so at once
        self._start_request_id = str(start.request_id)
        self._client.watch_lease(self._start_request_id, self.job_id, self._lose)
        self._heartbeats = asyncio.create_task(
            self._heartbeat_loop(self._heartbeat_interval()), name=f"qm-sdk-heartbeat-{self.job_id}"
        )
        return self

    # --- session uploads ------------------------------------------------------------------

    def _seal_session(self, state: dict[str, Any], field: str) -> str:
        """``state`` sealed to Quartermaster's ``upload_key`` for ``field`` of this job."""
        upload_key = self._granted().upload_key
        if upload_key is None:
            raise errors.NoUploadKey(
                f"job {self.job_id}: Quartermaster announced no upload_key; "
                "it cannot take session states"
            )
        context = wire.seal_context(field, self.job_id)
        return seal_json(load_public_key(upload_key), state, context)

    async def upload_session(self, state: dict[str, Any]) -> int:
        """Merge a browser state (Playwright ``storage_state``) into the account's session now,
        sealed to Quartermaster; returns the session's new version."""
        with checked("job.upload_session"):
            state = _SESSION_STATE.validate_python(state)
        upload = wire.SessionUpload(
            request_id=new_uuid(),
            job_id=self.job_id,
            **self._lease(),
            storage_state=self._seal_session(state, "session.upload"),
        )
        reply = await self._client.request(upload, timeout=self.timeout)
        if isinstance(reply, wire.SessionMerged):
            return reply.version
        if isinstance(reply, wire.JobLeaseLost):
            self._lose(reply.reason)
        raise refusal(self.job_id, reply)

    # --- heartbeats ----------------------------------------------------------------------

    def _heartbeat_interval(self) -> float:
        """A third of the lease as granted (both times from Quartermaster's clock, so no clock
        skew), which may be longer than asked: short leases are raised to a safe minimum."""
        grant = self._granted()
        granted = (grant.lease_expires_at - grant.granted_at).total_seconds()
        return max(granted / 3, MIN_HEARTBEAT_SECONDS)

    async def _heartbeat_loop(self, interval: float) -> None:
        """Extend the lease every ``interval`` until it is lost or the job ends."""
        while not self.lost:
            await asyncio.sleep(interval)
            heartbeat = wire.JobHeartbeat(
                request_id=new_uuid(),
                job_id=self.job_id,
                **self._lease(),
                extend_seconds=self.lease_seconds,
                units=self._outcome.units,
            )
            try:
                reply = await self._client.request(heartbeat, timeout=max(interval * 1.5, 0.5))
            except errors.ClientClosed:
                log.warning("heartbeat_stopped_client_closed", job_id=self.job_id)
                return
            except errors.QuartermasterError as exc:
                log.warning(
                    "heartbeat_unanswered", job_id=self.job_id, error_class=type(exc).__name__
                )
                continue
            if isinstance(reply, wire.JobExtended):
                self._expires_at = reply.lease_expires_at
                log.debug(
                    "lease_extended",
                    job_id=self.job_id,
                    lease_expires_at=str(reply.lease_expires_at),
                )
            elif isinstance(reply, wire.JobLeaseLost):
                self._lose(reply.reason)
            else:
                log.warning("heartbeat_refused", job_id=self.job_id, reply_type=reply.type)

    async def heartbeat(self, extend_seconds: int | None = None) -> datetime:
        """Extend the lease now (the job heartbeats by itself; this is one more, at a moment of
        the caller's choosing); returns the new expiry. Raises ``LeaseLost`` when it is gone."""
        with checked("job.heartbeat"):
            heartbeat = wire.JobHeartbeat(
                request_id=new_uuid(),
                job_id=self.job_id,
                **self._lease(),
                extend_seconds=extend_seconds or self.lease_seconds,
                units=self._outcome.units,
            )
        reply = await self._client.request(heartbeat, timeout=self.timeout)
        if isinstance(reply, wire.JobExtended):
            self._expires_at = reply.lease_expires_at
            return reply.lease_expires_at
        if isinstance(reply, wire.JobLeaseLost):
            self._lose(reply.reason)
            raise errors.LeaseLost(self.job_id, reply.reason)
        raise refusal(self.job_id, reply)

    def _lose(self, reason: str) -> None:
        self.lost = True
        self.lost_reason = reason
        log.warning("lease_lost", job_id=self.job_id, lease_token=self.lease_token, reason=reason)

    async def _stop_heartbeats(self) -> None:
        task, self._heartbeats = self._heartbeats, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # --- release -------------------------------------------------------------------------

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop_heartbeats()
        if self._grant is None:
            return
        self._client.watch_lease(self._start_request_id, self.job_id, None)
        if self.lost:
            log.info("job_finish_skipped", job_id=self.job_id, reason=self.lost_reason)
            return
        finish = self._finish_message(exc)
        try:
            reply = await self._client.request(finish, timeout=self.timeout)
            if isinstance(reply, wire.JobLeaseLost):
                self._lose(reply.reason)
            elif isinstance(reply, wire.JobFinished):
                self.status = reply.status
                log.info(
                    "job_finished", job_id=self.job_id, outcome=finish.outcome, status=reply.status
                )
            else:
                raise refusal(self.job_id, reply)
        except errors.QuartermasterError as error:
            log.warning(
                "job_finish_unconfirmed",
                job_id=self.job_id,
                outcome=finish.outcome,
                error_class=type(error).__name__,
            )
            if exc is None:
                raise  # the body's own exception, if any, matters more
        return None

    def _finish_message(self, exc: BaseException | None) -> wire.JobFinish:
        return wire.JobFinish.model_validate(
            {
                "request_id": new_uuid(),
                "job_id": self.job_id,
                **self._lease(),
                **self._outcome.finish_fields(exc),
                "session_state": self._session_state,
            }
        )
