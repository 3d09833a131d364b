"""What the collector SDK raises: one base class, and a subclass per way a request can end badly."""

from __future__ import annotations


class QuartermasterError(Exception):
    """Base of every error the SDK raises."""


class RequestTimeout(QuartermasterError, TimeoutError):
    """No final reply arrived in time; the request was abandoned (a late grant is released)."""

    def __init__(self, request_type: str, job_id: str, timeout: float) -> None:
        super().__init__(f"{request_type} for job {job_id} got no final reply within {timeout:g}s")
        self.request_type = request_type
        self.job_id = job_id
        self.timeout = timeout


class JobRejected(QuartermasterError):
    """Quartermaster refused ``job.start``; ``reason`` is the code (``no_accounts``, ``timed_out``…)."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} was rejected: {reason}")
        self.job_id = job_id
        self.reason = reason


class RequestInvalid(QuartermasterError):
    """Quartermaster could not accept the request as sent (``request.invalid``)."""

    def __init__(self, job_id: str, error: str) -> None:
        super().__init__(f"request for job {job_id} is invalid: {error}")
        self.job_id = job_id
        self.error = error


class RequestFailed(QuartermasterError):
    """Quartermaster failed on the request every time it tried and dead-lettered it
    (``request.failed``): nothing of it was done. ``error_class`` names the failure's class (no
    message: the operators' logs and the dead letter say more). Sending it again may succeed once
    the cause is fixed; when an operator replays its dead letter instead, a job it grants then is
    released by this client."""

    def __init__(self, job_id: str, error_class: str) -> None:
        super().__init__(f"request for job {job_id} failed in Quartermaster: {error_class}")
        self.job_id = job_id
        self.error_class = error_class


class RequestConflict(QuartermasterError):
    """A ``request_id`` was reused with a different body (``request.conflict``)."""

    def __init__(self, job_id: str, request_id: str) -> None:
        super().__init__(f"request {request_id} of job {job_id} conflicts with an earlier one")
        self.job_id = job_id
        self.request_id = request_id


class UnexpectedReply(QuartermasterError):
    """A reply of a type that does not answer the request that was sent."""

    def __init__(self, job_id: str, reply_type: str, expected: str) -> None:
        super().__init__(f"job {job_id}: expected {expected}, got {reply_type}")
        self.job_id = job_id
        self.reply_type = reply_type


class ReplyUnreadable(QuartermasterError):
    """A reply addressed to this client is not a valid message of the contract."""


class ClientClosed(QuartermasterError):
    """The client was closed (or not started) while the request needed it."""


class SecretUndecryptable(QuartermasterError):
    """A sealed secret or session of a grant does not open with this client's private key."""


class NoUploadKey(QuartermasterError):
    """Quartermaster announced no key to seal session states to (``QM_SEALING_KEYS`` unset)."""


class SessionRejected(QuartermasterError):
    """Quartermaster did not keep an uploaded session (``session.rejected``): it is over the
    bounds of one session; ``detail`` names the counts, never a value."""

    def __init__(self, job_id: str, detail: str) -> None:
        super().__init__(f"job {job_id}: session not kept: {detail}")
        self.job_id = job_id
        self.detail = detail


class SessionDead(QuartermasterError):
    """The account's browser session is not logged in (the site's check URL says so)."""

    def __init__(self, job_id: str, detail: str) -> None:
        super().__init__(f"job {job_id}: {detail}")
        self.job_id = job_id


class LeaseLost(QuartermasterError):
    """The job's lease is gone (``job.lease_lost``): a stale token, an expired or ended job."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} lost its lease: {reason}")
        self.job_id = job_id
        self.reason = reason


class BrokerUnavailable(QuartermasterError):
    """The Kafka broker cannot be reached, or refused the client (at ``start``)."""

    def __init__(self, bootstrap_servers: object, detail: str) -> None:
        super().__init__(f"the Kafka broker at {bootstrap_servers} {detail}")
        self.bootstrap_servers = bootstrap_servers


class InvalidArgument(QuartermasterError, ValueError):
    """An argument the contract does not allow (``lease_seconds=-5``, a ``job_id`` that is no
    UUID…), refused before anything is sent. The message names each argument and what it takes,
    never the value given (it may be a secret or a session)."""

    def __init__(self, what: str, problems: list[str]) -> None:
        super().__init__(f"{what}: {'; '.join(problems)}")
        self.problems = problems
