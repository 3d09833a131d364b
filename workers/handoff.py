"""The handoff worker: the second stage. It consumes ``qm.captures`` in a consumer group and, for
each record, hands one capture downstream exactly once:

1. claim: RECEIVED -> HANDING_OFF with a lease (holder, fresh token, expiry), its own transaction.
   A claim that returns nothing bails silently: a peer or a duplicate record was first, or the
   attempt is not due yet (the reaper publishes it again when it is).
2. effects: the site's targets (``app.handoff.HandoffTargets``: a webhook, an Airflow DAG run), each
   idempotent by capture id, since a worker that dies after them repeats them on the next try.
   The claim's lease is short and renewed every third of it while the targets answer.
3. finalise: HANDING_OFF -> HANDED_OFF with the claim's token and, in that transaction only, the
   ``capture.ready`` record on ``qm.captures.ready`` and its event (so a loser publishes nothing).
   A failed effect gives the capture back instead: RECEIVED after a backoff, or FAILED (dead
   letter) at the attempt cap or when the target refused it for good.

A worker that dies anywhere leaves a HANDING_OFF capture whose lease lapses; the capture reaper
(``reapers.lapsed_handoffs``) brings it back within the lease plus one sweep interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog

from app.core import captures as core_captures
from app.core.captures import delivery_of, settle_handoff
from app.core.transaction import Tx, TxServices
from app.crypto import SecretBox
from app.dlt import Origin, dead_letter_headers, dlt_topic, redact
from app.errors import describe
from app.handoff import Delivery, HandoffTargets, Target, TargetError
from app.health import CAPTURES_PER_BATCH
from app.settings import Settings
from app.store import Database, Row, captures
from schemas.messages import CaptureHandoff
from schemas.states import CaptureStatus
from workers.consuming import Incoming, Subscription, pipelined
from workers.group_commit import GroupCommit
from workers.retrying import TransientRetry

if TYPE_CHECKING:
    from app.root import Wiring

log = structlog.get_logger()
Targets = Callable[[Delivery], list[Target]]
# what a finalised handoff returns (and logs, as ``capture_<outcome>``), by the capture's status
# how long a batch waits for its targets before finalising those done together: a capture
# without targets, or with a quick one, joins the batch's one transaction
TOGETHER_SECONDS = 0.05
STOP_GRACE_SECONDS = 10.0  # how long a stopping worker lets its batches finish
OUTCOMES = {
    CaptureStatus.HANDED_OFF: "handed_off",
    CaptureStatus.RECEIVED: "retrying",
    CaptureStatus.FAILED: "failed",
}


class ClaimLost(Exception):
    """The capture's claim was reaped while its targets ran: another worker owns it now."""


@dataclass(frozen=True, slots=True, eq=False)
class Handing:
    """A record of ``qm.captures`` handed over, waiting for its batch."""

    record: Incoming
    capture_id: str | None  # None: not a capture handoff; it goes alone, to its dead letter


Attempt = TargetError | ClaimLost | None  # what a claimed capture's targets did (None: success)


