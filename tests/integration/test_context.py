"""`--output context:DIR`: a Dockerfile and one directory per layer, for `docker build`.

The context is built by the real engine's own builder; the image it gives must hold the
same files (content, mode, link targets) and config as the image imgbuild loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import MakeProject, imgbuild

pytestmark = pytest.mark.docker

# Runs inside an image: every entry under /app, with its kind, mode and content hash.
TREE = r"""
import hashlib, json, os, stat
out = {}
for top, dirs, files in os.walk("/app"):
    for name in dirs + files:
        path = os.path.join(top, name)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            out[path] = ["link", os.readlink(path)]
        elif stat.S_ISDIR(st.st_mode):
            out[path] = ["dir", oct(st.st_mode & 0o7777)]
        else:
            with open(path, "rb") as f:
                out[path] = ["file", oct(st.st_mode & 0o7777), hashlib.sha256(f.read()).hexdigest()]
print(json.dumps(out, sort_keys=True))
"""

CONFIG_KEYS = ("Entrypoint", "Cmd", "Env", "User", "WorkingDir", "Labels", "ExposedPorts")


def _tree(infra: TestInfra, image: str) -> dict[str, list[str]]:
    output = infra.client.containers.run(
        image,
        ["-c", TREE],
        entrypoint="/app/.venv/bin/python",
        user="0",
        network_mode="none",
        remove=True,
    )
    return json.loads(bytes(output))


def _config(infra: TestInfra, image: str) -> dict[str, object]:
    """The config fields both images set, compared by meaning: the variables as a mapping
    (their order differs), and no Cmd written as an empty list or as null alike."""
    config = infra.client.api.inspect_image(image)["Config"]
    out = {key: config.get(key) for key in CONFIG_KEYS}
    out["Env"] = dict(item.split("=", 1) for item in config["Env"])
    out["Cmd"] = config.get("Cmd") or None
    return out


def test_docker_build_of_the_context_gives_the_same_files_and_config(
    docker_env: TestInfra, make_project: MakeProject, image_cleanup: list[str], tmp_path: Path
) -> None:
    project = make_project(
        tool='\n[tool.imgbuild]\nbase = "distroless"\nports = [8000]\n'
        'env = { GREETING = "a $HOME \\"b\\"" }\n'
    )
    ours, theirs = "imgbuild-test/context:ours", "imgbuild-test/context:docker-build"
    image_cleanup.extend([ours, theirs])
    context = tmp_path / "context"
    result = imgbuild(
        "build",
        project,
        "--tag",
        ours,
        "--output",
        "docker",
        "--output",
        f"context:{context}",
        "--cache-dir",
        tmp_path / "cache",
    )
    assert result.exit_code == 0, result.stderr
    assert f"wrote Docker build context {context}" in result.stdout

    dockerfile = (context / "Dockerfile").read_text()
    # venv, colours, greeting, the project (with the SBOM)
    assert dockerfile.count("\nCOPY layers/") == 4
    assert "\nFROM 127.0.0.1:5055/distroless/python3-debian13@sha256:" in dockerfile

    docker_env.client.images.build(path=str(context), tag=theirs, rm=True, forcerm=True)

    assert _tree(docker_env, theirs) == _tree(docker_env, ours)
    mine = _config(docker_env, ours)
    built = _config(docker_env, theirs)
    assert built == mine
    assert built["Env"]["GREETING"] == 'a $HOME "b"'  # quoted: no variable expansion
    # One Docker layer per imgbuild layer, over the same base layers.
    layers = {i: docker_env.client.api.inspect_image(i)["RootFS"]["Layers"] for i in (ours, theirs)}
    assert len(layers[theirs]) == len(layers[ours])
    assert layers[theirs][0] == layers[ours][0]
    out = json.loads(
        bytes(docker_env.client.containers.run(theirs, network_mode="none", remove=True))
    )
    assert out["msg"] == "hello image" and out["uid"] == 65532


def test_context_refuses_a_directory_it_did_not_write(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project(tool='\n[tool.imgbuild]\nbase = "distroless"\n')
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine\n")
    result = imgbuild(
        "build", project, "--output", f"context:{busy}", "--cache-dir", tmp_path / "cache"
    )
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        (
            f"error: context destination {busy} is not empty and not a context imgbuild "
            "wrote; choose an empty or new directory"
        )
    ]
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


def test_context_of_a_built_base_is_refused_in_one_line(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    # The default base is built from Debian packages: no registry holds it to start FROM.
    project = make_project()
    context = tmp_path / "context"
    result = imgbuild(
        "build", project, "--python", "3.11", "--output", f"context:{context}",
        "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "is built by imgbuild, not pulled" in errors[0] and "oci-archive" in errors[0]
    assert not context.exists()
