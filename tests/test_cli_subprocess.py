"""Every command as a real process: the installed entry point, its help, and its answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imagebuild import __version__

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("build", "lock", "bases", "version", "inspect", "init", "verify", "dockerfile", "plan")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagebuild", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
    )  # fmt: skip


def test_the_top_level_help_lists_every_command() -> None:
    listed = _run("--help")
    assert listed.returncode == 0
    for command in COMMANDS:
        assert f" {command} " in listed.stdout, command
    assert "[" not in listed.stdout.split("Commands")[1].replace("─", ""), "markup ate a word"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_answers_help(command: str) -> None:
    result = _run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"Usage: python -m imagebuild {command}" in result.stdout


def test_version_and_bases_answer() -> None:
    assert _run("version").stdout.strip() == __version__
    bases = _run("bases").stdout.splitlines()
    assert any(line.startswith("distroless") for line in bases)
    assert any(line.startswith("debian-slim") for line in bases)


def test_dockerfile_renders_for_an_example() -> None:
    result = _run("dockerfile", "examples/fastapi-service")
    assert result.returncode == 0, result.stderr
    assert '"sync", "--locked"' in result.stdout and 'ENTRYPOINT ["/app/.venv/bin/hello-api"]' in (
        result.stdout
    )


def test_a_bad_option_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = _run("build", str(tmp_path), "--compile-with", "nonsense")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --compile-with 'nonsense': unknown choice; use auto, host or image"
    ]
