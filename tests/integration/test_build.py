"""End to end: a locked project becomes an image in the real engine (and OCI layouts).

Every test here uses the engine, registry and bases (built by imgbuild) from ``dev/infra.sh``
(catalog names reach them through IMGBUILD_REGISTRY_MIRRORS) and a project locked by
real uv against the local package index.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import docker.errors
import pytest

from imagebuild.image.validate import validate_layout
from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import MakeProject, imgbuild

pytestmark = pytest.mark.docker

# Runs inside the image: every .py under site-packages must have an unchecked-hash pyc
# whose magic is the image interpreter's and whose source hash matches the file.
CHECK_PYC = r"""
import importlib.util, json, pathlib, sys
site = pathlib.Path(sys.argv[1])
missing, bad, count = [], [], 0
for py in sorted(site.rglob("*.py")):
    count += 1
    pyc = pathlib.Path(importlib.util.cache_from_source(str(py)))
    if not pyc.is_file():
        missing.append(str(py))
        continue
    data = pyc.read_bytes()
    if (data[:4] != importlib.util.MAGIC_NUMBER or data[4:8] != b"\x01\x00\x00\x00"
            or data[8:16] != importlib.util.source_hash(py.read_bytes())):
        bad.append(str(py))
print(json.dumps({"count": count, "missing": missing, "bad": bad, "v": sys.version_info[:2]}))
"""


def _run(infra: TestInfra, image: str, *args: str, entrypoint: str | None = None) -> str:
    output = infra.client.containers.run(
        image, list(args), entrypoint=entrypoint, network_mode="none", remove=True
    )
    return bytes(output).decode()


def _layers(layout: Path) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    return [layer["digest"] for layer in manifest["layers"]]


@pytest.mark.parametrize(
    ("base", "python"), [("distroless", "3.11"), ("debian-slim", "3.11"), ("distroless", "3.13")]
)
def test_project_runs_as_nonroot_without_network(
    docker_env: TestInfra,
    make_project: MakeProject,
    image_cleanup: list[str],
    tmp_path: Path,
    base: str,
    python: str,
) -> None:
    project = make_project()
    tag = f"imgbuild-test/demo-{base}:{python}"
    image_cleanup.append(tag)
    result = imgbuild(
        "build",
        project,
        "--tag",
        tag,
        "--base",
        base,
        "--python",
        python,
        "--cache-dir",
        tmp_path / "cache",
    )
    assert result.exit_code == 0, result.stderr
    assert f"loaded docker.io/{tag}" in result.stdout

    out = json.loads(_run(docker_env, tag, "arg1"))
    assert out == {
        "uid": 65532,
        "msg": "hello image",
        "red": "#f00",
        "exe": "/app/.venv/bin/python",
        "argv": ["arg1"],
    }
    attrs = docker_env.client.api.inspect_image(tag)
    config = attrs["Config"]
    assert config["User"] == "65532"
    assert config["WorkingDir"] == "/app"
    assert config["Entrypoint"] == ["/app/.venv/bin/demo-app"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"].startswith("/app/.venv/bin:")
    assert env["VIRTUAL_ENV"] == "/app/.venv"
    assert config["Labels"]["org.opencontainers.image.title"] == "demo-app"
    assert config["Labels"]["org.opencontainers.image.version"] == "0.1.0"
    assert config["Labels"]["org.opencontainers.image.licenses"] == "MIT"
    assert config["Labels"]["org.opencontainers.image.source"] == (
        "https://github.com/example/demo-app"
    )

    site = f"/app/.venv/lib/python{python}/site-packages"
    report = json.loads(
        _run(docker_env, tag, "-c", CHECK_PYC, site, entrypoint="/app/.venv/bin/python")
    )
    assert report["count"] >= 5
    assert report["missing"] == [] and report["bad"] == []
    assert report["v"] == [int(p) for p in python.split(".")]
    # The dependency's console script has a direct shebang (works without a shell).
    script = _run(
        docker_env,
        tag,
        "-c",
        "print(open('/app/.venv/bin/greet').readline())",
        entrypoint="/app/.venv/bin/python",
    )
    assert script.strip() == "#!/app/.venv/bin/python"
    # The dev group is left out by default.
    probe = _run(
        docker_env,
        tag,
        "-c",
        "import importlib.util as u; print(u.find_spec('extra_lib'))",
        entrypoint="/app/.venv/bin/python",
    )
    assert probe.strip() == "None"


def test_source_change_rebuilds_only_the_last_layer(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    cache = tmp_path / "cache"
    first, second = tmp_path / "first", tmp_path / "second"
    args = ("--base", "distroless", "--python", "3.11", "--cache-dir", cache)
    assert imgbuild("build", project, *args, "--output", f"oci:{first}").exit_code == 0
    source = project / "src" / "demo_app" / "__init__.py"
    source.write_text(source.read_text().replace("hello", "hullo"))
    result = imgbuild("build", project, *args, "--output", f"oci:{second}")
    assert result.exit_code == 0, result.stderr
    validate_layout(first)
    validate_layout(second)
    before, after = _layers(first), _layers(second)
    assert len(before) == len(after) >= 4
    assert before[:-1] == after[:-1]
    assert before[-1] != after[-1]


def test_locked_refuses_a_stale_lock_and_leaves_no_image(
    docker_env: TestInfra, make_project: MakeProject, image_cleanup: list[str], tmp_path: Path
) -> None:
    project = make_project()
    pyproject = project / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace(
            'dependencies = ["colours>=0.3"]', 'dependencies = ["colours>=0.3", "extra-lib>=2"]'
        )
    )
    tag = "imgbuild-test/stale:1"
    image_cleanup.append(tag)
    images_before = {i.id for i in docker_env.client.images.list(all=True)}
    cache = tmp_path / "cache"
    result = imgbuild("build", project, "--locked", "--tag", tag, "--cache-dir", cache)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: uv.lock is out of date with pyproject.toml")
    assert "extra-lib" in lines[0] and "uv lock" in lines[0]
    with pytest.raises(docker.errors.ImageNotFound):
        docker_env.client.images.get(tag)
    assert {i.id for i in docker_env.client.images.list(all=True)} == images_before
    # Refused before any download: nothing was fetched into the cache.
    assert not (cache / "wheels").exists() and not (cache / "blobs").exists()
    # --frozen takes the lock as it is.
    frozen = imgbuild(
        "build",
        project,
        "--frozen",
        "--output",
        f"oci:{tmp_path / 'out'}",
        "--cache-dir",
        cache,
        "--python",
        "3.11",
    )
    assert frozen.exit_code == 0, frozen.stderr
    assert "warning" not in frozen.stderr
    # Without either flag the stale lock is built too, with a warning that says why.
    default = imgbuild(
        "build",
        project,
        "--output",
        f"oci:{tmp_path / 'out2'}",
        "--cache-dir",
        cache,
        "--python",
        "3.11",
    )
    assert default.exit_code == 0, default.stderr
    assert "warning: uv.lock is out of date with pyproject.toml" in default.stderr


def test_same_lock_two_empty_caches_same_digest(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    digests = []
    for run in ("a", "b"):
        layout = tmp_path / f"layout-{run}"
        result = imgbuild(
            "build",
            project,
            "--python",
            "3.11",
            "--cache-dir",
            tmp_path / f"cache-{run}",
            "--output",
            f"oci:{layout}",
        )
        assert result.exit_code == 0, result.stderr
        validate_layout(layout)
        digests.append(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])
        assert f"digest: {digests[-1]}" in result.stdout
    assert digests[0] == digests[1]

    # --expect-digest: a third clean build checks itself against the published digest...
    args = ("build", project, "--python", "3.11", "--output", f"oci:{tmp_path / 'c'}")
    same = imgbuild(*args, "--cache-dir", tmp_path / "cache-c", "--expect-digest", digests[0])
    assert same.exit_code == 0, same.stderr
    # ...and a build that differs (another SOURCE_DATE_EPOCH) is refused before any output.
    other = tmp_path / "other"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOURCE_DATE_EPOCH", "1700000000")
        refused = imgbuild(
            "build",
            project,
            "--python",
            "3.11",
            "--output",
            f"oci:{other}",
            "--cache-dir",
            tmp_path / "cache-c",
            "--expect-digest",
            digests[0],
        )
    assert refused.exit_code == 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"not the expected {digests[0]}" in errors[0]
    assert not other.exists()


def test_pylock_and_uv_lock_give_the_same_image(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    """uv's PEP 751 export of the same lock selects the same wheels: same digest."""
    import shutil
    import subprocess

    project = make_project()
    cache = tmp_path / "cache"
    args = ("--python", "3.11", "--cache-dir", cache)
    from_uv = imgbuild("build", project, *args, "--output", f"oci:{tmp_path / 'uv'}")
    assert from_uv.exit_code == 0, from_uv.stderr
    uv = shutil.which("uv")
    assert uv is not None
    subprocess.run(
        [
            uv,
            "export",
            "--format",
            "pylock.toml",
            "-o",
            "pylock.toml",
            "--no-dev",
            "--frozen",
            "--quiet",
        ],
        cwd=project,
        check=True,
        capture_output=True,
    )
    from_pylock = imgbuild("build", project, *args, "--output", f"oci:{tmp_path / 'pylock'}")
    assert from_pylock.exit_code == 0, from_pylock.stderr
    assert "lock: pylock.toml" in from_pylock.stderr
    assert from_uv.stdout.splitlines()[-1] == from_pylock.stdout.splitlines()[-1]


