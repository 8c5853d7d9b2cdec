"""The smaller commands end to end: init, inspect and --push, in-process and as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from imagebuild.cli import app
from imagebuild.commands.init import add_settings_table, render_settings_table
from imagebuild.image.mutate import build_index
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.project.settings import _KNOWN, parse_settings
from imagebuild.sinks.layout import write_oci_archive, write_oci_layout
from imagebuild.sinks.remote import RegistryClient
from tests.fixtures.registry_server import LocalRegistry
from tests.test_registry import small_image

IMGBUILD = Path(sys.executable).parent / "imgbuild"

PYPROJECT = (
    "# my project\r\n"
    '[project]\r\nname = "demo"   # keep this comment\r\nversion = "1"\r\n\r\n'
    "[tool.uv]\r\ndev-dependencies = []\r\n"
)


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def run_process(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return subprocess.run(
        [str(IMGBUILD), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=False,
    )


# -- init ---------------------------------------------------------------------------------


def test_init_appends_a_commented_table_and_keeps_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_bytes(PYPROJECT.encode())
    path.chmod(0o644)
    code, stdout, stderr = run("init", tmp_path)
    assert (code, stderr) == (0, "")
    assert stdout == f"added a [tool.imgbuild] table to {path}\n"
    data = path.read_bytes()
    assert data.startswith(PYPROJECT.encode())  # the file as it was, byte for byte
    added = data[len(PYPROJECT) :].decode()
    assert added.startswith("\r\n[tool.imgbuild]\r\n# imgbuild settings")
    assert "\n" not in added.replace("\r\n", "")  # the file's own line endings
    assert path.stat().st_mode & 0o777 == 0o644
    # Every key it names is one the settings reader knows, and uncommented they are valid.
    import tomllib

    uncommented = "\n".join(
        line.removeprefix("# ").split("  #")[0]
        for line in render_settings_table().splitlines()
        if not line.startswith("# imgbuild")
    )
    table = tomllib.loads(uncommented)["tool"]["imgbuild"]
    assert set(table) == _KNOWN
    parse_settings(table)


def test_init_refuses_a_second_table_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "x"\n\n[tool.imgbuild]\nbase = "debian-slim"\n')
    before = path.read_bytes()
    code, stdout, stderr = run("init", tmp_path)
    assert code == 1 and stdout == ""
    assert stderr == (
        f"error: {path}: [tool.imgbuild] is already there; nothing was changed; "
        "edit it by hand (the README's settings reference lists every key)\n"
    )
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tool = { uv = {} }\n", "a [tool.imgbuild] table cannot be added to this file"),
        ("[project\n", "not valid TOML"),
    ],
)
def test_init_refuses_what_it_cannot_extend(text: str, expected: str) -> None:
    with pytest.raises(Exception, match=expected.replace("[", r"\[")):
        add_settings_table(text, "pyproject.toml")


def test_init_without_a_pyproject(tmp_path: Path) -> None:
    code, _, stderr = run("init", tmp_path)
    assert code == 1
    assert stderr.startswith(f"error: {tmp_path}: no pyproject.toml; ")
    assert len(stderr.splitlines()) == 1


def test_init_as_a_subprocess(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "1"')
    done = run_process("init", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "pyproject.toml").read_text()
    assert text.startswith('[project]\nname = "x"\nversion = "1"\n\n[tool.imgbuild]\n')
    again = run_process("init", cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.startswith("error: ") and len(again.stderr.splitlines()) == 1


# -- inspect ------------------------------------------------------------------------------


def _expected_rows(image_layers: tuple[object, ...], names: list[str]) -> list[str]:
    return [
        f"{layer.digest:<71}  {layer.size:>10}  imgbuild: {name}"  # type: ignore[attr-defined]
        for layer, name in zip(image_layers, names, strict=True)
    ]


def test_inspect_layouts_archives_and_indexes(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    amd = small_image(store, tmp_path, name="app")
    arm = small_image(store, tmp_path, name="app", arch="arm64")
    write_oci_layout(amd, tmp_path / "one", ref_name="v1")
    write_oci_archive(amd, tmp_path / "one.tar", ref_name="v1")
    write_oci_layout(build_index([amd, arm], store), tmp_path / "multi", ref_name="v1")
    rows = _expected_rows(amd.layers, ["app"])

    for target in (f"oci:{tmp_path / 'one'}", f"oci-archive:{tmp_path / 'one.tar'}"):
        code, stdout, stderr = run("inspect", target)
        assert (code, stderr) == (0, ""), stderr
        size = sum(layer.size for layer in amd.layers)
        assert stdout.splitlines() == [
            f"{target}  {amd.digest}  linux/amd64  1 layers, {size} bytes",
            f"{'DIGEST':<71}  {'SIZE':>10}  CREATED BY",
            *rows,
        ]

    code, stdout, _ = run("inspect", f"oci:{tmp_path / 'multi'}", "--platform", "linux/arm64")
    assert code == 0
    assert stdout.splitlines()[0].startswith(f"oci:{tmp_path / 'multi'}  {arm.digest}  linux/arm64")
    code, _, stderr = run("inspect", f"oci:{tmp_path / 'multi'}", "--platform", "linux/s390x")
    assert code == 1
    assert stderr == (
        f"error: oci:{tmp_path / 'multi'}: no image for linux/s390x; "
        "pick one with --platform os/arch\n"
    )


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("oci:", "error: 'oci:': needs a path; write oci:PATH"),
        ("oci:/nonexistent/layout", "error: OCI layout /nonexistent/layout is not a directory"),
        ("oci-archive:/nonexistent.tar", "error: oci-archive:/nonexistent.tar: cannot read"),
        ("Not A Ref", "error: "),
    ],
)
def test_inspect_bad_targets_are_one_line(target: str, expected: str) -> None:
    code, stdout, stderr = run("inspect", target)
    assert code == 1 and stdout == ""
    assert stderr.startswith(expected), stderr
    assert len(stderr.splitlines()) == 1


def test_inspect_a_registry_image_in_process_and_as_a_subprocess(
    local_registry: LocalRegistry, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    amd = small_image(store, tmp_path, name="served")
    arm = small_image(store, tmp_path, name="served", arch="arm64")
    ref = ImageReference.parse(f"{local_registry.host}/test/inspected:v1")
    with httpx.Client(trust_env=False) as http:
        RegistryClient(http).push_index(build_index([amd, arm], store), ref)
    rows = _expected_rows(arm.layers, ["served"])

    code, stdout, stderr = run("inspect", str(ref), "--platform", "linux/arm64")
    assert (code, stderr) == (0, ""), stderr
    assert stdout.splitlines()[0].startswith(f"{ref}  {arm.digest}  linux/arm64  1 layers")
    assert stdout.splitlines()[2:] == rows

    done = run_process("inspect", str(ref))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith(f"{ref}  {amd.digest}  linux/amd64")
    assert done.stdout.splitlines()[2:] == _expected_rows(amd.layers, ["served"])

    missing = run_process("inspect", f"{local_registry.host}/test/inspected:nope")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1


# -- --push -------------------------------------------------------------------------------


def test_push_is_output_registry(tmp_path: Path) -> None:
    from imagebuild.cli import _outputs

    assert _outputs(None, push=False) == ["docker"]
    assert _outputs(None, push=True) == ["registry"]
    assert _outputs(["oci:x"], push=True) == ["oci:x", "registry"]
    assert _outputs(["registry"], push=True) == ["registry"]
    # --push with several platforms is accepted (a registry takes an index), where the
    # default docker output is refused before any work.
    project = tmp_path / "p"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "1"\n')
    args = ["build", str(project), "--platform", "linux/amd64,linux/arm64", "--frozen"]
    _, _, refused = run(*args)
    assert "--output docker takes one platform" in refused
    code, _, stderr = run(*args, "--push", "--cache-dir", str(tmp_path / "c"))
    assert code == 1
    assert "takes one platform" not in stderr
    assert "no pylock.toml or uv.lock to build from" in stderr


def test_help_lists_the_commands() -> None:
    done = run_process("--help")
    assert done.returncode == 0
    for command in ("build", "lock", "inspect", "init"):
        assert command in done.stdout
    assert "--push" in run_process("build", "--help").stdout
