"""The README's SDK example, run as written against the real processes and the demo's data, made
the way `qm dev --demo` makes it."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from app.devstack.dev import DEMO_SITE, add_demo
from app.settings import Settings
from tests.support.processes import QmProcess

ROOT = Path(__file__).resolve().parents[2]
MARKER = "test_newcomer_readme.py` runs this very block"


def readme_example() -> str:
    """The first Python block after the README's sentence that names this test."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.DOTALL)
    assert found is not None, "the README lost its SDK example"
    return found.group(1)


async def test_newcomer_the_readme_sdk_example_runs_as_written_against_the_demo(
    topics: Settings,
) -> None:
    assert await add_demo(topics), "the demo site was made here"
    # a newcomer's shell after `set -a; . ./.qm-dev.env; set +a`: nothing else of ours
    env = {k: v for k, v in os.environ.items() if not k.startswith("QM_")}
    env |= {
        "QM_KAFKA_BOOTSTRAP_SERVERS": topics.kafka_bootstrap_servers,
        "QM_TOPIC_PREFIX": topics.topic_prefix,
        "PYTHONPATH": str(ROOT),
    }
    with QmProcess(topics, "all") as processes:
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", readme_example()], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr + processes.output()[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == f"leased collector1@{DEMO_SITE}.example.com", done.stdout
    assert lines[1].startswith("captured ") and lines[2] == "finished SUCCEEDED", done.stdout
