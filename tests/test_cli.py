"""The CLI boundary: bad input is one line on stderr and exit 1, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from imagebuild import cli
from imagebuild.cli import app


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr


def _project(tmp_path: Path, tool: str = "") -> Path:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "1"\n' + tool)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--output", "tarball"], "error: --output 'tarball': unknown output; use docker"),
        (["--output", "oci"], "error: --output 'oci': needs a path"),
        (["--python", "3"], "error: --python: Python version '3' must look like '3.11'"),
        (["--locked", "--frozen"], "error: --locked and --frozen cannot be used together"),
        (["--compile-with", "jit"], "error: --compile-with 'jit': unknown choice"),
        (["--platform", "windows/amd64"], "error: --platform 'windows/amd64': not a platform"),
        (["--platform", "linux"], "error: --platform 'linux': not a platform"),
        (
            ["--platform", "linux/arm64", "--platform", "linux/arm64"],
            "error: --platform names a platform twice",
        ),
        (
            ["--platform", "linux/amd64", "--platform", "linux/arm64", "-o", "context:x"],
            "error: --output context takes one platform, and 2 were given",
        ),
        (["--expect-digest", "abc"], "error: --expect-digest 'abc': not a sha256 digest"),
        (
            ["--platform", "linux/amd64,linux/arm64"],
            "error: --output docker takes one platform, and 2 were given",
        ),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], expected: str) -> None:
    code, stderr = _run("build", str(_project(tmp_path)), *args)
    assert code == 1
    assert stderr.startswith(expected), stderr
    assert len(stderr.strip().splitlines()) == 1


def test_no_pyproject(tmp_path: Path) -> None:
    code, stderr = _run("build", str(tmp_path))
    assert code == 1
    assert "no pyproject.toml" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--locked", "--frozen"])
def test_no_lock_with_locked_or_frozen_says_how_to_make_one(tmp_path: Path, flag: str) -> None:
    code, stderr = _run("build", str(_project(tmp_path)), flag, "--cache-dir", str(tmp_path / "c"))
    assert code == 1
    assert stderr.strip() == (
        f"error: {tmp_path}: no pylock.toml or uv.lock to build from; "
        "run 'imgbuild lock' (or 'uv lock'), or drop --locked/--frozen"
    )
    assert not (tmp_path / "c").exists()


def test_bad_tool_table(tmp_path: Path) -> None:
    code, stderr = _run("build", str(_project(tmp_path, '[tool.imgbuild]\nuser = ["x"]\n')))
    assert code == 1
    assert "tool.imgbuild.user: expected a user name or uid" in stderr


def test_bad_source_date_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    code, stderr = _run("build", str(_project(tmp_path)))
    assert code == 1
    assert "SOURCE_DATE_EPOCH='yesterday' is not a number" in stderr


def test_bases_lists_the_catalog() -> None:
    result = CliRunner().invoke(app, ["bases"])
    assert result.exit_code == 0
    assert "gcr.io/distroless/python3-debian12:latest" in result.stdout
    assert "python:3.12-alpine" in result.stdout


def _exits(monkeypatch: pytest.MonkeyPatch, code: object, *, threads: int = 1) -> list[str]:
    """Run ``cli.main`` over a command that ends with ``SystemExit(code)`` while ``threads``
    threads run (the session's servers are not counted); what it did."""
    done: list[str] = []
    monkeypatch.setattr(cli.threading, "active_count", lambda: threads)

    def command() -> None:
        raise SystemExit(code)

    def leave(status: int) -> None:
        done.append(f"_exit {status}")
        raise SystemExit(status)  # os._exit would end pytest itself

    monkeypatch.setattr(cli, "click_command", lambda: command)
    monkeypatch.setattr(cli.atexit, "_run_exitfuncs", lambda: done.append("atexit"))
    monkeypatch.setattr(cli.os, "_exit", leave)
    with pytest.raises(SystemExit) as ended:
        cli.main()
    done.append(f"status {ended.value.code}")
    return done


def test_main_leaves_at_once_after_the_exit_handlers_when_no_other_thread_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exits(monkeypatch, 3) == ["atexit", "_exit 3", "status 3"]
    assert _exits(monkeypatch, None) == ["atexit", "_exit 0", "status 0"]
    assert _exits(monkeypatch, "no such project") == ["atexit", "_exit 1", "status 1"]
    assert capsys.readouterr().err == "no such project\n"


def test_main_exits_as_usual_while_another_thread_still_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The interpreter's own exit then waits for the thread: no handler is run early.
    assert _exits(monkeypatch, 2, threads=2) == ["status 2"]
