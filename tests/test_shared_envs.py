"""Build environments kept in the registry cache: a runner with an empty cache takes the
backend's installed packages, their bytecode and the kept answers from the registry instead
of installing the backend again (real uv, a real local index, a real registry)."""

from __future__ import annotations

import io
import json
import os
import sysconfig
import tarfile
from collections.abc import Iterator
from importlib.util import cache_from_source
from pathlib import Path

import httpx
import pytest
from isal import igzip

from imagebuild.build.pep517 import BuildEnvironments, build_project_wheel
from imagebuild.image import untar
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.pipeline import buildenvs
from imagebuild.pipeline.buildenvs import MEDIA_TYPE, RegistryEnvironments, _registry_key
from imagebuild.pipeline.remotecache import RegistryLayerCache
from imagebuild.sinks.remote import RegistryClient
from tests.fixtures.index_server import LocalIndex
from tests.fixtures.registry_server import LocalRegistry
from tests.test_wheelbuild import _ASKING, _BACKEND, built_by, make_project


@pytest.fixture
def requests() -> Iterator[tuple[httpx.Client, list[str]]]:
    """An HTTP client, and each request it sends as ``METHOD path``."""
    sent: list[str] = []
    hooks = {"request": [lambda request: sent.append(f"{request.method} {request.url.path}")]}
    with httpx.Client(trust_env=False, timeout=10.0, event_hooks=hooks) as http:
        yield http, sent


def _shared(
    http: httpx.Client, store: Path, *, source: ImageReference | None, target: ImageReference | None
) -> RegistryEnvironments:
    cache = RegistryLayerCache(
        client=RegistryClient(http), store=BlobStore(store), source=source, target=target
    )
    return RegistryEnvironments(remote=cache)


def _own_bytecode(env: Path) -> list[Path]:
    """The pycs of the environment's own packages (``<env>/.pycache/<env>/lib/...``)."""
    return sorted((env / ".pycache" / str(env).lstrip("/") / "lib").rglob("*.pyc"))


def test_a_runner_takes_the_backend_environment_another_kept(
    fresh_index: LocalIndex,
    local_registry: LocalRegistry,
    requests: tuple[httpx.Client, list[str]],
    tmp_path: Path,
) -> None:
    http, _ = requests
    fresh_index.add_wheel(
        "ib-local-backend",
        "1.1",
        files={"ib_local_backend.py": _BACKEND.format(release="1.1") + _ASKING},
    )
    ref = ImageReference.parse(f"{local_registry.host}/test/shared-envs")
    project = make_project(tmp_path / "project")
    log = project / "requires-asked.log"

    # The first runner makes the environment and keeps it.
    first = BuildEnvironments(
        indexes=(fresh_index.url,),
        root=tmp_path / "runner-1",
        shared=_shared(http, tmp_path / "blobs-1", source=ref, target=ref),
    )
    wheel = build_project_wheel(project, tmp_path / "out-1", source_date_epoch=0, envs=first)
    first.share()
    installs = fresh_index.count("/files/ib_local_backend")
    assert installs >= 1 and log.read_text() == "asked\n"
    (kept_env,) = first.used.values()
    kept_pycs = _own_bytecode(kept_env)
    assert kept_pycs  # the hooks wrote the backend's bytecode there

    # The second starts empty: the backend is not downloaded, its requirements not asked.
    second = BuildEnvironments(
        indexes=(fresh_index.url,),
        root=tmp_path / "runner-2",
        shared=_shared(http, tmp_path / "blobs-2", source=ref, target=None),
    )
    again = build_project_wheel(project, tmp_path / "out-2", source_date_epoch=0, envs=second)
    assert built_by(again) == built_by(wheel) == "1.1"
    assert again.read_bytes() == wheel.read_bytes()
    assert fresh_index.count("/files/ib_local_backend") == installs
    assert log.read_text() == "asked\n"
    # The backend ran from the kept bytecode, moved under the new place: none was rewritten.
    (env,) = second.used.values()
    pycs = _own_bytecode(env)
    assert [p.name for p in pycs] == [p.name for p in kept_pycs]
    # (a tar keeps times to the microsecond; a rewrite would be seconds later)
    for taken, kept in zip(pycs, kept_pycs, strict=True):
        assert abs(taken.stat().st_mtime_ns - kept.stat().st_mtime_ns) < 10**6
        assert taken.read_bytes() == kept.read_bytes()
    assert (env / "bin" / "python").is_symlink()  # its own venv, made here
    # The hooks took the standard library's own pycs, linked there: none was compiled.
    source = Path(json.__file__)
    linked = (
        env / ".pycache" / str(source.parent).lstrip("/") / Path(cache_from_source(source)).name
    )
    assert linked.samefile(cache_from_source(source))  # a link to the stdlib's own


def _fake_env(root: Path) -> Path:
    """A venv's layout with a package, its bytecode, the stdlib's and a project's."""
    env = root / "env"
    package = env / "lib" / "python3.11" / "site-packages" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("X = 1\n")
    (env / ".imgbuild-requires").mkdir()
    (env / ".imgbuild-requires" / "answer.json").write_text("[]")
    (env / "bin").mkdir()
    (env / "bin" / "tool").write_text("#!/bin/sh\n")
    cache = env / ".pycache"
    own = cache / str(env).lstrip("/") / "lib" / "python3.11" / "site-packages" / "pkg"
    stdlib = cache / sysconfig.get_paths()["stdlib"].lstrip("/")
    project = cache / str(root / "project").lstrip("/")
    for where in (own, stdlib, project):
        where.mkdir(parents=True)
        (where / "m.cpython-311.pyc").write_bytes(b"pyc")
    os.utime(own / "m.cpython-311.pyc", ns=(10**18, 10**18))
    return env


