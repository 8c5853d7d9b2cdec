"""``imgbuild dockerfile`` rendered (the build and run are in tests/integration)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from typer.testing import CliRunner

from imagebuild.cli import app
from imagebuild.pipeline.dockerfile import DockerfileRequest, default_uv_image, render_uv_dockerfile


def _project(root: Path, tool: str = "") -> Path:
    root.mkdir()
    (root / "pyproject.toml").write_text(
        textwrap.dedent("""\
        [project]
        name = "svc"
        version = "2.0"
        requires-python = ">=3.11"
        [project.scripts]
        svc = "svc:main"
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"
        """)
        + tool
    )
    (root / "uv.lock").write_text("version = 1\n")
    return root


def test_settings_reach_the_dockerfile(tmp_path: Path) -> None:
    tool = textwrap.dedent("""\
        [tool.imgbuild]
        base = "debian-slim"
        python = "3.12"
        extras = ["fast"]
        groups = ["prod"]
        user = "1000:1000"
        ports = [8080]
        labels = { "org.example.team" = "web" }
        cmd = ["--port", "8080"]
        """)
    text = render_uv_dockerfile(
        DockerfileRequest(
            project_dir=_project(tmp_path / "p", tool), mirrors={"docker.io": "mirror.test:5000"}
        )
    )
    assert text.count("FROM mirror.test:5000/library/python:3.12-slim") == 2
    assert f"COPY --from={default_uv_image()} /uv /bin/uv\n" in text
    assert default_uv_image().startswith("ghcr.io/astral-sh/uv:0.")
    assert "UV_PYTHON=/usr/local/bin/python3.12" in text
    assert "ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy" in text
    sync = '"/bin/uv", "sync", "--locked", "--no-dev", "--no-editable", '
    assert sync + '"--extra", "fast", "--group", "prod"]' in text
    for line in (
        "USER 1000:1000",
        "EXPOSE 8080/tcp",
        'LABEL "org.example.team"="web"',
        'ENTRYPOINT ["/app/.venv/bin/svc"]',
        'CMD ["--port", "8080"]',
        "WORKDIR /app",
    ):
        assert f"\n{line}\n" in text, line


def test_cli_needs_a_uv_lock_and_says_so_in_one_line(tmp_path: Path) -> None:
    project = _project(tmp_path / "p")
    (project / "uv.lock").unlink()
    result = CliRunner().invoke(app, ["dockerfile", str(project)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {project}: no uv.lock; the Dockerfile runs 'uv sync --locked', which reads "
        "it; run 'uv lock' in the project first"
    ]


def test_cli_uv_image_and_output_file(tmp_path: Path) -> None:
    project = _project(tmp_path / "p")
    out = tmp_path / "out" / "Dockerfile"
    result = CliRunner().invoke(
        app, ["dockerfile", str(project), "--uv-image", "local/uv:1", "-o", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == f"wrote {out}\n"
    assert "COPY --from=local/uv:1 /uv /bin/uv\n" in out.read_text()
