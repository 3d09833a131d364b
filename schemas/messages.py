"""The Kafka contract (v1): every request, reply and event as a strict pydantic model.

Field names are the wire contract that collectors in any language code against. Times are RFC 3339
UTC strings, ids are strings, ``request_id`` is a UUID. Unknown fields in a request are rejected.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    model_validator,
)

from schemas.base import Message as Message
from schemas.events import CaptureHandoff as CaptureHandoff
from schemas.events import CaptureReady as CaptureReady
from schemas.events import LifecycleEvent as LifecycleEvent
from schemas.events import TerminalJobEvent as TerminalJobEvent
from schemas.headers import CORRELATION_ID as CORRELATION_ID
from schemas.headers import MAX_REPLY_PARTITION as MAX_REPLY_PARTITION
from schemas.headers import REPLY_PARTITION as REPLY_PARTITION
from schemas.headers import REPLY_TO as REPLY_TO
from schemas.headers import parse_reply_partition as parse_reply_partition
from schemas.headers import reply_partition_value as reply_partition_value
from schemas.nesting import MAX_NESTING, NestingTooDeep, nesting_depth
from schemas.values import (
    BIGINT_MAX,
    BigInt,
    HttpUrl,
    JsonObject,
    SeedId,
    UtcTime,
    holds_nul,
    usable_public_key,
)

VERSION = 1

JobId = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@/-]+$")
]
SiteSlug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Reason = Annotated[str, StringConstraints(max_length=500)]
# bounded to the columns that keep them: a value past one is bad input, refused here
LeaseToken = Annotated[int, Field(ge=1, le=BIGINT_MAX)]
# A lease's secret (docs/security.md): URL-safe base64 text, as job.granted carries it sealed
LeaseSecret = Annotated[
    str,
    StringConstraints(min_length=22, max_length=128, pattern=r"^[A-Za-z0-9_-]+$"),
    Field(
        description="The lease's secret: job.granted's lease_secret opened with the requester's "
        "private key (context lease.secret). Only the holder of the lease has it."
    ),
]
Seconds = Annotated[int, Field(ge=1, le=7 * 24 * 3600)]
# What a job does on a site, e.g. ``search`` or ``profile`` (docs/policy.md, "Scopes"): a rate
# limit reported for a scope rests the account for that scope only
Scope = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$"),
    Field(description="What the job does on the site (an endpoint), e.g. search or profile."),
]
# Units a lease used (pages, API calls), counted against its account's budget: a running total
Units = Annotated[
    int,
    Field(
        ge=0,
        le=1_000_000_000,
        description="The units (pages, API calls) this lease used so far, a running total: it "
        "counts against the account's budget in place of the grant's 1 when larger.",
    ),
]
RATE_LIMITED = "rate_limited"


# An X25519 public key: standard base64 (RFC 4648, padded) of its 32 raw bytes, one X25519 can
# use (a point of small order, such as 32 zero bytes, is refused in any encoding).
PublicKey = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$"),
    AfterValidator(usable_public_key),
    Field(description="X25519 public key, standard base64 of 32 bytes (docs/security.md)."),
]
# A sealed box (docs/security.md): standard base64 of version 1 | ephemeral key | nonce | AES-GCM.
Sealed = Annotated[
    str,
    StringConstraints(min_length=88, max_length=1_400_000, pattern=r"^[A-Za-z0-9+/]+={0,2}$"),
    Field(
        description="A sealed box (docs/security.md): standard base64 of version byte 0x01, "
        "the sender's ephemeral X25519 public key (32 bytes), a 12-byte nonce and the "
        "AES-256-GCM ciphertext with its 16-byte tag. Key: HKDF-SHA256 over the X25519 shared "
        "secret, salt = ephemeral public key || recipient public key, info = "
        "'quartermaster sealed box v1', 32 bytes. Associated data: 'qm.v1:<field>:<job_id>'."
    ),
]


def seal_context(field: str, job_id: str) -> str:
    """The associated data a sealed field is bound to: ``qm.v1:<field>:<job_id>``. Fields:
    ``lease.secret``, ``account.secret``, ``session.storage_state`` and ``proxy.url`` of
    ``job.granted`` (to the requester); ``session.upload``, ``job.finish`` (to Quartermaster)."""
    return f"qm.v1:{field}:{job_id}"


class Request(Message):
    """A collector's request: ``request_id`` is its idempotency key, ``job_id`` its Kafka key."""

    request_id: UUID
    job_id: JobId

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        """No text of a request, nested keys and values included, holds a NUL character: the
        database stores none, so such a request is bad input, refused here with a reason."""
        if holds_nul(data):
            raise ValueError("text must not contain the NUL character (U+0000)")
        return data


# --- requests --------------------------------------------------------------------------------


class Needs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    account: bool = True
    seeds: Annotated[int, Field(ge=0, le=100)] = 0