def test_push_to_registry_then_run_from_it(
    docker_env: TestInfra, make_project: MakeProject, image_cleanup: list[str], tmp_path: Path
) -> None:
    """--output registry pushes every --tag (no daemon involved); the engine pulls and runs it."""
    project = make_project()
    ref = f"{docker_env.registry}/imgbuild-test/pushed:1"
    image_cleanup.append(ref)
    args = ("build", project, "--python", "3.11", "--tag", ref, "--output", "registry",
            "--cache-dir", tmp_path / "cache")  # fmt: skip
    result = imgbuild(*args)
    assert result.exit_code == 0, result.stderr
    digest = result.stdout.strip().splitlines()[-1].removeprefix("digest: ")
    assert f"pushed {ref}@{digest}" in result.stdout
    # Pushing again uploads nothing new and names the same digest.
    again = imgbuild(*args)
    assert f"pushed {ref}@{digest}" in again.stdout
    pulled = docker_env.client.images.pull(ref)
    assert digest in " ".join(pulled.attrs["RepoDigests"])
    output = docker_env.client.containers.run(ref, network_mode="none", remove=True)
    assert json.loads(bytes(output))["msg"] == "hello image"


def test_docker_load_sends_only_the_layers_the_engine_lacks(
    docker_env: TestInfra, make_project: MakeProject, image_cleanup: list[str], tmp_path: Path
) -> None:
    project = make_project()
    tag = "imgbuild-test/thin-load:1"
    image_cleanup.append(tag)
    args = ("--tag", tag, "--python", "3.11", "--cache-dir", tmp_path / "cache")
    first = imgbuild("build", project, *args)
    assert first.exit_code == 0, first.stderr
    # The standard library's pycs, the venv, colours, greeting and the project (with the
    # SBOM) are new to the engine; the built base's layer is too, unless an earlier image on
    # the same base brought it (the infra's distroless stand-in is this very base, byte for
    # byte).
    sent = re.search(r"docker: loading \((\d) of 6 layers to send\)", first.stderr)
    assert sent is not None and sent[1] in ("5", "6"), first.stderr
    source = project / "src" / "demo_app" / "__init__.py"
    source.write_text(source.read_text().replace('hello("image")', 'hello("again")'))
    second = imgbuild("build", project, *args)
    assert second.exit_code == 0, second.stderr
    # The image the tag named holds every layer but the project's.
    assert "docker: loading (1 of 6 layers to send)" in second.stderr
    assert json.loads(_run(docker_env, tag))["msg"] == "hello again"
    site = "/app/.venv/lib/python3.11/site-packages"
    report = json.loads(
        _run(docker_env, tag, "-c", CHECK_PYC, site, entrypoint="/app/.venv/bin/python")
    )
    assert report["missing"] == [] and report["bad"] == []
    # The built base's standard library has its pycs too (links such as sitecustomize.py
    # included), which Debian's postinst would have written.
    stdlib = json.loads(
        _run(
            docker_env,
            tag,
            "-c",
            CHECK_PYC,
            "/usr/lib/python3.11",
            entrypoint="/usr/bin/python3.11",
        )
    )
    assert stdlib["count"] > 500 and stdlib["missing"] == [] and stdlib["bad"] == []
