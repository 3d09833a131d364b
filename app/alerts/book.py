"""Which alert causes fire, and what to post about them (pure logic, no I/O).

A cause is a string such as ``account_blocked:17`` or ``waiting:board``. Its first firing is posted
at once; while it keeps firing it is posted again at most every ``repeat_seconds``, saying how
many times it fired meanwhile (rate limit and de-duplication per cause); when it clears, one
recovery message says so and how long it lasted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Post:
    """A message to send: about ``cause``, firing or recovered."""

    cause: str
    text: str
    recovered: bool = False


@dataclass
class _Firing:
    text: str
    since: float
    posted_at: float
    repeats: int = 0  # firings since the last post


class AlertBook:
    """The causes that fire now; ``fire`` and ``clear`` say what (if anything) to post."""

    def __init__(self, repeat_seconds: float) -> None:
        self.repeat_seconds = repeat_seconds
        self._firing: dict[str, _Firing] = {}

    def fire(self, cause: str, text: str, now: float) -> Post | None:
        """``cause`` fires (again): a post for the first firing and once per repeat interval."""
        state = self._firing.get(cause)
        if state is None:
            self._firing[cause] = _Firing(text=text, since=now, posted_at=now)
            return Post(cause, text)
        state.text = text
        state.repeats += 1
        if now - state.posted_at < self.repeat_seconds:
            return None
        repeats, state.repeats, state.posted_at = state.repeats, 0, now
        return Post(cause, f"{text} (still firing: {repeats}x since the last message)")

    def clear(self, cause: str, now: float, text: str | None = None) -> Post | None:
        """``cause`` no longer fires: one recovery post if it was firing, else nothing."""
        state = self._firing.pop(cause, None)
        if state is None:
            return None
        lasted = round(now - state.since)
        return Post(cause, f"Recovered: {text or state.text} (after {lasted} s)", recovered=True)

    def firing(self, kind: str) -> list[str]:
        """The firing causes of one kind (the part before the first ``:``)."""
        return [cause for cause in self._firing if cause.split(":", 1)[0] == kind]

    def since_last_post(self, cause: str, now: float) -> float | None:
        state = self._firing.get(cause)
        return None if state is None else now - state.posted_at
