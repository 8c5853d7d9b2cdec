"""`imgbuild lock` on the examples, against live PyPI, checked against uv.

For one target (CPython 3.11, manylinux_2_36 x86_64), the (name, version) set that
imgbuild's pylock.toml installs must equal what `uv pip compile` resolves for the same
target at the same moment. Marked ``pypi``: these talk to the live index.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from imagebuild.lock.load import load_lock
from imagebuild.lock.select import select_packages
from imagebuild.target.platform import TargetPlatform
from tests.integration.conftest import imgbuild

pytestmark = pytest.mark.pypi

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TARGET = TargetPlatform(python_version=(3, 11), libc_version=(2, 36), arch="x86_64")


@pytest.fixture(scope="module")
def lock_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One imgbuild cache for these tests (index pages and metadata are fetched once)."""
    return tmp_path_factory.mktemp("lock-cache")


def _uv_pins(project: Path) -> set[tuple[str, str]]:
    uv = shutil.which("uv")
    assert uv is not None, "uv is required (dev/test installs it)"
    out = subprocess.run(
        [
            uv,
            "pip",
            "compile",
            "pyproject.toml",
            "--python-version",
            "3.11",
            "--python-platform",
            "x86_64-manylinux_2_36",
            "--no-header",
            "--no-annotate",
            "--quiet",
            "--no-config",
        ],
        cwd=project,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    pins = set()
    for line in out.splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            pins.add((re.sub(r"[-_.]+", "-", match[1]).lower(), match[2]))
    return pins


@pytest.mark.parametrize("example", ["fastapi-service", "numeric-analysis"])
def test_pins_match_uv_pip_compile(example: str, tmp_path: Path, lock_cache: Path) -> None:
    project = tmp_path / example
    shutil.copytree(
        EXAMPLES / example, project, ignore=shutil.ignore_patterns(".venv", "uv.lock", "pylock*")
    )
    result = imgbuild("lock", project, "--python", "3.11", "--cache-dir", lock_cache)
    assert result.exit_code == 0, result.stderr
    lock = load_lock(project / "pylock.toml")
    ours = {(p.name, str(p.version)) for p in select_packages(lock, target=TARGET)}
    assert ours == _uv_pins(project)

    # The lock is deterministic and current: locking again changes nothing.
    text = (project / "pylock.toml").read_text()
    again = imgbuild("lock", project, "--python", "3.11", "--cache-dir", lock_cache)
    assert again.exit_code == 0, again.stderr
    assert (project / "pylock.toml").read_text() == text
    check = imgbuild("lock", project, "--check", "--python", "3.11", "--cache-dir", lock_cache)
    assert check.exit_code == 0, check.stderr
