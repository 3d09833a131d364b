"""How a job went, as its body tells it: a block, a rate limit, units used, seed results; and the
exception for a reply that is not the hoped-for one."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from app.sdk import errors
from app.sdk.arguments import field_value
from schemas import messages as wire

MAX_REASON_CHARS = 500


@dataclass
class Outcome:
    """What ``job.finish`` will say, gathered while the body runs."""

    blocked: tuple[str, int | None] | None = None
    # scope, retry_after_seconds, reset_at, reason
    rate_limit: tuple[str | None, int | None, datetime | None, str | None] | None = None
    units: int | None = None  # the running total the lease reports (None: never reported)
    seed_results: dict[str, wire.SeedResult] = field(default_factory=dict)
    proxy_failed: bool = False  # the grant's proxy failed (job.proxy_failed())

    def block(self, reason: str, cooldown_seconds: int | None) -> None:
        cooldown = field_value(wire.JobFinish, "cooldown_seconds", cooldown_seconds, "job.blocked")
        self.blocked = (reason[:MAX_REASON_CHARS], cooldown)

    def limit(
        self,
        scope: str | None,
        retry_after: float | None,
        reset_at: datetime | None,
        reason: str | None,
    ) -> None:
        what = "job.rate_limited"
        if (retry_after is None) == (reset_at is None):
            raise errors.InvalidArgument(what, ["give one of retry_after and reset_at"])
        seconds = None if retry_after is None else max(math.ceil(retry_after), 0)
        self.rate_limit = (
            field_value(wire.JobFinish, "scope", scope, what),
            field_value(wire.JobFinish, "retry_after_seconds", seconds, what),
            field_value(wire.JobFinish, "reset_at", reset_at, what),
            None if reason is None else reason[:MAX_REASON_CHARS],
        )

    def add_units(self, n: int) -> int:
        total = (self.units or 0) + n
        self.units = field_value(wire.JobHeartbeat, "units", total, "job.units")
        return total

    def finish_fields(self, exc: BaseException | None) -> dict[str, Any]:
        """The fields of ``job.finish`` that say how it went: a rate limit first, then a block,
        then the body's exception (``failed`` with its class name), else ``succeeded``."""
        fields: dict[str, Any] = {"outcome": "succeeded", "units": self.units}
        if self.rate_limit is not None:
            scope, seconds, reset_at, reason = self.rate_limit
            fields.update(
                outcome=wire.RATE_LIMITED, scope=scope, retry_after_seconds=seconds,
                reset_at=reset_at, reason=reason,
            )  # fmt: skip
        elif self.blocked is not None:
            fields.update(outcome="blocked", reason=self.blocked[0])
            fields.update(cooldown_seconds=self.blocked[1])
        elif exc is not None:
            fields.update(outcome="failed", reason=type(exc).__name__[:MAX_REASON_CHARS])
        fields["seed_results"] = list(self.seed_results.values()) or None
        fields["proxy_failed"] = self.proxy_failed
        return fields


def refusal(job_id: str, reply: wire.AnyReply) -> errors.QuartermasterError:
    """The exception for a reply that is not the hoped-for one."""
    if isinstance(reply, wire.JobRejected):
        return errors.JobRejected(job_id, reply.reason)
    if isinstance(reply, wire.RequestInvalid):
        return errors.RequestInvalid(job_id, reply.error)
    if isinstance(reply, wire.RequestConflict):
        return errors.RequestConflict(job_id, str(reply.request_id))
    if isinstance(reply, wire.SessionRejected):
        return errors.SessionRejected(job_id, reply.detail)
    if isinstance(reply, wire.JobLeaseLost):
        return errors.UnexpectedReply(job_id, f"{reply.type} ({reply.reason})", "a live lease")
    return errors.UnexpectedReply(job_id, reply.type, "a grant or a refusal")
