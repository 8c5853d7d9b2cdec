"""examples/github-actions: the workflow publishes to GHCR with GITHUB_TOKEN, and the
imgbuild command it runs is one the CLI accepts (parsed by click, not run)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from imagebuild.cli import app

WORKFLOW = Path(__file__).resolve().parent.parent / "examples/github-actions/publish-image.yml"


def _steps(text: str) -> list[dict[str, object]]:
    """The job's steps: with PyYAML when it is installed, else read off the text."""
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        return _steps_by_text(text)
    jobs = yaml.safe_load(text)["jobs"]
    (job,) = jobs.values()
    return list(job["steps"])


def _steps_by_text(text: str) -> list[dict[str, object]]:
    """Steps as ``- name/uses`` items with their ``run: |`` blocks (this file's layout)."""
    steps: list[dict[str, object]] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        item = re.match(r"^      - (\w+): (.*)$", line)
        if item:
            steps.append({item[1]: item[2]})
            continue
        if steps and (run := re.match(r"^        run: (.*)$", line)):
            body = run[1]
            if body == "|":
                block = []
                for follow in lines[number + 1 :]:
                    if follow.strip() and not follow.startswith("          "):
                        break
                    block.append(follow[10:])
                body = "\n".join(block).strip() + "\n"
            steps[-1]["run"] = body
    return steps


def test_the_workflow_publishes_to_ghcr_with_the_job_token() -> None:
    text = WORKFLOW.read_text()
    assert re.search(r"^permissions:\n  contents: read\n  packages: write\n", text, re.M)
    assert "secrets.GITHUB_TOKEN" in text
    steps = _steps(text)
    assert steps[0]["uses"] == "actions/checkout@v4"
    login = next(s for s in steps if "docker login" in str(s.get("run", "")))
    assert "docker login ghcr.io" in str(login["run"]) and "--password-stdin" in str(login["run"])
    # The source label links the package to its repository: checked against GITHUB_REPOSITORY.
    label = next(s for s in steps if "source label" in str(s.get("name", "")))
    assert "GITHUB_REPOSITORY" in str(label["run"]) and "[project.urls] Source" in str(label["run"])


def test_the_workflow_runs_a_valid_imgbuild_command() -> None:
    steps = _steps(WORKFLOW.read_text())
    (run,) = [str(s["run"]) for s in steps if "uvx imgbuild" in str(s.get("run", ""))]
    (line,) = [ln for ln in run.splitlines() if ln.startswith("uvx imgbuild ")]
    values = {"$image": "ghcr.io/owner/repo", "$GITHUB_SHA": "0" * 40}
    for name, value in values.items():
        line = line.replace(name, value)
    args = shlex.split(line)[2:]
    assert args[0] == "build" and "--push" in args and "--locked" in args
    # typer's own command objects (click's API): make_context parses, it does not run.
    group = typer.main.get_command(app)
    with group.make_context("imgbuild", list(args)) as ctx:
        name, command, rest = group.resolve_command(ctx, [args[0], *ctx.args])  # type: ignore[attr-defined]
        assert name == "build" and command is not None
        # Parsing only: options checked, the command's callback not called.
        sub = command.make_context(name, rest, parent=ctx)
    assert sub.params["push"] is True and sub.params["locked"] is True
    assert list(sub.params["tag"]) == [
        "ghcr.io/owner/repo:" + "0" * 40,
        "ghcr.io/owner/repo:latest",
    ]
    # A typo in an option would be refused the same way.
    with pytest.raises(Exception, match="--pushh") as refused:
        command.make_context(name, ["--pushh"], parent=ctx)
    assert type(refused.value).__name__ == "NoSuchOption"


def test_the_label_check_passes_only_for_this_repository(tmp_path: Path) -> None:
    steps = _steps(WORKFLOW.read_text())
    run = next(str(s["run"]) for s in steps if "source label" in str(s.get("name", "")))
    script = run.split("<<'PY'\n", 1)[1].rsplit("PY\n", 1)[0]
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n[project.urls]\nSource = "https://github.com/Owner/Repo"\n'
    )

    def check(repository: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "GITHUB_REPOSITORY": repository}
        return subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
            text=True, check=False,
        )  # fmt: skip

    assert check("owner/repo").returncode == 0
    refused = check("owner/other")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        'pyproject.toml: set [project.urls] Source = "https://github.com/owner/other"'
    )
