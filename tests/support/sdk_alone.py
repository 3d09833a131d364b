"""The collector SDK installed alone (``make sdk``): its virtual environment, checked current."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "in_sdk"
# what the client install carries that tests run: it must be the worktree's, not an older build
SHIPPED = (
    "app/sdk",
    "app/sealing.py",
    "app/qm.py",
    "app/__main__.py",
    "schemas",
)


def sdk_venv() -> Path:
    """The SDK's virtual environment; the test fails (never skips) when it is missing or older
    than the sources."""
    venv = Path(os.environ.get("QM_SDK_VENV") or ROOT / ".venv-sdk")
    if not (venv / "bin" / "python").exists():
        pytest.fail(f"the SDK is not installed in {venv}: run `make sdk` (make test does)")
    stale = [path for path in SHIPPED if _differs(ROOT / path, site_packages(venv) / path)]
    if stale:
        pytest.fail(f"{venv} holds an older {', '.join(stale)}: run `make sdk` (make test does)")
    return venv


def site_packages(venv: Path) -> Path:
    """Where the venv's python installs packages."""
    out = run(venv, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    return Path(out.stdout.strip())


def installed(venv: Path) -> set[str]:
    """The distributions installed in ``venv``, by normalized name, as its pip lists them."""
    out = run(venv, "-m", "pip", "list", "--format=json", "--disable-pip-version-check")
    return {row["name"].lower().replace("_", "-") for row in json.loads(out.stdout)}


def run(venv: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``venv``'s python with ``args``, isolated from this checkout (no ``PYTHONPATH``, run from
    the SDK scripts' folder, ``-I``): it imports what the venv installed, nothing else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QM_"))}
    return subprocess.run(
        [str(venv / "bin" / "python"), "-I", *args],
        cwd=SCRIPTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _differs(source: Path, copy: Path) -> bool:
    if source.is_file():
        return not copy.is_file() or not filecmp.cmp(source, copy, shallow=False)
    sources = sorted(p.relative_to(source) for p in source.rglob("*.py"))
    return any(_differs(source / p, copy / p) for p in sources)
