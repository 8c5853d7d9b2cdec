"""The registry as CI's shared cache: layers found by their key, the same digest, fewer built."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest

from imagebuild.cache import build_envs_memory
from imagebuild.image import rootfs, untar
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.image.validate import validate_layout
from imagebuild.pipeline.remotecache import RegistryLayerCache
from imagebuild.sinks.remote import RegistryClient
from tests.fixtures.docker_engine import TestInfra
from tests.fixtures.registry_server import LocalRegistry
from tests.integration.conftest import MakeProject, imgbuild

pytestmark = pytest.mark.docker


def _build(project: Path, cache: Path, layout: Path, *extra: str) -> tuple[str, str]:
    result = imgbuild(
        "build", project, "--python", "3.11", "--cache-dir", cache,
        "--output", f"oci:{layout}", *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    validate_layout(layout)
    return json.loads((layout / "index.json").read_text())["manifests"][0]["digest"], result.stderr


def _tags(registry: str, repository: str) -> list[str]:
    with httpx.Client() as http:
        answer = http.get(f"http://{registry}/v2/{repository}/tags/list")
    answer.raise_for_status()
    return sorted(answer.json().get("tags") or [])


def test_an_empty_cache_takes_the_layers_a_ci_run_kept(
    docker_env: TestInfra,
    make_project: MakeProject,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = make_project()
    repository = f"imgbuild-test/layer-cache-{uuid.uuid4().hex[:8]}"
    cache_ref = f"{docker_env.registry}/{repository}"

    # A first build, then a later run on the same cache keeps its layers in the registry:
    # what that runner has on disk (layers, ELF scans, the SBOM) goes up, not only what it
    # builds then.
    first, log = _build(project, tmp_path / "c1", tmp_path / "o1")
    assert "fetching " in log
    seeded, log = _build(project, tmp_path / "c1", tmp_path / "o1b", "--cache-to", cache_ref)
    assert seeded == first and "cache: keeping" in log
    kept = _tags(docker_env.registry, repository)
    layers = [tag for tag in kept if not tag.startswith(("record-", "file-", "set-"))]
    assert layers and all(len(tag) == 64 for tag in layers)
    # The layers below the project's, also as one set (what a runner asks for first).
    assert len([tag for tag in kept if tag.startswith("set-")]) == 1
    # Beside them, the records: each wheel's ELF scan, the base's library index, the SBOM;
    # and the project's build environment (its backend's packages and their bytecode).
    assert len([tag for tag in kept if tag.startswith("record-")]) >= 3
    assert len([tag for tag in kept if tag.startswith("file-")]) == 1

    # A second runner with an empty local cache builds nothing: every layer comes by key,
    # and no wheel is downloaded (the records say what reading them would)...
    alone: list[str] = []
    find_alone = RegistryLayerCache._find

    def looked_up_alone(cache: RegistryLayerCache, key: str) -> object:
        alone.append(key)
        return find_alone(cache, key)

    monkeypatch.setattr(RegistryLayerCache, "_find", looked_up_alone)
    second, log = _build(project, tmp_path / "c2", tmp_path / "o2", "--cache-from", cache_ref)
    assert second == first
    # Alone: the project's layer and the built base's standard-library bytecode; the
    # dependencies' layers came in their set.
    assert len(alone) == 2
    assert "layer " not in log and "compile:" not in log and "fetching " not in log
    assert not list((tmp_path / "c2").rglob("*.whl"))

    # ...and after a one-line change only the project's layer is built.
    source = project / "src" / "demo_app" / "__init__.py"
    source.write_text(source.read_text() + "\nCHANGED = True\n")
    started = time.time()
    third, log = _build(project, tmp_path / "c3", tmp_path / "o3", "--cache-from", cache_ref)
    built = [line for line in log.splitlines() if line.startswith("· layer ")]
    assert third != first and len(built) == 1 and "project demo-app" in built[0]
    assert "fetching " not in log
    # Its wheel was built in the environment the registry kept, with the bytecode written
    # by an earlier run's hooks (older than this build: none was compiled again).
    # (made in memory where there is room, as on this machine; else in the cache)
    envs = build_envs_memory(tmp_path / "c3" / "build-envs") or tmp_path / "c3" / "build-envs"
    (env,) = [p for p in envs.iterdir() if p.is_dir()]
    pycs = list((env / ".pycache" / str(env).lstrip("/")).rglob("*.pyc"))
    assert pycs and all(p.stat().st_mtime < started for p in pycs)

    # A cache that does not hold a key is no error: the layer is built.
    empty = f"{docker_env.registry}/imgbuild-test/layer-cache-empty-{uuid.uuid4().hex[:8]}"
    fourth, _ = _build(project, tmp_path / "c4", tmp_path / "o4", "--cache-from", empty)
    assert fourth == third


def test_a_runner_compiles_with_the_pulled_bases_python_the_cache_kept(
    docker_env: TestInfra,
    make_project: MakeProject,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pulled base's facts and its Python's tree, kept with ``--cache-to``: a runner with
    an empty cache reads neither off the base's layers (they are pulled meanwhile, for the
    output), and builds the same image."""
    monkeypatch.setenv("IMGBUILD_MEMORY_STAGING", "0")  # each cache's own tree, on disk
    project = make_project()
    repository = f"imgbuild-test/base-cache-{uuid.uuid4().hex[:8]}"
    cache_ref = f"{docker_env.registry}/{repository}"
    slim = ("--base", "debian-slim")
    first, _ = _build(project, tmp_path / "c1", tmp_path / "o1", *slim, "--cache-to", cache_ref)
    kept = [tag for tag in _tags(docker_env.registry, repository) if tag.startswith("file-")]
    assert len(kept) == 3  # the build environment, the base's facts, its Python's tree

    # What is unpacked: a layer by imgbuild's rules, a kept tree by GNU tar (image.untar).
    applied: list[Path] = []
    unpack, extract = rootfs._apply, untar.extract

    def recorded(blob: Path, tree: object) -> None:
        applied.append(blob)
        unpack(blob, tree)  # type: ignore[arg-type]

    def extracted(tar: Path, into: Path, *, seconds: float) -> bool:
        if into.name.startswith(".unpack-"):  # a base's tree (not a build environment)
            applied.append(tar)
        return extract(tar, into, seconds=seconds)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("the base's facts were read off its layers")

    monkeypatch.setattr(rootfs, "_apply", recorded)
    monkeypatch.setattr(untar, "extract", extracted)
    monkeypatch.setattr("imagebuild.pipeline.bases.inspect_layers", refused)
    second, _ = _build(project, tmp_path / "c2", tmp_path / "o2", *slim, "--cache-from", cache_ref)
    assert second == first
    # One tar unpacked for the compiler, and none of the base's layers.
    index = json.loads((tmp_path / "o2" / "index.json").read_text())
    manifest = tmp_path / "o2/blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]
    layers = {layer["digest"].split(":")[1] for layer in json.loads(manifest.read_text())["layers"]}
    assert len(applied) == 1 and applied[0].name.split(".")[0] not in layers
    (tree,) = (tmp_path / "c2" / "rootfs").iterdir()

    # A kept tree whose Python does not start is no error: the base's layers are unpacked
    # instead, and the image is the same.
    broken = tmp_path / "broken"
    shutil.copytree(tree, broken, symlinks=True)
    for python in (broken / "usr/bin").glob("python3*"):
        python.unlink()
        python.write_bytes(b"not a program")
    kept = tmp_path / "broken.tar.gz"
    rootfs.pack_rootfs(broken, kept)
    monkeypatch.setattr("imagebuild.pipeline.platform.kept_tree", lambda base, remote: kept)
    applied.clear()
    third, _ = _build(project, tmp_path / "c3", tmp_path / "o3", *slim, "--cache-from", cache_ref)
    assert third == first
    assert applied[0].name == "tree.tar" and applied[1].name.split(".")[0] in layers


