"""The collector's client: request/reply over Kafka, done by the SDK itself.

One producer writes requests to ``<prefix>requests`` (key ``job_id``, headers ``correlation_id`` and
``reply_to``). One consumer reads the reply topic with manual partition assignment (never a consumer
group, so any number of collector processes can share the topic) starting from its end. Replies are
matched to their requests by ``correlation_id``, ``job_id`` and ``request_id`` (``app.sdk.replies``).

On the shared ``<prefix>replies`` topic a client reads one partition only: it picks one when it
starts (``app.sdk.routing``; or takes ``reply_partition``), and every request carries it in the
``qm.reply_partition`` header, so Quartermaster sends the replies there. A client with a reply
topic of its own (or ``route_replies=False``) sends no such header and reads the whole topic.

Each client has an X25519 key pair (made when it is created, or given) and sends the public half
in every ``job.start``; Quartermaster seals a grant's lease secret, account secret and session to
it (docs/security.md): other readers of the reply topic can neither open them nor act on the lease.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from app.sdk.connection_check import refusal
from app.sdk.errors import (
    BrokerUnavailable,
    ClientClosed,
    InvalidArgument,
    QuartermasterError,
    RequestTimeout,
    SecretUndecryptable,
)
from app.sdk.ids import new_id, new_uuid
from app.sdk.job import Job
from app.sdk.logs import said_by_us, sdk_logger
from app.sdk.replies import Release, ReplyRouter, Waiter
from app.sdk.routing import assign_reply_partitions, partition_to_read
from app.sealing import Unsealable, public_key_text, unseal
from schemas.messages import (
    CORRELATION_ID,
    REPLY_PARTITION,
    REPLY_TO,
    AnyReply,
    AnyRequest,
    JobCancel,
    JobStart,
    reply_partition_value,
    seal_context,
)

log = sdk_logger(__name__)

_Client = TypeVar("_Client", AIOKafkaProducer, AIOKafkaConsumer)

MESSAGE_ID = "qm.message_id"  # the header every message Quartermaster publishes carries
CLOSE_GRACE_SECONDS = 5.0  # how long close() lets pending releases reach the broker


def _header(headers: Any, name: str) -> str | None:
    for key, value in headers or ():
        if key == name and value is not None:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _default_collector() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:200]


class QuartermasterClient:
    """Talks to Quartermaster for one collector process; cheap to share between its tasks.

    Use as ``async with QuartermasterClient(...) as client`` (or call ``start``/``close``).
    """

    def __init__(
        self,
        bootstrap_servers: str | list[str],
        *,
        topic_prefix: str = "qm.",
        reply_topic: str | None = None,
        security: Mapping[str, Any] | None = None,
        collector: str | None = None,
        request_timeout: float = 30.0,
        idempotent_producer: bool = True,
        dedup_capacity: int = 10_000,
        abandoned_capacity: int = 10_000,
        reply_partition: int | None = None,
        route_replies: bool = True,
        private_key: X25519PrivateKey | None = None,
    ) -> None:
        """``security``: aiokafka options such as ``security_protocol``, ``ssl_context``,
        ``sasl_mechanism``, ``sasl_plain_username``, ``sasl_plain_password``.

        ``reply_partition``: the partition of the reply topic this client reads, and its replies
        are sent to (it must exist when the client starts). Without it, a client of the shared
        ``<prefix>replies`` topic picks one itself, unless ``route_replies`` is False; a client
        of a reply topic of its own reads all of it.

        ``private_key``: this client's X25519 key (a new one when absent). Grants are sealed to
        its public half, and only a start with the same key and collector may start an EXPIRED
        job again: a collector that restarts and means to start its expired jobs again keeps
        its key."""
        if reply_partition is not None:
            try:
                reply_partition_value(reply_partition)
            except ValueError as exc:  # documented: every error of the SDK is one of its own
                raise InvalidArgument("QuartermasterClient", [f"reply_partition: {exc}"]) from None
        self.bootstrap_servers = bootstrap_servers
        self.topic_prefix = topic_prefix
        self.request_topic = f"{topic_prefix}requests"
        self.reply_topic = reply_topic or f"{topic_prefix}replies"
        self.client_id = os.urandom(16).hex()  # picks the reply partition of the shared topic
        self.reply_partition = reply_partition  # the one partition read (None: all, or unknown)
        self._asked_partition = reply_partition
        self._route_replies = route_replies
        self.collector = collector or _default_collector()
        self.request_timeout = request_timeout
        self._private_key = private_key or X25519PrivateKey.generate()
        self.public_key = public_key_text(self._private_key)
        self._security = dict(security or {})
        self._idempotent = idempotent_producer
        self._router = ReplyRouter(
            seen_capacity=dedup_capacity, abandoned_capacity=abandoned_capacity
        )
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"QuartermasterClient(bootstrap_servers={self.bootstrap_servers!r}, "
            f"request_topic={self.request_topic!r}, reply_topic={self.reply_topic!r})"
        )

    def watch_lease(
        self, start_request_id: str, job_id: str, on_lost: Callable[[str], None] | None
    ) -> None:
        """Call ``on_lost(reason)`` when a ``job.lease_lost`` comes for a granted start of
        ``job_id`` (None: stop watching)."""
        if on_lost is None:
            self._router.unwatch_lease(start_request_id)
        else:
            self._router.watch_lease(start_request_id, job_id, on_lost)

    def open_sealed(self, sealed: str, context: str) -> bytes:
        """Open a value of a grant sealed to this client's public key (``SecretUndecryptable``
        when it does not open: sealed to another key, for another context, or damaged)."""
        try:
            return unseal(self._private_key, sealed, context)
        except Unsealable as exc:
            raise SecretUndecryptable(str(exc)) from None

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the producer and the reply consumer, positioned at the end of the reply topic."""
        if self._producer is not None:
            return
        if self._closed:
            raise ClientClosed("a closed client cannot be started again")
        producer = await self._start_producer()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            **self._security,
        )
        try:
            await self._started(consumer)
        except BaseException:
            await producer.stop()
            raise
        try:
            await self._assign_reply_partitions(consumer, producer)
        except BaseException as exc:
            await consumer.stop()
            await producer.stop()
            if isinstance(exc, KafkaError):
                raise self._unavailable(exc) from exc
            raise
        self._producer, self._consumer = producer, consumer
        self._reader = asyncio.create_task(self._read_replies(consumer), name="qm-sdk-replies")
        log.info(
            "sdk_client_started",
            reply_topic=self.reply_topic,
            reply_partition=self.reply_partition,
            collector=self.collector,
        )

    async def _start_producer(self) -> AIOKafkaProducer:
        """A started producer: idempotent when asked and the broker has it, else plain.

        A broker without idempotent producers (Tansu, as `qm dev` runs) refuses the producer id
        at start; requests are then sent without idempotence, which is safe here: a request sent
        twice is answered from Quartermaster's inbox by its ``request_id``.
        """
        try:
            # aiokafka logs the refused producer id as an error; the warning below says it
            with said_by_us("aiokafka.producer.sender", "InitProducerId"):
                return await self._started(self._new_producer(idempotent=self._idempotent))
        except BrokerUnavailable as refused:
            cause = refused.__cause__
            if not self._idempotent or isinstance(cause, KafkaConnectionError | KafkaTimeoutError):
                raise
            log.warning(
                "broker_without_idempotent_producer",
                bootstrap_servers=self.bootstrap_servers,
                error_class=type(cause).__name__,
                hint="requests are sent without idempotence; pass idempotent_producer=False "
                "(QM_KAFKA_IDEMPOTENCE=false) to skip this check",
            )
            self._idempotent = False
            return await self._started(self._new_producer(idempotent=False))

    def _new_producer(self, *, idempotent: bool) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            acks="all",
            enable_idempotence=idempotent,
            linger_ms=1,
            **self._security,
        )

    async def _started(self, client: _Client) -> _Client:
        """``client`` started; else stopped (no "Unclosed" warning) and a ``BrokerUnavailable``."""
        try:
            await client.start()
        except KafkaError as exc:
            await client.stop()
            if isinstance(exc, KafkaConnectionError):  # say why: credentials, certificate ...
                reason = await refusal(self.bootstrap_servers, self._security)
                if reason:
                    raise BrokerUnavailable(
                        self.bootstrap_servers, f"cannot be used: {reason}"
                    ) from None
            raise self._unavailable(exc) from exc
        except BaseException:
            await client.stop()
            raise
        return client

    def _unavailable(self, exc: KafkaError) -> BrokerUnavailable:
        if isinstance(exc, KafkaConnectionError | KafkaTimeoutError):
            return BrokerUnavailable(self.bootstrap_servers, f"cannot be reached ({exc})")
        return BrokerUnavailable(self.bootstrap_servers, f"refused the client: {exc!r}")

    async def _assign_reply_partitions(
        self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer
    ) -> None:
        self.reply_partition = await assign_reply_partitions(
            consumer, producer, self.reply_topic, self._partition_to_read
        )

    def _partition_to_read(self, partitions: int) -> int | None:
        """The one partition of the reply topic (of ``partitions``) this client reads; None:
        all of them."""
        shared = self.reply_topic == f"{self.topic_prefix}replies"
        try:
            return partition_to_read(
                self.reply_topic,
                partitions,
                asked=self._asked_partition,
                route=self._route_replies and shared,
                client_id=self.client_id,
            )
        except ValueError as exc:
            raise QuartermasterError(str(exc)) from None

    async def close(self) -> None:
        """Let pending releases go out (bounded), then stop the reader, consumer and producer."""
        if self._closed:
            return
        self._closed = True
        await self._drain_releases()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._drain_releases()  # a late grant the reader saw while we waited
        self._router.fail_all(ClientClosed("the client was closed"))
        for client in (self._consumer, self._producer):
            if client is not None:
                await client.stop()
        log.info("sdk_client_closed", reply_topic=self.reply_topic)

    async def _drain_releases(self) -> None:
        if self._background:
            await asyncio.wait(set(self._background), timeout=CLOSE_GRACE_SECONDS)

    async def __aenter__(self) -> QuartermasterClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- request/reply -------------------------------------------------------------------

    def job(
        self,
        *,
        site: str,
        lease_seconds: int | None = None,
        wait_seconds: int = 0,
        needs_account: bool = True,
        seeds: int = 0,
        collector: str | None = None,
        job_id: str | None = None,
        timeout: float | None = None,
        scope: str | None = None,
    ) -> Job:
        """A job to run as ``async with client.job(site=...) as job:`` (see ``app.sdk.job.Job``)."""
        return Job(
            self,
            site=site,
            lease_seconds=lease_seconds,
            wait_seconds=wait_seconds,
            needs_account=needs_account,
            seeds=seeds,
            collector=collector or self.collector,
            job_id=job_id or new_id(),
            timeout=self.request_timeout if timeout is None else timeout,
            scope=scope,
        )

    async def request(self, message: AnyRequest, timeout: float | None = None) -> AnyReply:
        """Send a request and return its final reply.

        A ``job.start`` answered ``job.queued`` is waited on up to ``wait_seconds + timeout`` for
        its grant or rejection. Raises ``RequestTimeout`` (a ``TimeoutError``) when no final reply
        comes in time, ``RequestFailed`` for a ``request.failed``. A ``job.start`` given up on (a
        timeout, a cancellation, a failure) is cancelled; a grant that comes later is released.
        """
        if self._producer is None or self._closed:
            raise ClientClosed("the client is not started (use `async with` or `await start()`)")
        timeout = self.request_timeout if timeout is None else timeout
        correlation_id = str(message.request_id)
        is_start = isinstance(message, JobStart)
        waiter = self._router.expect(correlation_id, message.job_id, is_start=is_start)
        try:
            await self._send(message, correlation_id)
            return await self._await_final(waiter, message, timeout)
        except BaseException:
            release_now = self._router.abandon(correlation_id, release_grant=is_start)
            if release_now is not None:  # granted, but the caller never took it
                self._release_grant(release_now, "grant_unclaimed")
            elif is_start:
                # Still queued, or the grant may be on its way: cancel the waiting job at once
                # (requests of one job share a partition, so the cancel comes after the start).
                # A grant that beat it is released with its token when it arrives.
                self.release(message.job_id, "caller_gave_up")
            raise
        finally:
            self._router.forget(correlation_id)

    async def _await_final(self, waiter: Waiter, message: AnyRequest, timeout: float) -> AnyReply:
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        wait_seconds = message.wait_seconds if isinstance(message, JobStart) else 0
        while True:
            budget = timeout + (wait_seconds if waiter.queued else 0)
            remaining = sent_at + budget - loop.time()
            if remaining <= 0:
                log.warning(
                    "request_timed_out",
                    request_type=message.type,
                    job_id=message.job_id,
                    request_id=waiter.correlation_id,
                    queued=waiter.queued,
                )
                raise RequestTimeout(message.type, message.job_id, budget)
            # asyncio.wait leaves the future alone on timeout; a job.queued seen meanwhile
            # lengthens the budget on the next turn.
            done, _ = await asyncio.wait({waiter.final}, timeout=remaining)
            if done:
                return waiter.final.result()

    async def _send(self, message: AnyRequest, correlation_id: str) -> None:
        producer = self._producer
        if producer is None:
            raise ClientClosed("the client is closed")
        headers = [(CORRELATION_ID, correlation_id.encode()), (REPLY_TO, self.reply_topic.encode())]
        if self.reply_partition is not None:
            headers.append((REPLY_PARTITION, reply_partition_value(self.reply_partition)))
        try:
            await producer.send_and_wait(
                self.request_topic,
                value=message.model_dump_json().encode(),
                key=message.job_id.encode(),
                headers=headers,
            )
        except KafkaError as exc:
            raise BrokerUnavailable(
                self.bootstrap_servers, f"did not take {message.type}: {exc!r}"
            ) from exc
        log.debug(
            "request_sent",
            request_type=message.type,
            job_id=message.job_id,
            request_id=correlation_id,
        )

    async def send(self, message: AnyRequest) -> None:
        """Send a request without waiting for its reply (its reply, if any, is ignored)."""
        if self._producer is None or self._closed:
            raise ClientClosed("the client is not started (use `async with` or `await start()`)")
        await self._send(message, str(message.request_id))

    # --- releasing what nobody uses ------------------------------------------------------

    def release(
        self,
        job_id: str,
        why: str,
        lease_token: int | None = None,
        lease_secret: str | None = None,
    ) -> None:
        """Send ``job.cancel`` for a job in the background (the caller may be being cancelled).

        The server cancels a waiting job, or, given the lease's token and secret, frees a
        running job's account for the next waiter (without them a running job's cancel changes
        nothing).
        """
        task = asyncio.create_task(
            self._release(job_id, why, lease_token, lease_secret), name=f"qm-sdk-release-{job_id}"
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(
        self, job_id: str, why: str, lease_token: int | None, lease_secret: str | None
    ) -> None:
        cancel = JobCancel(
            request_id=new_uuid(),
            job_id=job_id,
            lease_token=lease_token,
            lease_secret=lease_secret,
            public_key=self.public_key,  # a waiting job's cancel: only its requester's counts
        )
        try:
            await self._send(cancel, str(cancel.request_id))
        except Exception as exc:  # noqa: BLE001 - the lease expires anyway; say so and go on
            log.warning(
                "job_release_failed", job_id=job_id, why=why, error_class=type(exc).__name__
            )
            return
        log.info("job_release_sent", job_id=job_id, why=why, request_id=str(cancel.request_id))

    # --- the reply reader ----------------------------------------------------------------

    async def _read_replies(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500, max_records=500)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep reading; waiting requests time out
                log.warning("reply_read_failed", error_class=type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            for records in batches.values():
                for record in records:
                    self.on_reply(record.headers, record.value or b"")

    def on_reply(self, headers: Any, value: bytes) -> None:
        """Handle one record of the reply topic (the reader calls this for every record)."""
        correlation_id = _header(headers, CORRELATION_ID)
        release = self._router.route(correlation_id, _header(headers, MESSAGE_ID), value)
        if release is not None:
            log.info("late_grant_releasing", job_id=release.job_id, correlation_id=correlation_id)
            self._release_grant(release, "late_grant")

    def _release_grant(self, release: Release, why: str) -> None:
        context = seal_context("lease.secret", release.job_id)
        try:
            secret = self.open_sealed(release.sealed_secret, context).decode()
        except SecretUndecryptable:
            # not sealed to this client: nothing it could cancel; the lease lapses by itself
            log.warning("late_grant_unopened", job_id=release.job_id, why=why)
            return
        self.release(release.job_id, why, release.lease_token, secret)