class HandoffWorker:
    """Hands captures off; ``process`` never raises for a bad record.

    ``submit`` hands a record over and returns at once; records wait for a batch
    (``workers.group_commit``, keyed by capture id): one statement claims the batch's captures,
    their targets run side by side, and those done at once are finalised in one transaction
    (a slower one on its own when it ends). A batch that fails sends each record alone.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        secrets: SecretBox | None = None,
        *,
        holder: str | None = None,
        targets: Targets | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.services = TxServices(settings, secrets or SecretBox.from_settings(settings))
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.targets = targets or HandoffTargets(settings)
        self._retry_transient = TransientRetry("handoff", settings.transient_retry_max_seconds)
        self._batches: GroupCommit[Handing] = GroupCommit(
            batch_max=settings.handoff_batch_max,
            transactions=settings.handoff_batches,
            shared=self._hand_off_batch,
            alone=lambda handing: self.process(handing.record),
            sizes=CAPTURES_PER_BATCH,
        )
        self._stragglers: set[asyncio.Task[None]] = set()  # attempts slower than their batch

    async def submit(self, record: Incoming, finished: Callable[[], None]) -> None:
        """Hand ``record`` over; ``finished`` is called once its outcome is final."""
        outcome = self.enqueue(record)
        outcome.add_done_callback(lambda done: None if done.cancelled() else finished())

    def enqueue(self, record: Incoming) -> asyncio.Future[str]:
        """Put ``record`` in line for a batch; its outcome, once it has one."""
        try:
            capture_id: str | None = CaptureHandoff.model_validate_json(
                record.value or b""
            ).capture_id
        except Exception:  # noqa: BLE001 - it goes alone, where it is dead-lettered
            capture_id = None
        return self._batches.put(Handing(record, capture_id), capture_id, alone=capture_id is None)

    def close(self) -> None:
        """Start no more batches: records still waiting get no outcome and are read again."""
        self._batches.close()

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for the batches running and their stragglers, up to ``timeout`` seconds; then
        stop what still runs (a slow target's claim lapses; the reaper brings its capture back)."""
        try:
            async with asyncio.timeout(timeout):
                await self._batches.drain()
                while self._stragglers:
                    await asyncio.wait(self._stragglers)
        except TimeoutError:
            log.warning("handoff_stragglers_abandoned", stragglers=len(self._stragglers))
            await _cancelled(list(self._stragglers))

    async def process(self, record: Incoming) -> str:
        """Handle one record of ``qm.captures``; returns what happened."""
        try:
            capture_id = CaptureHandoff.model_validate_json(record.value or b"").capture_id
        except Exception as exc:  # noqa: BLE001 - every bad record is dead-lettered
            await self._retry_transient(partial(self._dead_letter, record, exc))
            return "dead_lettered"
        try:
            return await self.hand_off(capture_id, record)
        except Exception:  # the lease lapses and the reaper brings the capture back
            log.exception("handoff_failed_unexpectedly", capture_id=capture_id)
            return "error"

    async def hand_off(
        self, capture_id: str, record: Incoming | None = None, now: datetime | None = None
    ) -> str:
        """Claim, deliver, finalise one capture: handed_off, retrying, failed, skipped or lost."""
        capture = await self._retry_transient(partial(self._claim, capture_id, now))
        if capture is None:
            log.debug("handoff_claim_skipped", capture_id=capture_id)
            return "skipped"
        self._fault("handoff_after_claim", capture)
        try:
            error = await self._deliver_while_held(capture, now)
        except ClaimLost:
            log.info("handoff_lost", capture_id=capture_id, handoff_token=capture["handoff_token"])
            return "lost"
        self._fault("handoff_after_effect", capture)
        return await self._retry_transient(partial(self._finalise, capture, error, record, now))

    async def _deliver_while_held(self, capture: Row, now: datetime | None) -> TargetError | None:
        """The targets, with the claim renewed every quarter of its lease while they answer: a
        slow target keeps its claim, a dead worker's claim lapses within one short lease. Raises
        ClaimLost when the claim was reaped meanwhile (the delivery is stopped: it is not ours)."""
        delivering = asyncio.create_task(self._deliver(delivery_of(capture, self.services.secrets)))
        lease = self.settings.handoff_lease_seconds
        try:
            while True:
                done, _ = await asyncio.wait({delivering}, timeout=lease / 4)
                if done:
                    return delivering.result()
                if not await self._renew(capture, now):
                    raise ClaimLost
        finally:
            if not delivering.done():
                delivering.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await delivering

    async def _renew(self, capture: Row, now: datetime | None) -> bool:
        """Push the claim's expiry one lease ahead; False when it is no longer ours. A database
        that fails now is tried again at the next renewal (the lease outlasts one miss)."""
        try:
            async with self.db.transaction() as conn:
                expires = await captures.extend_handoff(
                    conn, capture["id"], capture["handoff_token"],
                    lease_seconds=self.settings.handoff_lease_seconds, now=now,
                )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - transient; the next renewal tries again
            log.warning("handoff_renewal_failed", capture_id=capture["id"], error=describe(exc))
            return True
        return expires is not None

    async def _hand_off_batch(self, batch: list[Handing]) -> list[str]:
        """Claim the batch's captures in one statement, run their targets side by side, and
        finalise those done within ``TOGETHER_SECONDS`` in one transaction. A slower one goes on
        as a straggler, finalised on its own when its target answers; its record is settled now
        (``handing_off``): its claim is in the database, and were this worker to die, the lapsed
        handoffs sweep would bring the capture back. A capture's second record is skipped."""
        ids = list(dict.fromkeys(h.capture_id for h in batch if h.capture_id is not None))
        claimed = await self._retry_transient(partial(self._claim_batch, ids))
        records = {h.capture_id: h.record for h in reversed(batch)}  # each id's first record
        attempts = {asyncio.create_task(self._attempt(c)): c for c in claimed}
        outcomes: dict[str, str] = {}
        handed: set[asyncio.Task[Attempt]] = set()  # to stragglers, which see them through
        try:
            done, pending = (
                await asyncio.wait(attempts, timeout=TOGETHER_SECONDS)
                if attempts
                else (set(), set())
            )
            results = [(attempts[task], task.result()) for task in done]
            if results:
                outcomes |= await self._retry_transient(
                    partial(self._finalise_together, results, records)
                )
            for task in pending:
                await self._straggle(task, attempts[task], records)
                handed.add(task)
                outcomes[attempts[task]["id"]] = "handing_off"
        except BaseException:  # a batch that failed leaves no target running (its claims lapse)
            await _cancelled([task for task in attempts if task not in handed])
            raise
        answered: set[str] = set()
        out = []
        for handing in batch:
            capture_id = handing.capture_id
            if capture_id in outcomes and capture_id not in answered:
                answered.add(capture_id)
                out.append(outcomes[capture_id])
            else:  # not due, a peer's, or a second record of one capture
                log.debug("handoff_claim_skipped", capture_id=capture_id)
                out.append("skipped")
        return out

    async def _claim_batch(self, capture_ids: list[str]) -> list[Row]:
        async with self.db.transaction() as conn:
            return await captures.claim_handoffs(
                conn,
                capture_ids,
                holder=self.holder,
                lease_seconds=self.settings.handoff_lease_seconds,
            )

    async def _attempt(self, capture: Row) -> Attempt:
        """A claimed capture's targets, its claim renewed meanwhile. Never raises: a capture
        whose delivery cannot even be built (a webhook no key opens) fails its own attempt."""
        self._fault("handoff_after_claim", capture)
        try:
            error = await self._deliver_while_held(capture, None)
        except ClaimLost as lost:
            return lost
        except Exception as exc:  # noqa: BLE001 - this capture's failure, not its batch's
            log.warning("handoff_attempt_failed", capture_id=capture["id"], error=describe(exc))
            error = TargetError(f"delivery: {describe(exc)}", retryable=True)
        self._fault("handoff_after_effect", capture)
        return error

    async def _straggle(
        self, attempt: asyncio.Task[Attempt], capture: Row, records: dict[str | None, Incoming]
    ) -> None:
        """Let ``attempt`` finish on its own and be finalised then; at most
        ``handoff_max_in_flight`` stragglers at once (a batch waits for room)."""
        while len(self._stragglers) >= self.settings.handoff_max_in_flight:
            await asyncio.wait(self._stragglers, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(self._finish_straggler(attempt, capture, records))
        self._stragglers.add(task)
        task.add_done_callback(self._stragglers.discard)

    async def _finish_straggler(
        self, attempt: asyncio.Task[Attempt], capture: Row, records: dict[str | None, Incoming]
    ) -> None:
        try:
            result = await attempt
            await self._retry_transient(
                partial(self._finalise_together, [(capture, result)], records)
            )
        except asyncio.CancelledError:
            await _cancelled([attempt])
            raise
        except Exception:  # the claim lapses and the reaper brings the capture back
            log.exception("handoff_failed_unexpectedly", capture_id=capture["id"])

    async def _finalise_together(
        self, results: list[tuple[Row, Attempt]], records: dict[str | None, Incoming]
    ) -> dict[str, str]:
        """One transaction: the successes finished in one statement (each with capture.ready),
        the failures given back; the outcome of each capture."""
        succeeded = [(c["id"], c["handoff_token"]) for c, result in results if result is None]
        settled: dict[str, Row | None] = {}
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            if succeeded:
                finished = await core_captures.finish_handoffs(tx, succeeded)
                settled |= {capture_id: finished.get(capture_id) for capture_id, _ in succeeded}
            for capture, result in results:
                if isinstance(result, TargetError):
                    record = records.get(capture["id"])
                    headers = list(record.headers) if record else []
                    settled[capture["id"]] = await settle_handoff(
                        tx, capture["id"], capture["handoff_token"], result,
                        self._origin(record), headers,
                    )  # fmt: skip
            await tx.flush()
        return {
            capture["id"]: self._report(capture["id"], capture["handoff_token"], None)
            if isinstance(result, ClaimLost)
            else self._report(capture["id"], capture["handoff_token"], settled[capture["id"]])
            for capture, result in results
        }

    async def _claim(self, capture_id: str, now: datetime | None) -> Row | None:
        async with self.db.transaction() as conn:
            return await captures.claim_handoff(
                conn,
                capture_id,
                holder=self.holder,
                lease_seconds=self.settings.handoff_lease_seconds,
                now=now,
            )

    async def _deliver(self, delivery: Delivery) -> TargetError | None:
        """Run the site's targets in order; the first failure, or None when all succeeded.

        Each gets at most ``handoff_target_timeout_seconds``; the claim is renewed meanwhile.
        """
        for target in self.targets(delivery):
            try:
                async with asyncio.timeout(self.settings.handoff_target_timeout_seconds):
                    await target.deliver(delivery)
            except TargetError as exc:
                return TargetError(f"{target.name}: {exc.reason}", retryable=exc.retryable)
            except TimeoutError:
                return TargetError(f"{target.name}: no answer in time", retryable=True)
            except Exception as exc:  # a target's bug is worth another try
                log.exception("target_failed", target=target.name, capture_id=delivery.capture_id)
                return TargetError(f"{target.name}: {type(exc).__name__}", retryable=True)
            log.info("target_delivered", target=target.name, capture_id=delivery.capture_id)
        return None

    async def _finalise(
        self,
        capture: Row,
        error: TargetError | None,
        record: Incoming | None,
        now: datetime | None,
    ) -> str:
        """HANDING_OFF -> HANDED_OFF with capture.ready, or back to RECEIVED / FAILED."""
        capture_id, token = capture["id"], capture["handoff_token"]
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            headers = list(record.headers) if record else []
            done = await settle_handoff(
                tx, capture_id, token, error, self._origin(record), headers, now
            )
            await tx.flush()
        return self._report(capture_id, token, done)

    def _report(self, capture_id: str, token: int, done: Row | None) -> str:
        """The outcome of a finalised attempt (None: the claim was no longer ours), logged."""
        if done is None:
            log.info("handoff_lost", capture_id=capture_id, handoff_token=token)
            return "lost"
        outcome = OUTCOMES[CaptureStatus(done["status"])]
        log.info(
            "capture_" + outcome,
            capture_id=capture_id,
            handoff_token=token,
            attempts=done["attempts"],
            reason=done["last_error"],
        )
        return outcome

    def _origin(self, record: Incoming | None) -> Origin:
        group = self.settings.handoff_consumer_group
        if record is None:
            return Origin(self.settings.topic("captures"), -1, -1, 0, group)
        return Origin(record.topic, record.partition, record.offset, record.timestamp_ms, group)

    async def _dead_letter(self, record: Incoming, error: BaseException) -> None:
        """A record that is not a capture handoff: to ``qm.captures.dlt`` with its headers."""
        async with self.db.transaction() as conn:
            tx = Tx(conn, self.services)
            headers = dead_letter_headers(
                record.headers, self._origin(record), error, 1, message=redact(describe(error))
            )
            tx.box.add(dlt_topic(record.topic), record.key, record.value, headers)
            await tx.flush()
        log.warning(
            "handoff_record_dead_lettered",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error_class=type(error).__name__,
        )

    def _fault(self, point: str, capture: Row) -> None:
        """Chaos testing: die here, as a crash would, when the settings ask for it."""
        if self.settings.fault_point == point and self.settings.fault_job_id == capture["job_id"]:
            log.warning("fault_injected", point=point, capture_id=capture["id"])
            os.kill(os.getpid(), signal.SIGKILL)


async def run_handoff_worker(wiring: Wiring) -> None:
    """Run the handoff worker until ``wiring.stop`` is set."""
    settings = wiring.settings
    worker = HandoffWorker(
        settings, wiring.database(), wiring.secrets, targets=wiring.handoff_targets
    )
    captures_topic = Subscription(
        settings.topic("captures"), settings.handoff_consumer_group, settings.handoff_consumers
    )
    try:
        async with pipelined(wiring, captures_topic, worker.submit, settings.handoff_max_in_flight):
            log.info(
                "handoff_worker_started",
                topic=captures_topic.topic,
                group=captures_topic.group,
                holder=worker.holder,
            )
            await wiring.stop.wait()
    finally:
        worker.close()  # records still waiting are read again by the partitions' next owner
        await worker.drain(STOP_GRACE_SECONDS)
        log.info("handoff_worker_stopped")  # the database closes after this, with the wiring


async def _cancelled(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until they have ended."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
