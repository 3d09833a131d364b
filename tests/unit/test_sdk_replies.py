"""The SDK's reply bookkeeping: futures by correlation_id, message-id dedup, abandoned grants."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from app.sdk.errors import ReplyUnreadable
from app.sdk.replies import RecentIds, RecentMap, Release, ReplyRouter
from schemas.messages import JobGranted, JobLeaseLost, JobQueued, JobRejected, RequestConflict

SEALED = "A" * 88  # a sealed lease secret: opaque to the router


def granted(correlation_id: str, job_id: str = "job-1") -> bytes:
    return (
        JobGranted(
            request_id=uuid.UUID(correlation_id),
            job_id=job_id,
            lease_token=1,
            lease_secret=SEALED,
            granted_at=datetime(2030, 1, 1, tzinfo=UTC),
            lease_expires_at=datetime(2030, 1, 1, tzinfo=UTC),
        )
        .model_dump_json()
        .encode()
    )


def queued(correlation_id: str, position: int = 3, job_id: str = "job-1") -> bytes:
    return (
        JobQueued(request_id=uuid.UUID(correlation_id), job_id=job_id, position=position)
        .model_dump_json()
        .encode()
    )


def rejected(correlation_id: str, job_id: str = "job-1") -> bytes:
    return (
        JobRejected(request_id=uuid.UUID(correlation_id), job_id=job_id, reason="timed_out")
        .model_dump_json()
        .encode()
    )


def new_id() -> str:
    return str(uuid.uuid4())


async def test_reply_with_unknown_correlation_id_is_ignored() -> None:
    router = ReplyRouter()
    mine = new_id()
    waiter = router.expect(mine, "job-1")
    other = new_id()

    assert router.route(other, new_id(), granted(other)) is None
    assert router.route(None, new_id(), granted(mine)) is None

    assert not waiter.final.done()


async def test_final_reply_resolves_the_waiter_and_forgets_it() -> None:
    router = ReplyRouter()
    cid = new_id()
    waiter = router.expect(cid, "job-1")

    router.route(cid, new_id(), granted(cid))

    assert isinstance(waiter.final.result(), JobGranted)
    assert router.outstanding == 0


async def test_queued_reply_notes_the_position_and_keeps_waiting_for_the_final_one() -> None:
    router = ReplyRouter()
    cid = new_id()
    waiter = router.expect(cid, "job-1")

    router.route(cid, new_id(), queued(cid, position=4))

    assert waiter.queued and waiter.queued_position == 4
    assert not waiter.final.done()
    router.route(cid, new_id(), rejected(cid))
    assert isinstance(waiter.final.result(), JobRejected)


async def test_a_republished_reply_with_the_same_message_id_is_delivered_once() -> None:
    router = ReplyRouter()
    cid = new_id()
    waiter = router.expect(cid, "job-1")
    message_id = new_id()

    router.route(cid, message_id, queued(cid, position=2))
    router.route(cid, message_id, rejected(cid))  # same message id: a duplicate, dropped

    assert not waiter.final.done()
    router.route(cid, new_id(), granted(cid))
    assert isinstance(waiter.final.result(), JobGranted)


async def test_registering_the_same_correlation_id_twice_is_refused() -> None:
    router = ReplyRouter()
    cid = new_id()
    router.expect(cid, "job-1")
    with pytest.raises(ValueError, match="already waiting"):
        router.expect(cid, "job-1")


def test_recent_ids_forget_the_oldest_beyond_their_capacity() -> None:
    ids = RecentIds(capacity=3)
    for item in "abcd":
        assert ids.add(item)
    assert len(ids) == 3
    assert "a" not in ids
    assert not ids.add("d")
    assert ids.add("a")


def test_recent_map_forgets_the_oldest_beyond_its_capacity() -> None:
    items = RecentMap(capacity=2)
    items.put("a", "1")
    items.put("b", "2")
    items.put("c", "3")
    assert "a" not in items and items.get("c") == "3" and len(items) == 2
    assert items.pop("b") == "2" and items.pop("b") is None


async def test_a_grant_for_an_abandoned_start_is_handed_back_for_release_once() -> None:
    router = ReplyRouter()
    cid = new_id()
    router.expect(cid, "job-7")

    assert router.abandon(cid, release_grant=True) is None
    assert router.is_abandoned(cid)

    assert router.route(cid, new_id(), granted(cid, job_id="job-7")) == Release("job-7", 1, SEALED)
    assert not router.is_abandoned(cid)
    assert router.route(cid, new_id(), granted(cid, job_id="job-7")) is None


async def test_an_abandoned_start_stays_remembered_through_queued_until_its_grant() -> None:
    router = ReplyRouter()
    cid = new_id()
    router.expect(cid, "job-7")
    router.abandon(cid, release_grant=True)

    assert router.route(cid, new_id(), queued(cid, job_id="job-7")) is None
    assert router.is_abandoned(cid)
    assert router.route(cid, new_id(), granted(cid, job_id="job-7")) == Release("job-7", 1, SEALED)


async def test_a_rejection_for_an_abandoned_start_releases_nothing_and_is_forgotten() -> None:
    router = ReplyRouter()
    cid = new_id()
    router.expect(cid, "job-7")
    router.abandon(cid, release_grant=True)

    assert router.route(cid, new_id(), rejected(cid, job_id="job-7")) is None
    assert not router.is_abandoned(cid)


async def test_a_duplicate_late_grant_is_released_once() -> None:
    router = ReplyRouter()
    cid = new_id()
    router.expect(cid, "job-7")
    router.abandon(cid, release_grant=True)
    message_id = new_id()
    router.route(cid, message_id, queued(cid, job_id="job-7"))

    assert router.route(cid, message_id, granted(cid, job_id="job-7")) is None  # same id: dup
    assert router.route(cid, new_id(), granted(cid, job_id="job-7")) == Release("job-7", 1, SEALED)


async def test_abandoning_a_start_whose_grant_arrived_but_was_never_taken_releases_it_now() -> None:
    router = ReplyRouter()
    cid = new_id()
    router.expect(cid, "job-7")
    router.route(cid, new_id(), granted(cid, job_id="job-7"))

    assert router.abandon(cid, release_grant=True) is None  # already settled and forgotten

    cid = new_id()
    waiter = router.expect(cid, "job-8")
    waiter.final.set_result(JobGranted.model_validate_json(granted(cid, job_id="job-8")))
    assert router.abandon(cid, release_grant=True) == Release("job-8", 1, SEALED)


async def test_abandoned_requests_other_than_starts_are_not_remembered() -> None:
    router = ReplyRouter()
    cid = new_id()
    router.expect(cid, "job-7")

    router.abandon(cid, release_grant=False)

    assert not router.is_abandoned(cid)
    assert router.route(cid, new_id(), granted(cid, job_id="job-7")) is None


async def test_abandoned_correlation_ids_are_bounded() -> None:
    router = ReplyRouter(abandoned_capacity=2)
    ids = [new_id() for _ in range(3)]
    for cid in ids:
        router.expect(cid, "job")
        router.abandon(cid, release_grant=True)

    assert not router.is_abandoned(ids[0])
    assert router.is_abandoned(ids[1]) and router.is_abandoned(ids[2])


async def test_an_unreadable_reply_fails_its_waiter() -> None:
    router = ReplyRouter()
    cid = new_id()
    waiter = router.expect(cid, "job-1")

    router.route(cid, new_id(), b'{"type": "job.granted", "v": 99}')

    with pytest.raises(ReplyUnreadable):
        waiter.final.result()


async def test_fail_all_fails_every_outstanding_request() -> None:
    router = ReplyRouter()
    waiters = [router.expect(new_id(), "job") for _ in range(2)]

    router.fail_all(RuntimeError("closed"))

    assert router.outstanding == 0
    for waiter in waiters:
        with pytest.raises(RuntimeError):
            waiter.final.result()


def lease_lost(correlation_id: str, reason: str = "revoked", job_id: str = "job-1") -> bytes:
    return (
        JobLeaseLost(request_id=uuid.UUID(correlation_id), job_id=job_id, reason=reason)
        .model_dump_json()
        .encode()
    )


async def test_a_later_lease_lost_for_a_granted_start_reaches_its_job_once() -> None:
    router = ReplyRouter()
    cid, heard = new_id(), []
    router.watch_lease(cid, "job-1", heard.append)
    message_id = new_id()
    assert router.route(cid, new_id(), granted(cid)) is None  # a republished grant: nothing
    assert router.route(cid, message_id, lease_lost(cid)) is None
    router.route(cid, message_id, lease_lost(cid))  # the relay's duplicate
    router.route(cid, new_id(), lease_lost(cid, "lease_expired"))  # no longer watched
    router.route(new_id(), new_id(), lease_lost(new_id()))  # another job's
    assert heard == ["revoked"]


async def test_an_unwatched_start_hears_nothing() -> None:
    router = ReplyRouter()
    cid, heard = new_id(), []
    router.watch_lease(cid, "job-1", heard.append)
    router.unwatch_lease(cid)
    router.route(cid, new_id(), lease_lost(cid))
    assert heard == []


async def test_a_reply_for_another_job_or_request_with_a_reused_correlation_id_settles_nothing() -> (
    None
):
    router = ReplyRouter()
    cid = new_id()
    waiter = router.expect(cid, "job-1")
    # another writer of requests reused this request's correlation id for its own job, or for
    # this job with a request id of its own
    router.route(cid, new_id(), rejected(cid, job_id="theirs"))
    hostile = JobLeaseLost(request_id=uuid.uuid4(), job_id="job-1", reason="wrong_secret")
    router.route(cid, new_id(), hostile.model_dump_json().encode())
    assert not waiter.final.done()
    router.route(cid, new_id(), granted(cid, job_id="job-1"))
    assert isinstance(waiter.final.result(), JobGranted)


async def test_a_reused_start_request_id_conflict_does_not_end_a_queued_start() -> None:
    router = ReplyRouter()
    cid = new_id()
    waiter = router.expect(cid, "job-1", is_start=True)
    router.route(cid, new_id(), queued(cid))
    conflict = RequestConflict(request_id=uuid.UUID(cid), job_id="job-1")
    router.route(cid, new_id(), conflict.model_dump_json().encode())
    assert not waiter.final.done()  # an SDK start never repeats its request id with another body


async def test_a_lease_lost_for_another_job_or_request_does_not_end_a_watched_lease() -> None:
    router = ReplyRouter()
    cid, heard = new_id(), []
    router.watch_lease(cid, "job-1", heard.append)
    router.route(cid, new_id(), lease_lost(cid, "unknown_job", job_id="theirs"))
    hostile = JobLeaseLost(request_id=uuid.uuid4(), job_id="job-1", reason="wrong_secret")
    router.route(cid, new_id(), hostile.model_dump_json().encode())
    assert heard == []
    router.route(cid, new_id(), lease_lost(cid, "revoked"))
    assert heard == ["revoked"]