class JobStart(Request):
    type: Literal["job.start"] = "job.start"
    site: SiteSlug
    collector: Name
    needs: Needs = Needs()
    lease_seconds: Seconds | None = None
    wait_seconds: Annotated[int, Field(ge=0, le=7 * 24 * 3600)] = 0
    public_key: PublicKey = Field(
        description="The requester's X25519 public key; the grant's lease secret, account "
        "secret and session are sealed to it. A start of an EXPIRED job must come with the "
        "same key and collector as the job's first start.",
    )
    scope: Scope | None = None


class JobHeartbeat(Request):
    type: Literal["job.heartbeat"] = "job.heartbeat"
    lease_token: LeaseToken
    lease_secret: LeaseSecret
    extend_seconds: Seconds | None = None
    units: Units | None = None


class SeedResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed_id: SeedId  # the id the grant or claim gave: ASCII digits of a bigint
    ok: bool
    next_due_seconds: Annotated[int, Field(ge=0, le=365 * 24 * 3600)] | None = None
    reason: Reason | None = None  # why it failed: kept on the seed, and when it disables it


class JobFinish(Request):
    type: Literal["job.finish"] = "job.finish"
    lease_token: LeaseToken
    lease_secret: LeaseSecret
    outcome: Literal["succeeded", "failed", "blocked", "rate_limited"]
    reason: Reason | None = None
    cooldown_seconds: Annotated[int, Field(ge=0, le=30 * 24 * 3600)] | None = None
    # Playwright storage_state, sealed to Quartermaster's upload_key (context job.finish)
    session_state: Sealed | None = None
    seed_results: Annotated[list[SeedResult], Field(max_length=1000)] | None = None
    units: Units | None = None
    # a rate limit (outcome rate_limited): the scope it is for (the job's own when absent) and
    # when it resets, in seconds from now or as a time (docs/policy.md, "Scopes")
    scope: Scope | None = None
    retry_after_seconds: Annotated[int, Field(ge=0, le=30 * 24 * 3600)] | None = None
    reset_at: UtcTime | None = None

    @model_validator(mode="after")
    def _rate_limit_fields(self) -> JobFinish:
        """A rate limit says when it resets (one way); other outcomes name no scope or reset."""
        fields = ("scope", "retry_after_seconds", "reset_at")
        given = [name for name in fields if getattr(self, name) is not None]
        if self.outcome != RATE_LIMITED:
            if given:
                raise ValueError(f"{', '.join(given)}: only with outcome rate_limited")
        elif (self.retry_after_seconds is None) == (self.reset_at is None):
            raise ValueError("rate_limited needs one of retry_after_seconds and reset_at")
        return self

    proxy_failed: bool = False  # the grant's proxy failed: it rests (and blocks if it keeps on)


class JobCancel(Request):
    type: Literal["job.cancel"] = "job.cancel"
    public_key: PublicKey | None = Field(
        None,
        description="Required while the job waits (QUEUED): the public key its job.start named, "
        "so only its requester cancels it.",
    )
    lease_token: LeaseToken | None = Field(
        None, description="Required once the job is RUNNING: only the holder ends its lease."
    )
    lease_secret: LeaseSecret | None = Field(
        None, description="Required with lease_token: only the holder ends its lease."
    )


class SessionUpload(Request):
    type: Literal["session.upload"] = "session.upload"
    lease_token: LeaseToken
    lease_secret: LeaseSecret
    # Playwright storage_state, sealed to Quartermaster's upload_key (context session.upload)
    storage_state: Sealed
    proxy_failed: bool = False  # as job.finish's: the proxy of the grant failed


class SeedsClaim(Request):
    type: Literal["seeds.claim"] = "seeds.claim"
    lease_token: LeaseToken
    lease_secret: LeaseSecret
    limit: Annotated[int, Field(ge=1, le=100)]


class CaptureSubmit(Request):
    type: Literal["capture.submit"] = "capture.submit"
    lease_token: LeaseToken
    lease_secret: LeaseSecret
    capture_id: JobId
    url: HttpUrl
    storage_uri: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    content_type: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    size: BigInt
    captured_at: UtcTime
    meta: JsonObject | None = None


AnyRequest = Annotated[
    JobStart | JobHeartbeat | JobFinish | JobCancel | SessionUpload | SeedsClaim | CaptureSubmit,
    Field(discriminator="type"),
]
REQUEST_ADAPTER: TypeAdapter[AnyRequest] = TypeAdapter(AnyRequest)
REQUEST_TYPES = frozenset(
    m.model_fields["type"].default
    for m in (
        JobStart,
        JobHeartbeat,
        JobFinish,
        JobCancel,
        SessionUpload,
        SeedsClaim,
        CaptureSubmit,
    )
)


