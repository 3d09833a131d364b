"""What fires an alert and what clears it (the `alerts` process, ``workers.alerts``, runs it).

| cause                    | fires when                                             | clears when                          |
| ------------------------ | ------------------------------------------------------ | ------------------------------------ |
| ``account_blocked:<id>`` | an ``account.blocked`` event, the account still BLOCKED | the account is no longer BLOCKED     |
| ``account_retired:<id>`` | an ``account.retired`` event (the site's ``--retire-after-blocks``), the account still INACTIVE | an operator returned it |
| ``dead_letters:<topic>`` | a record arrives on a dead-letter topic                | ``alert_repeat_seconds`` without one |
| ``waiting:<site>``       | the site's oldest waiting job waited > ``alert_wait_seconds`` | no job waits that long          |
| ``outbox_lag``           | the oldest unpublished outbox row is > ``alert_outbox_lag_seconds`` old | it is not           |

Events and dead letters are consumed as they come (consumer group ``alert_consumer_group``, from
the earliest record on its first start, so what is still unresolved is reported once);
``run_once`` checks the database every ``alert_check_seconds``. Times of waits and lag come from
the database clock.
"""

from __future__ import annotations

import json
import time

import structlog

from app.alerts.book import AlertBook, Post
from app.alerts.slack import Notifier
from app.dlt.letter_headers import PREFIX as DLT_PREFIX
from app.kafka import TOPICS
from app.kafka_headers import header
from app.settings import Settings
from app.store import Database
from app.store.accounts import account_statuses
from app.store.job_sweeps import oldest_waiters
from app.store.outbox import backlog

log = structlog.get_logger()

# account events that fire an alert: its cause, the status it stays firing in, and what it says
ACCOUNT_ALERTS = {
    "account.blocked": ("account_blocked", "BLOCKED", "blocked"),
    "account.retired": ("account_retired", "INACTIVE", "retired"),
}


class AlertWatch:
    """Turns events, dead letters and database checks into posts through one ``AlertBook``."""

    def __init__(self, settings: Settings, db: Database, notifier: Notifier) -> None:
        self.settings = settings
        self.db = db
        self.notifier = notifier
        self.book = AlertBook(settings.alert_repeat_seconds)
        self._last_dead_letter: dict[str, float] = {}

    # --- what arrives on the topics ---------------------------------------------------------

    async def on_event(self, value: bytes) -> list[Post]:
        """An event of ``qm.events``: a blocked (retired) account fires if it is still blocked
        (out of service)."""
        try:
            event = json.loads(value)
        except ValueError:
            return []
        kind = event.get("type") if isinstance(event, dict) else None
        if kind not in ACCOUNT_ALERTS:
            return []
        if event.get("operator"):  # an operator's own block (the console) is no news to them
            return []
        cause, status, what = ACCOUNT_ALERTS[kind]
        account_id = int(event["id"])
        async with self.db.transaction() as conn:
            still = (await account_statuses(conn, [account_id])).get(account_id) == status
        if not still:
            return []
        text = f"Account {account_id} of site {event.get('site')} is {what}"
        if kind == "account.retired":
            text += f" after {event.get('reason')}; `qm accounts unblock` returns it"
        if event.get("job_id"):
            text += f" (reported by job {event['job_id']})"
        return await self._send(self.book.fire(f"{cause}:{account_id}", text, _now()))

    async def on_dead_letter(self, topic: str, headers: list[tuple[str, bytes]]) -> list[Post]:
        """A dead letter arrived on ``topic``."""
        self._last_dead_letter[topic] = _now()
        error = header(headers, f"{DLT_PREFIX}error_class") or "unknown error"
        text = f"Dead letters arrive on {topic} (latest: {error}); see `qm dlt ls`"
        return await self._send(self.book.fire(f"dead_letters:{topic}", text, _now()))

    # --- what the database says ------------------------------------------------------------

    async def run_once(self) -> list[Post]:
        """Check waits, outbox lag, blocked accounts and dead-letter quiet; send what changed."""
        now = _now()
        settings = self.settings
        async with self.db.transaction() as conn:
            waits = await oldest_waiters(conn, settings.alert_wait_seconds)
            lag = await backlog(conn)
            watched = {
                cause: [int(c.split(":")[1]) for c in self.book.firing(cause)]
                for cause, _, _ in ACCOUNT_ALERTS.values()
            }
            ids = [i for firing in watched.values() for i in firing]
            statuses = await account_statuses(conn, ids) if ids else {}
        posts: list[Post | None] = []
        waiting = {f"waiting:{w['site']}": w for w in waits}
        for cause, w in waiting.items():
            text = (
                f"Site {w['site']}: {w['waiting']} job(s) waiting, the oldest for "
                f"{round(w['oldest_seconds'])} s (threshold {settings.alert_wait_seconds:g} s)"
            )
            posts.append(self.book.fire(cause, text, now))
        posts += [self.book.clear(c, now) for c in self.book.firing("waiting") if c not in waiting]
        if lag.oldest_age_seconds > settings.alert_outbox_lag_seconds:
            text = (
                f"Outbox lag: {lag.rows} row(s) unpublished, the oldest "
                f"{round(lag.oldest_age_seconds)} s old (threshold "
                f"{settings.alert_outbox_lag_seconds:g} s); is a relay running?"
            )
            posts.append(self.book.fire("outbox_lag", text, now))
        else:
            posts.append(self.book.clear("outbox_lag", now))
        for cause, status, what in ACCOUNT_ALERTS.values():
            for account_id in watched[cause]:
                if statuses.get(account_id) != status:
                    now_status = statuses.get(account_id, "removed")
                    text = f"Account {account_id} is no longer {what} ({now_status})"
                    posts.append(self.book.clear(f"{cause}:{account_id}", now, text))
        for cause in self.book.firing("dead_letters"):
            topic = cause.split(":", 1)[1]
            if now - self._last_dead_letter.get(topic, 0.0) >= settings.alert_repeat_seconds:
                text = f"No new dead letters on {topic} for {settings.alert_repeat_seconds:g} s"
                posts.append(self.book.clear(cause, now, text))
        return await self._send(*posts)

    async def _send(self, *posts: Post | None) -> list[Post]:
        sent = [post for post in posts if post is not None]
        for post in sent:
            await self.notifier.send(post)
        return sent


def _now() -> float:
    return time.monotonic()


def dead_letter_topics(settings: Settings) -> list[str]:
    return [settings.topic(name) for name, _ in TOPICS if name.endswith(".dlt")]
