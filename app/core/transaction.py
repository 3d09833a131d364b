"""The transaction every process applies the core in (``Tx``), and the route of a request's
answer (``Route``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.core.events import Events
from app.crypto import SecretBox
from app.outbox.writer import Outbox
from app.settings import Settings
from app.store import Conn, Row, sites
from schemas.messages import CORRELATION_ID


@dataclass(frozen=True)
class TxServices:
    """What a transaction needs besides its connection: settings and the secret box."""

    settings: Settings
    secrets: SecretBox


@dataclass(frozen=True)
class Route:
    """Where a request's answers go: its reply topic, its correlation id, and the reply
    partition its ``qm.reply_partition`` header asked for (None: the job id's key picks it).
    A ``job.start`` keeps it on its job for the replies that come later."""

    reply_to: str
    correlation_id: str
    reply_partition: int | None = None

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(CORRELATION_ID, self.correlation_id)]


class Tx:
    """One transaction's connection, outbox and event writer.

    ``locked_sites``: the sites this transaction locked first (their settings cannot change while
    it holds them); ``job_sites``: the site of each job it named then; ``operator``: who acted,
    named by every event it writes (an operator's action in the web console)."""

    def __init__(
        self,
        conn: Conn,
        services: TxServices,
        *,
        locked_sites: Mapping[str, Row] | None = None,
        job_sites: Mapping[str, str] | None = None,
        operator: str | None = None,
    ) -> None:
        self.conn = conn
        self.services = services
        self.settings = services.settings
        self.box = Outbox(services.settings.outbox_shards)
        self.events = Events(services.settings, self.box, operator)
        self.locked_sites: dict[str, Row] = dict(locked_sites or {})
        self.job_sites: Mapping[str, str] = job_sites or {}

    async def site(self, slug: str) -> Row | None:
        """The site's row, locked: as the transaction's first statement read it, or locked now.

        Its ``has_accounts`` holds until ``site_changed`` (only a grant refused for an account
        no key opens retires one); ``has_waiting`` is not in it, since it changes as jobs
        queue and are granted."""
        if (site := self.locked_sites.get(slug)) is not None:
            return site
        return await sites.lock_site(self.conn, slug)

    def site_changed(self, slug: str) -> None:
        """The site's row is read again when next asked for: a transition of this transaction
        changed what it says (an account retired), and later requests must see it."""
        self.locked_sites.pop(slug, None)

    async def site_of_job(self, job_id: str) -> Row | None:
        """``site`` of the job's site; None when there is no such job."""
        if (slug := self.job_sites.get(job_id)) is not None:
            return await self.site(slug)
        return await sites.lock_site_of_job(self.conn, job_id)

    def reply(self, job: Row, message: dict[str, Any]) -> None:
        """A reply to the job's own start request (its reply topic, partition and correlation
        id)."""
        self.box.add(
            job["reply_to"],
            job["id"],
            message,
            [(CORRELATION_ID, job["correlation_id"])],
            partition=job["reply_partition"],
        )

    def answer_start(self, job: Row, message: dict[str, Any]) -> None:
        """The final answer to a job's start request, which its inbox row keeps from now on (so
        a redelivered start gets the grant, not the old job.queued)."""
        self.reply(job, message)
        self.box.keep_reply(str(job["request_id"]), job["reply_to"], message)

    async def flush(self) -> None:
        await self.box.flush(self.conn)
