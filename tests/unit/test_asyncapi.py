"""`qm asyncapi`: an AsyncAPI 3 document of every topic, whose payload schemas are the models'.

Checked two ways: the document round-trips through FastStream's AsyncAPI 3.0.0 model, and
jsonschema validates real messages (made by the pydantic models) against its payload schemas.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from faststream.specification.asyncapi.v3_0_0.schema import ApplicationSchema
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from typer.testing import CliRunner

from app.cli import app
from app.kafka import TOPICS
from app.settings import Settings
from schemas import messages as wire

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SECRET = "S" * 43  # a lease secret's shape
KEY = "A" * 43 + "="  # a public key's shape


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("contract") / "asyncapi.json"
    result = CliRunner().invoke(app, ["asyncapi", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def payload_validator(document: dict[str, Any], channel: str) -> Draft202012Validator:
    """A validator of the channel's message payload, its $refs resolved in the document."""
    (message,) = document["channels"][channel]["messages"].values()
    name = message["$ref"].split("/")[-1]
    payload = document["components"]["messages"][name]["payload"]
    Draft202012Validator.check_schema(payload)
    registry: Registry = Registry().with_resource(
        "urn:asyncapi", Resource.from_contents(document, default_specification=DRAFT202012)
    )
    return Draft202012Validator({"$ref": "urn:asyncapi" + payload["$ref"]}, registry=registry)


def test_the_document_is_asyncapi_3_with_a_channel_for_every_topic(
    document: dict[str, Any],
) -> None:
    assert document["asyncapi"] == "3.0.0"
    prefix = Settings().topic_prefix
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {prefix + name for name, _ in TOPICS}
    actions = {name: op["action"] for name, op in document["operations"].items()}
    assert actions["requests"] == "receive" and actions["replies"] == "send"


def test_the_document_round_trips_through_faststreams_asyncapi_3_model(
    document: dict[str, Any],
) -> None:
    parsed = ApplicationSchema.model_validate(document)
    assert json.loads(parsed.to_json()) == document


def _messages() -> dict[str, list[wire.Message]]:
    request_id, job_id = uuid.uuid4(), "job-1"
    return {
        "requests": [
            wire.JobStart(
                request_id=request_id,
                job_id=job_id,
                site="board",
                collector="c1",
                public_key=base64.b64encode(bytes([9]) + bytes(31)).decode(),
            ),
            wire.JobFinish(
                request_id=request_id,
                job_id=job_id,
                lease_token=3,
                lease_secret=SECRET,
                outcome="blocked",
            ),
        ],
        "replies": [
            wire.JobQueued(request_id=request_id, job_id=job_id, position=2),
            wire.RequestInvalid(error="not JSON"),
        ],
        "events": [
            wire.LifecycleEvent(
                type="account.blocked", entity="account", id="7", site="board",
                status="BLOCKED", at=NOW,
            ),
            wire.LifecycleEvent(
                type="job.granted", entity="job", id=job_id, site="board", status="RUNNING",
                at=NOW, db_at=NOW, lease_token=9, account_id="7", lease_expires_at=NOW,
                capacity=2,
            ),
            wire.LifecycleEvent(
                type="capture.handed_off", entity="capture", id="cap-1", site="board",
                status="HANDED_OFF", at=NOW, db_at=NOW, job_id=job_id, handoff_token=12,
            ),
        ],
        "job-events": [
            wire.TerminalJobEvent(
                type="job.failed", job_id=job_id, site="board", collector="c1",
                status="FAILED", finished_at=NOW,
            )
        ],
        "captures": [wire.CaptureHandoff(capture_id="cap-1")],
    }  # fmt: skip


def test_what_the_models_send_is_valid_against_the_documents_payloads(
    document: dict[str, Any],
) -> None:
    for channel, examples in _messages().items():
        validator = payload_validator(document, channel)
        for example in examples:
            validator.validate(example.model_dump(mode="json"))


def test_what_the_models_refuse_the_document_refuses_too(document: dict[str, Any]) -> None:
    requests = payload_validator(document, "requests")
    start = {"type": "job.start", "v": 1, "request_id": str(uuid.uuid4()), "job_id": "j",
             "public_key": KEY}  # fmt: skip
    requests.validate({**start, "site": "board", "collector": "c1"})
    heartbeat = {"type": "job.heartbeat", "v": 1, "request_id": str(uuid.uuid4()), "job_id": "j",
                 "lease_token": 3, "lease_secret": SECRET}  # fmt: skip
    requests.validate(heartbeat)
    no_key = {k: v for k, v in start.items() if k != "public_key"}
    no_secret = {k: v for k, v in heartbeat.items() if k != "lease_secret"}
    for wrong in (
        {**start, "site": "board", "collector": "c1", "unknown": 1},  # unknown field
        {**start, "site": "Board!", "collector": "c1"},  # not a slug
        {**start, "type": "job.launch", "site": "board", "collector": "c1"},  # no such type
        {**no_key, "site": "board", "collector": "c1"},  # every grant seals to the key
        no_secret,  # a follow-up presents its lease's secret
        {**heartbeat, "lease_secret": "not a secret!"},
    ):
        assert not requests.is_valid(wrong), wrong
