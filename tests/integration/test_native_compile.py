"""The base's own Python run on this host (its loader, its libraries) writes the engine's bytes."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import httpx
import pytest

from imagebuild.image.name import ImageReference
from imagebuild.image.rootfs import unpack_rootfs
from imagebuild.image.store import BlobStore
from imagebuild.index.simple import SimpleIndex
from imagebuild.install import layers
from imagebuild.install.native import host_arch, native_compiler
from imagebuild.pipeline.bases import base_facts
from imagebuild.pipeline.compiler import CompilerChoice, choose_compiler
from imagebuild.pipeline.ports import Ports
from imagebuild.report import NullReporter
from imagebuild.sinks.daemon import engine_base_tag
from imagebuild.sinks.engine import DockerEngine, EngineCompiler
from imagebuild.sinks.remote import RegistryClient
from tests.fixtures.docker_engine import TestInfra

pytestmark = pytest.mark.docker

SOURCES = {
    "pkg/__init__.py": "from .mod import VALUE\n",
    "pkg/mod.py": "VALUE = {'a': (1, 2.5, 'x' * 40), 'b': [i for i in range(3)]}\n"
    "def f(x, /, *a, k=1, **kw):\n    return (lambda y: y + x)(k)\n"
    "class C:\n    'doc'\n    async def g(self):\n        return [z async for z in self]\n",
    "pkg/broken.py": "def (:\n",
}


def _tree(root: Path) -> list[tuple[Path, PurePosixPath]]:
    files = []
    for rel, text in SOURCES.items():
        path = root / "app/.venv/lib/python3.11/site-packages" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        files.append((path, PurePosixPath("/app/.venv/lib/python3.11/site-packages") / rel))
    return sorted(files)


def _pycs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.pyc"))}


def test_the_native_run_writes_the_engines_bytes(
    infra: TestInfra, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert host_arch() == "amd64", "the test engine and this host are amd64"
    store = BlobStore(tmp_path / "blobs")
    ref = ImageReference.parse(f"{infra.registry}/library/python:3.11-slim-bookworm")
    with httpx.Client() as http:
        base = RegistryClient(http).pull_image(ref, platform=("linux", "amd64"), store=store)
    facts = base_facts(base, store, tmp_path / "cache", "amd64", None)
    root = unpack_rootfs(base, store, tmp_path / "rootfs")
    # Only what running Python needs was unpacked: no docs, no shell tools.
    assert not (root / "usr/share").exists() and not (root / "usr/bin/ls").exists()
    identity = f"image:{engine_base_tag(base.manifest_digest)}:{facts.interpreter}"
    native = native_compiler(root, facts.interpreter, arch="amd64", identity=identity)
    assert native is not None and native.version.startswith("3.11.")
    # Its answer is kept in the tree (which never changes): the next choice does not start it.
    assert [r.read_text() for r in root.glob(".imgbuild-probe-*")] == [native.version]
    with monkeypatch.context() as patched:
        patched.setattr(layers.subprocess, "run", _no_process)
        again = native_compiler(root, facts.interpreter, arch="amd64", identity=identity)
    assert again is not None and again.version == native.version

    here, there = tmp_path / "native", tmp_path / "engine"
    assert native.compile(here, [_tree(here)]) == 1  # broken.py
    engine = DockerEngine(infra.client)
    # No rootfs directory: the choice falls to the engine, as on a host of another CPU.
    choice = CompilerChoice(mode="image", store=store, work=tmp_path)
    with httpx.Client() as http:
        ports = Ports(
            http=http,
            index=SimpleIndex,
            registry=RegistryClient(http),
            engine=lambda: engine,
            host_python=lambda version: None,
            reporter=NullReporter(),
        )
        compiler = choose_compiler(facts, base, choice, ports)
    assert isinstance(compiler, EngineCompiler) and compiler.identity == native.identity
    assert compiler.compile(there, [_tree(there)]) == 1
    assert _pycs(here) == _pycs(there) and len(_pycs(here)) == 2
    # Its compile server (a listing at a time, each group in a fork of it): the same.
    server = native.serve()
    try:
        for round in range(3):
            served = tmp_path / f"served-{round}"
            assert server.compile([_tree(served)]) == 1
            assert _pycs(served) == _pycs(there)
    finally:
        server.close()


def _no_process(*args: object, **kwargs: object) -> None:
    raise AssertionError("the interpreter was started again")