def test_what_is_kept_is_the_packages_and_their_bytecode_once(
    local_registry: LocalRegistry, requests: tuple[httpx.Client, list[str]], tmp_path: Path
) -> None:
    http, sent = requests
    ref = ImageReference.parse(f"{local_registry.host}/test/shared-envs-kept")
    env = _fake_env(tmp_path / "seed")
    keeper = _shared(http, tmp_path / "blobs", source=None, target=ref)
    keeper.keep("k1", env)
    sent.clear()
    keeper.keep("k1", env)  # kept already: asked, not made or pushed again
    assert [line.split()[0] for line in sent] == ["GET"]

    home = tmp_path / "runner" / "k1"
    fresh = tmp_path / "runner" / ".k1-staging"
    fresh.mkdir(parents=True)
    taker = _shared(http, tmp_path / "runner-blobs", source=ref, target=None)
    assert taker.fetch("k1", fresh, home)
    assert taker.fetch("another", fresh, home) is False
    found = sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*") if p.is_file())
    own = f".pycache/{str(home).lstrip('/')}/lib/python3.11/site-packages/pkg/m.cpython-311.pyc"
    # Not the standard library's bytecode: each machine links its own interpreter's.
    assert found == sorted(
        [
            ".imgbuild-requires/answer.json",
            own,
            "lib/python3.11/site-packages/pkg/__init__.py",
        ]
    )
    assert (fresh / own).stat().st_mtime_ns == 10**18  # times kept: the pycs stay valid


def _keep_tar(
    shared: RegistryEnvironments, key: str, members: list[tuple[tarfile.TarInfo, bytes | None]]
) -> None:
    """Keep a gzip tar of ``members`` (each with its data, or None) as the environment ``key``."""

    def write(out: Path) -> None:
        with igzip.open(out, "wb") as stream, tarfile.open(fileobj=stream, mode="w|") as tar:  # type: ignore[no-untyped-call]
            for info, data in members:
                if data is not None:
                    info.size = len(data)
                tar.addfile(info, None if data is None else io.BytesIO(data))

    shared.remote.keep_file(_registry_key(key), MEDIA_TYPE, write)


@pytest.mark.parametrize("unpacker", ["gnu-tar", "tarfile"])
def test_a_kept_environment_that_would_write_outside_is_refused(
    local_registry: LocalRegistry,
    requests: tuple[httpx.Client, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    unpacker: str,
) -> None:
    http, _ = requests
    ref = ImageReference.parse(f"{local_registry.host}/test/shared-envs-hostile-{unpacker}")
    if unpacker == "tarfile":
        monkeypatch.setattr(untar, "gnu_tar", lambda: None)

    link = tarfile.TarInfo("lib/escape")
    link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path / "outside")
    shared = _shared(http, tmp_path / "blobs", source=ref, target=ref)
    _keep_tar(
        shared,
        "k2",
        [(link, None), (tarfile.TarInfo("lib/escape/file"), b"written through the link")],
    )
    (tmp_path / "outside").mkdir()
    env = tmp_path / "env"
    env.mkdir()
    assert shared.fetch("k2", env, tmp_path / "home") is False
    assert list((tmp_path / "outside").iterdir()) == []
    assert not (env / "lib").exists()  # what was unpacked is cleared: the env is made instead


@pytest.mark.parametrize("unpacker", ["gnu-tar", "tarfile"])
def test_an_unpacking_that_hangs_is_given_up_and_the_environment_made(
    local_registry: LocalRegistry,
    requests: tuple[httpx.Client, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    unpacker: str,
) -> None:
    """By GNU tar where there is one, else by ``tarfile`` in a process of its own."""
    http, _ = requests
    ref = ImageReference.parse(f"{local_registry.host}/test/shared-envs-hang-{unpacker}")
    if unpacker == "gnu-tar":
        assert untar.gnu_tar() is not None  # this host has it (Debian's tar)
    else:
        monkeypatch.setattr(untar, "gnu_tar", lambda: None)

    shared = _shared(http, tmp_path / "blobs", source=ref, target=ref)
    module = tarfile.TarInfo("lib/python3.11/site-packages/mod.py")
    _keep_tar(shared, "k3", [(module, b"print('hello')\n")])
    env = tmp_path / "env"
    env.mkdir()
    assert shared.fetch("k3", env, tmp_path / "home") is True  # it unpacks
    assert (env / "lib/python3.11/site-packages/mod.py").read_bytes() == b"print('hello')\n"

    other = tmp_path / "other"
    other.mkdir()
    if unpacker == "gnu-tar":
        hanging = tmp_path / "tar"
        hanging.write_text("#!/bin/sh\nexec sleep 60\n")
        hanging.chmod(0o755)
        monkeypatch.setattr(untar, "gnu_tar", lambda: str(hanging))
    else:
        monkeypatch.setattr(buildenvs, "_UNPACK", "import time; time.sleep(60)")
    monkeypatch.setattr(buildenvs, "UNPACK_SECONDS", 0.5)
    assert shared.fetch("k3", other, tmp_path / "home") is False
    assert not (other / "lib").exists()
