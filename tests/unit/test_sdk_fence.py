"""The SDK's import-linter fence forbids every module of ``app`` it may not import, new ones too."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# what the SDK may import of ours besides itself and the wire contract (``schemas``)
ALLOWED = {"app.sdk", "app.sealing"}


def fence() -> dict[str, object]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (contract,) = (c for c in contracts if c.get("source_modules") == ["app.sdk"])
    return dict(contract)


def test_the_fence_names_every_module_of_app_but_the_allowed() -> None:
    modules = {
        f"app.{path.stem}"
        for path in (ROOT / "app").iterdir()
        if (path.suffix == ".py" or (path / "__init__.py").exists())
        and path.stem not in ("__init__", "__main__")
    }
    forbidden = set(fence()["forbidden_modules"])  # type: ignore[call-overload]
    assert modules - ALLOWED - forbidden == set(), "add them to the SDK's forbidden_modules"
    assert forbidden & ALLOWED == set()


def test_the_fence_forbids_the_server_dependencies() -> None:
    forbidden = set(fence()["forbidden_modules"])  # type: ignore[call-overload]
    assert {"workers", "reapers", "sqlalchemy", "asyncpg", "faststream", "alembic", "typer"} <= (
        forbidden
    )