def test_a_bad_cache_reference_is_one_line(make_project: MakeProject, tmp_path: Path) -> None:
    project = make_project()
    result = imgbuild(
        "build", project, "--python", "3.11", "--cache-dir", tmp_path / "c",
        "--output", f"oci:{tmp_path / 'o'}", "--cache-from", "Not A Ref",
    )  # fmt: skip
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--cache-from 'Not A Ref'" in errors[0]


def _pushed(registry: str, repository: str, store: Path) -> str:
    """Pull what ``registry/repository:latest`` holds into ``store``, every blob checked
    against its digest (what fails when the repository lacks one); its manifest digest."""
    with httpx.Client(timeout=30) as http:
        client = RegistryClient(http)
        image = client.pull_image(
            ImageReference.parse(f"{registry}/{repository}:latest"), store=BlobStore(store)
        )
    return str(image.manifest_digest)


def test_a_runner_that_only_pushes_takes_no_layer_bytes_from_the_registry(
    docker_env: TestInfra,
    local_registry: LocalRegistry,
    make_project: MakeProject,
    tmp_path: Path,
) -> None:
    """``--push`` with ``--cache-from``: the base's layers and the layers the cache holds are
    not downloaded; the push mounts them into the target repository. The image is the one
    an OCI build gives, whole in its repository. Pushed to another registry, where nothing
    can be mounted, the layers it must send are fetched then."""
    project = make_project()
    uid = uuid.uuid4().hex[:8]
    cache_ref = f"{docker_env.registry}/imgbuild-test/push-only-cache-{uid}"
    slim = ("--base", "debian-slim")
    _build(project, tmp_path / "c1", tmp_path / "o1", *slim, "--cache-to", cache_ref)
    main = project / "src" / "demo_app" / "__init__.py"
    main.write_text(main.read_text().replace('"image"', '"pushed image"'))
    expected, _ = _build(project, tmp_path / "c0", tmp_path / "o0", *slim)

    # The same registry: mounted from the cache and the base's repositories.
    target = f"imgbuild-test/push-only-{uid}"
    result = imgbuild(
        "build", project, "--python", "3.11", "--cache-dir", tmp_path / "c2", *slim,
        "--push", "--tag", f"{docker_env.registry}/{target}:latest", "--cache-from", cache_ref,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    index = json.loads((tmp_path / "o0" / "index.json").read_text())
    manifest = tmp_path / "o0/blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]
    layers = [layer["digest"] for layer in json.loads(manifest.read_text())["layers"]]
    here = {f"sha256:{p.name}" for p in (tmp_path / "c2" / "blobs" / "sha256").iterdir()}
    assert len([d for d in layers if d in here]) == 1  # the project's, built here: no other
    assert _pushed(docker_env.registry, target, tmp_path / "check-1") == expected

    # Another registry: the layers are fetched from where they were seen, and sent.
    result = imgbuild(
        "build", project, "--python", "3.11", "--cache-dir", tmp_path / "c3", *slim,
        "--push", "--tag", f"{local_registry.host}/{target}:latest", "--cache-from", cache_ref,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert _pushed(local_registry.host, target, tmp_path / "check-2") == expected
