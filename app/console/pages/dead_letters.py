"""Dead letters: by topic and error class, each redacted with its original coordinates; replay
after the dry run's preview."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from contextlib import aclosing

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.console.web import (
    act,
    action_form,
    confirmed,
    console_state,
    done,
    render,
    url_id,
)
from app.core.operations import record_replay
from app.core.transaction import Tx
from app.dlt import redact, redact_bytes, redact_header
from app.dlt.letter_headers import PREFIX
from app.dlt.reader import DeadLetter, DltError, Selection, open_reader, sorted_letters, summarize
from app.dlt.replay import ReplayOptions, replay
from app.dlt.values import open_values
from app.kafka_headers import header

LIMIT = 100  # dead letters a page or a preview shows (a preview counts the others)
SCAN_SECONDS = 10.0  # a topic page's scan: a filter matching nothing stops reading here
WIDTH = 400  # characters of a key, value or header shown
FILTERS = ("error_class", "key", "partition", "from_offset", "to_offset")


def _whole(values: Mapping[str, object], name: str) -> int | None:
    text = values.get(name)
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        number = int(text)
    except ValueError:
        raise HTTPException(400, f"{name} takes a whole number") from None
    if not 0 <= number < 2**63:
        raise HTTPException(400, f"{name} is out of range")
    return number


def _text(values: Mapping[str, object], name: str) -> str | None:
    text = values.get(name)
    return text.strip()[:1000] or None if isinstance(text, str) else None


def selection(values: Mapping[str, object], until_ms: int | None = None) -> Selection:
    """The filters of a page's query or a replay's form (``until_ms``: stamped before it)."""
    partition = _whole(values, "partition")
    return Selection(
        until_ms=until_ms,
        partitions=None if partition is None else frozenset({partition}),
        from_offset=_whole(values, "from_offset"),
        to_offset=_whole(values, "to_offset"),
        error_class=_text(values, "error_class"),
        key=_text(values, "key"),
    )


def shown(letter: DeadLetter) -> dict[str, object]:
    """A dead letter as the page shows it: redacted, with where it first failed."""
    return {
        "partition": letter.partition,
        "offset": letter.offset,
        "timestamp_ms": letter.timestamp_ms,
        "error_class": letter.error_class,
        "error_message": redact(header(letter.headers, PREFIX + "error_message") or ""),
        "original": ":".join(
            header(letter.headers, PREFIX + name) or "?"
            for name in ("original_topic", "original_partition", "original_offset")
        ),
        "key": redact_bytes(letter.key, WIDTH),
        "value": redact_bytes(letter.value, WIDTH),
        "headers": [(name, redact_header(name, value, WIDTH)) for name, value in letter.headers],
    }


async def topic_list(request: Request) -> Response:
    settings = console_state(request).settings
    try:
        async with open_reader(settings) as reader:
            summaries = await summarize(reader)
    except DltError as exc:
        raise HTTPException(503, str(exc)) from None
    return render(request, "dead_letters.html", summaries=summaries)


async def topic_page(request: Request) -> Response:
    settings = console_state(request).settings
    chosen = selection(request.query_params)
    found: list[DeadLetter] = []
    more = cut_short = False
    try:
        async with open_reader(settings) as reader:
            name = await reader.resolve(request.path_params["topic"])
            plan = await reader.plan(name, chosen)
            try:
                async with (
                    asyncio.timeout(SCAN_SECONDS),
                    aclosing(reader.select(plan, chosen)) as letters,
                ):
                    async for letter in letters:
                        if len(found) == LIMIT:
                            more = True
                            break
                        found.append(letter)
            except TimeoutError:
                cut_short = True
        async with open_values(settings) as values:
            found = await values.restore(found)
    except DltError as exc:
        raise HTTPException(503, str(exc)) from None
    filters = {key: request.query_params.get(key, "") for key in FILTERS}
    return render(request, "dead_letter_topic.html", topic=name, more=more, filters=filters,
                  cut_short=cut_short, scan_seconds=SCAN_SECONDS,
                  letters=[shown(letter) for letter in sorted_letters(found)])  # fmt: skip


class _Sent:
    """How many copies a replay had sent (or had under way) when it last said so."""

    sent = 0

    def start(self, total: int) -> None:
        pass

    def advance(self, scanned: int, sent: int) -> None:
        self.sent = sent


async def replay_letters(request: Request) -> Response:
    """First the dry run's preview (what would go where) with a confirmation; then the replay of
    what was stamped before the preview, recorded as an event naming the operator (one that
    fails partway too, with what it had sent)."""
    form = await action_form(request)
    settings = console_state(request).settings
    topic = request.path_params["topic"]
    filters = {key: str(form.get(key, "")) for key in FILTERS}
    back = f"/dead-letters/{url_id(topic)}"
    if not confirmed(form):
        # what the preview shows is what a confirmation sends: dead letters stamped later are not
        until = int(time.time() * 1000)
        try:
            plan = await replay(
                settings, topic, selection(form, until), ReplayOptions(dry_run=True)
            )
        except DltError as exc:
            raise HTTPException(503, str(exc)) from None
        planned = [(shown(letter), target) for letter, target in plan.planned[:LIMIT]]
        return render(request, "replay_preview.html", report=plan, planned=planned,
                      sending=len(plan.planned), filters={**filters, "until_ms": str(until)},
                      action=f"{back}/replay", back=back)  # fmt: skip
    chosen = selection(form, _whole(form, "until_ms"))
    chosen_text = ", ".join(f"{k}={v}" for k, v in filters.items() if v) or "all"
    progress = _Sent()
    try:
        report = await replay(settings, topic, chosen, ReplayOptions(), progress)
    except DltError as exc:
        summary = f"selected ({chosen_text}): failed after sending up to {progress.sent}: {exc}"
        await act(request, lambda tx: _record(tx, topic, redact(summary)))
        raise HTTPException(503, str(exc)) from None
    summary = (
        f"selected {report.selected} ({chosen_text}): replayed {report.replayed}, "
        f"already replayed {report.already_replayed}, not rearmed {len(report.not_rearmed)}"
    )
    await act(request, lambda tx: _record(tx, report.topic, summary))
    return done(request, f"{report.topic}: {summary}", back)


async def _record(tx: Tx, topic: str, summary: str) -> None:
    record_replay(tx, topic, summary)


routes = [
    Route("/dead-letters", topic_list, methods=["GET"]),
    Route("/dead-letters/{topic}", topic_page, methods=["GET"]),
    Route("/dead-letters/{topic}/replay", replay_letters, methods=["POST"]),
]