def parse_request(raw: bytes) -> AnyRequest:
    """Validate raw JSON bytes as a request (raises pydantic.ValidationError, or
    ``NestingTooDeep`` before parsing a document nested deeper than ``MAX_NESTING``)."""
    if nesting_depth(raw) > MAX_NESTING:
        raise NestingTooDeep(f"JSON nested deeper than {MAX_NESTING} levels")
    return REQUEST_ADAPTER.validate_json(raw)


# --- replies ---------------------------------------------------------------------------------


class Reply(Message):
    request_id: UUID
    job_id: str


class GrantedAccount(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    username: str
    # the account secret, sealed to the requester's public_key (context account.secret)
    secret: Sealed


class GrantedSession(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int
    # Playwright storage_state as JSON, sealed to the requester's public_key
    # (context session.storage_state)
    storage_state: Sealed


class GrantedProxy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str  # scheme://host:port
    url: Sealed  # with its credentials, sealed to the requester's public_key (context proxy.url)


class GrantedSeed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    url: str


class JobGranted(Reply):
    type: Literal["job.granted"] = "job.granted"
    lease_token: int = Field(
        description="The lease's fencing number: public, it only ever grows (downstream stores "
        "may refuse writes with an older one). It alone does not act on the lease."
    )
    lease_secret: Sealed = Field(
        description="The lease's secret, sealed to the requester's public_key (context "
        "lease.secret): every follow-up of the lease presents it opened, as lease_secret."
    )
    granted_at: datetime
    lease_expires_at: datetime
    upload_key: str | None = Field(
        None, description="Quartermaster's X25519 public key: seal session states to it."
    )
    account: GrantedAccount | None = None
    session: GrantedSession | None = None
    proxy: GrantedProxy | None = Field(None, description="The proxy the account is pinned to.")
    seeds: list[GrantedSeed] = []
    session_check_url: str | None = Field(
        None, description="The site's page that answers 2xx only to a logged-in session."
    )


class JobQueued(Reply):
    type: Literal["job.queued"] = "job.queued"
    position: int
    reason: str | None = Field(
        None,
        description="What holds the site's line: capacity, accounts (none rested), budget (the "
        "accounts' or the site's use budget), rate_limited (the accounts rest for the scope "
        "of the job at the head of the line) or proxy (no rested account has a usable proxy).",
    )


class JobRejected(Reply):
    type: Literal["job.rejected"] = "job.rejected"
    reason: str


class JobExtended(Reply):
    type: Literal["job.extended"] = "job.extended"
    lease_expires_at: datetime


class JobLeaseLost(Reply):
    type: Literal["job.lease_lost"] = "job.lease_lost"
    reason: str


class JobFinished(Reply):
    type: Literal["job.finished"] = "job.finished"
    status: str


class JobCancelled(Reply):
    type: Literal["job.cancelled"] = "job.cancelled"


class SessionMerged(Reply):
    type: Literal["session.merged"] = "session.merged"
    version: int


class SessionRejected(Reply):
    """A session upload that was not kept; the account's session is unchanged."""

    type: Literal["session.rejected"] = "session.rejected"
    reason: Literal["session_too_large"]
    detail: str


class SeedsClaimed(Reply):
    type: Literal["seeds.claimed"] = "seeds.claimed"
    seeds: list[GrantedSeed] = []


class CaptureAccepted(Reply):
    type: Literal["capture.accepted"] = "capture.accepted"
    capture_id: str


class RequestInvalid(Message):
    type: Literal["request.invalid"] = "request.invalid"
    request_id: str | None = None
    job_id: str | None = None
    error: str


class RequestConflict(Message):
    type: Literal["request.conflict"] = "request.conflict"
    request_id: UUID
    job_id: str


class RequestFailed(Message):
    """A request dead-lettered after failing unexpectedly on every attempt: nothing of it was
    done. Replaying its dead letter once the cause is fixed applies it and answers it again."""

    type: Literal["request.failed"] = "request.failed"
    request_id: str | None = None
    job_id: str | None = None
    error_class: Annotated[str, StringConstraints(max_length=200)]


AnyReply = Annotated[
    JobGranted
    | JobQueued
    | JobRejected
    | JobExtended
    | JobLeaseLost
    | JobFinished
    | JobCancelled
    | SessionMerged
    | SessionRejected
    | SeedsClaimed
    | CaptureAccepted
    | RequestInvalid
    | RequestConflict
    | RequestFailed,
    Field(discriminator="type"),
]
REPLY_ADAPTER: TypeAdapter[AnyReply] = TypeAdapter(AnyReply)


def parse_reply(raw: bytes) -> AnyReply:
    """Validate raw JSON bytes as a reply."""
    return REPLY_ADAPTER.validate_json(raw)


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every message, by name (exported by `qm schema`)."""
    return {
        "request": REQUEST_ADAPTER.json_schema(),
        "reply": REPLY_ADAPTER.json_schema(),
        "event": LifecycleEvent.model_json_schema(),
        "job_event": TerminalJobEvent.model_json_schema(),
        "capture_ready": CaptureReady.model_json_schema(),
    }
