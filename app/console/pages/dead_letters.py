"""Dead letters: by topic and error class, each redacted with its original coordinates; replay
after the dry run's preview."""

from __future__ import annotations

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
)
from app.core.operations import record_replay
from app.core.transaction import Tx
from app.dlt import redact, redact_bytes, redact_header
from app.dlt.letter_headers import PREFIX
from app.dlt.reader import DeadLetter, DltError, Selection, open_reader, sorted_letters, summarize
from app.dlt.replay import ReplayOptions, replay
from app.dlt.values import open_values
from app.kafka_headers import header

LIMIT = 100
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


def selection(values: Mapping[str, object]) -> Selection:
    """The filters of a page's query or a replay's form."""
    partition = _whole(values, "partition")
    return Selection(
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
    more = False
    try:
        async with open_reader(settings) as reader:
            name = await reader.resolve(request.path_params["topic"])
            plan = await reader.plan(name, chosen)
            async with aclosing(reader.select(plan, chosen)) as letters:
                async for letter in letters:
                    if len(found) == LIMIT:
                        more = True
                        break
                    found.append(letter)
        async with open_values(settings) as values:
            found = await values.restore(found)
    except DltError as exc:
        raise HTTPException(503, str(exc)) from None
    filters = {key: request.query_params.get(key, "") for key in FILTERS}
    return render(request, "dead_letter_topic.html", topic=name, more=more, filters=filters,
                  letters=[shown(letter) for letter in sorted_letters(found)])  # fmt: skip


async def replay_letters(request: Request) -> Response:
    """First the dry run's preview (what would go where) with a confirmation; then the replay,
    recorded as an event naming the operator."""
    form = await action_form(request)
    settings = console_state(request).settings
    topic = request.path_params["topic"]
    chosen = selection(form)
    filters = {key: str(form.get(key, "")) for key in FILTERS}
    back = f"/dead-letters/{topic}"
    try:
        if not confirmed(form):
            plan = await replay(settings, topic, chosen, ReplayOptions(dry_run=True))
            planned = [(shown(letter), target) for letter, target in plan.planned]
            return render(request, "replay_preview.html", report=plan, planned=planned,
                          filters=filters, action=request.url.path, back=back)  # fmt: skip
        report = await replay(settings, topic, chosen, ReplayOptions())
    except DltError as exc:
        raise HTTPException(503, str(exc)) from None
    chosen_text = ", ".join(f"{k}={v}" for k, v in filters.items() if v) or "all"
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
