"""The pipeline's branches through fake ports: no Docker engine, no registry.

A real local index serves a tiny dependency, ``run_lock`` writes a real pylock, and the
project is built by a real in-tree PEP 517 backend; the registry is a fake serving a base
from a blob store built here, and the engine a fake that records what it is sent.
"""

from __future__ import annotations

import gzip
import io
import os
import platform
import sys
import tarfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import httpx
import pytest

from imagebuild.build.sdist import sdist_metadata
from imagebuild.digest import Digest, digest_bytes
from imagebuild.errors import (
    DockerError,
    ImageError,
    LayerError,
    LockError,
    ProjectError,
    RegistryError,
    TargetError,
)
from imagebuild.image.descriptor import OCI_INDEX, OCI_LAYER_GZIP
from imagebuild.image.model import BaseImage, Image, ImageIndex
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.index.simple import SimpleIndex
from imagebuild.pipeline.build import run_build
from imagebuild.pipeline.layerwork import worker_context
from imagebuild.pipeline.lock import run_lock
from imagebuild.pipeline.ports import Ports
from imagebuild.pipeline.requests import BuildRequest, BuildResult, LockRequest
from imagebuild.sinks.engine import DockerSink
from imagebuild.sinks.sink import Finished, Sink
from tests.fixtures.index_server import LocalIndex

HOST = sys.version_info[:2]
PY = f"python{HOST[0]}.{HOST[1]}"
BASE = "registry.test/team/python-base:1"

# An in-tree backend: no build requirement to install, so no network.
BACKEND = """\
import base64, hashlib, os, zipfile

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    info = "app-1.0.dist-info"
    files = {"app.py": open("app.py", "rb").read()}
    files[info + "/METADATA"] = b"Metadata-Version: 2.1\\nName: app\\nVersion: 1.0\\n"
    files[info + "/WHEEL"] = b"Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
    lines = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(data)}\\n")
    files[info + "/RECORD"] = ("".join(lines) + info + "/RECORD,,\\n").encode()
    with zipfile.ZipFile(os.path.join(wheel_directory, "app-1.0-py3-none-any.whl"), "w") as zf:
        for path, data in files.items():
            zf.writestr(zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return "app-1.0-py3-none-any.whl"
"""


# -- fakes of the ports -------------------------------------------------------------------


def _base_image(store: BlobStore, arch: str) -> BaseImage:
    """A base whose one layer holds a CPython of the host's minor version and a glibc."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in (
            (f"usr/local/bin/{PY}", b"#!python"),
            ("lib/libc-2.36.so", b"glibc"),
            ("etc/arch", arch.encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    diff_id = digest_bytes(raw.getvalue())
    desc = store.put_bytes(gzip.compress(raw.getvalue(), mtime=0), media_type=OCI_LAYER_GZIP)
    return BaseImage(
        reference=BASE,
        manifest_digest=digest_bytes(f"base manifest {arch}".encode()),
        config={
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/bin:/usr/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        layers=(desc,),
        diff_ids=(diff_id,),
    )


class FakeRegistry:
    """Serves a two-platform base out of its own blob store; records every pull."""

    def __init__(self, root: Path) -> None:
        self.source = BlobStore(root)
        self.bases = {arch: _base_image(self.source, arch) for arch in ("amd64", "arm64")}
        self.index_digest = digest_bytes(b"the base's image index")
        self.pulls: list[str] = []

    def pull_image(
        self,
        ref: ImageReference,
        *,
        platform: Sequence[str],
        store: BlobStore,
        fetch_layers: bool = True,
    ) -> BaseImage:
        assert ref.digest in (None, self.index_digest), "a pinned pull gets what was pinned"
        self.pulls.append(f"{ref} {platform[1]}")
        base = self.bases[platform[1]]
        if fetch_layers:
            self.pull_layers(ref, base, store)
        return base

    def pull_layers(self, ref: ImageReference, image: BaseImage, store: BlobStore) -> None:
        for desc in image.layers:
            store.put_bytes(self.source.read_bytes(desc.digest), media_type=desc.media_type)

    def fetch_manifest(self, ref: ImageReference) -> tuple[bytes, str, Digest]:
        return b"{}", OCI_INDEX, self.index_digest


@dataclass
class FakeEngine:
    """Answers diff_ids for what it holds; records each archive's blob sizes on load."""

    holds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    refuse_thin: bool = False
    loads: list[dict[str, int]] = field(default_factory=list)

    def architecture(self) -> str:
        return "amd64"

    def image_id(self, ref: str) -> str | None:
        return "sha256:present" if ref in self.holds else None

    def diff_ids(self, ref: str) -> tuple[str, ...]:
        return self.holds.get(ref, ())

    def load(self, archive: Path) -> tuple[str, ...]:
        with tarfile.open(archive) as tar:
            sizes = {m.name: m.size for m in tar if m.isfile() and m.name.startswith("blobs/")}
        self.loads.append(sizes)
        if self.refuse_thin and 0 in sizes.values():
            raise DockerError("docker load failed: unexpected EOF")
        return ("app:latest",)

    def run(
        self,
        image: str,
        command: Sequence[str],
        *,
        upload: Path | None = None,
        download: tuple[PurePosixPath, Path] | None = None,
    ) -> str:
        raise AssertionError("these tests compile on the host or not at all")


def no_engine() -> FakeEngine:
    raise DockerError("cannot reach the Docker engine (no socket)")


@dataclass
class RecordingReporter:
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    progressed: list[tuple[str, int, int | None, str]] = field(default_factory=list)

    def step(self, message: str) -> None:
        self.steps.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def progress(self, task: str, done: int, total: int | None, unit: str = "") -> None:
        self.progressed.append((task, done, total, unit))


@dataclass
class RecordingSink:
    """A sink that notes what it got, into a log shared by the sinks of a build."""

    kind: str
    log: list[tuple[str, Finished]]
    takes_index: bool = True

    def write(self, finished: Finished, reporter: object) -> tuple[str, ...]:
        self.log.append((self.kind, finished))
        return (f"{self.kind} took {finished.image.manifest.digest}",)


# -- the world a test builds in ----------------------------------------------------------


@dataclass
class World:
    root: Path
    index: LocalIndex
    registry: FakeRegistry
    http: httpx.Client
    reporter: RecordingReporter = field(default_factory=RecordingReporter)
    engine: Callable[[], FakeEngine] = no_engine
    host: Path | None = None
    host_asked: list[tuple[int, int]] = field(default_factory=list)

    @property
    def project(self) -> Path:
        return self.root / "app"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def ports(self) -> Ports:
        def index(urls: Sequence[str], *, cache_dir: Path, reporter: object) -> SimpleIndex:
            return SimpleIndex(self.http, urls, cache_dir=cache_dir, sdist_metadata=sdist_metadata)

        def host_python(version: tuple[int, int]) -> Path | None:
            self.host_asked.append(version)
            return self.host

        return Ports(
            http=self.http,
            index=index,
            registry=self.registry,
            engine=self.engine,
            host_python=host_python,
            reporter=self.reporter,
        )

    def lock(self) -> None:
        run_lock(LockRequest(project_dir=self.project, cache_dir=self.cache), ports=self.ports())

    def build(self, *sinks: Sink, **options: object) -> BuildResult:
        request = BuildRequest(
            project_dir=self.project, cache_dir=self.cache, compile_bytecode=False
        )
        request = replace(request, **options)  # type: ignore[arg-type]
        return run_build(request, ports=self.ports(), sinks=sinks or (self.sink("oci"),))

    def sink(self, kind: str, *, takes_index: bool = True) -> RecordingSink:
        return RecordingSink(kind=kind, log=self.log, takes_index=takes_index)

    log: list[tuple[str, Finished]] = field(default_factory=list)

    def depend_on(self, *requirements: str) -> None:
        listed = ", ".join(f'"{r}"' for r in requirements)
        (self.project / "pyproject.toml").write_text(
            textwrap.dedent(f"""\
            [project]
            name = "app"
            version = "1.0"
            dependencies = [{listed}]

            [build-system]
            requires = []
            build-backend = "app_backend"
            backend-path = ["."]

            [tool.imgbuild]
            base = "{BASE}"
            index-url = "{self.index.url}"
            """)
        )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with LocalIndex(tmp_path / "index") as index, httpx.Client() as http:
        index.add_wheel("tinydep", "1.0", files={"tinydep/__init__.py": "VALUE = 1\n"})
        index.add_wheel("otherdep", "2.0", files={"otherdep/__init__.py": "VALUE = 2\n"})
        w = World(root=tmp_path, index=index, registry=FakeRegistry(tmp_path / "src"), http=http)
        w.project.mkdir()
        (w.project / "app.py").write_text("print('hello')\n")
        (w.project / "app_backend.py").write_text(BACKEND)
        w.depend_on("tinydep")
        yield w


# -- lock modes ---------------------------------------------------------------------------


def test_a_project_without_a_lock_is_locked_first_then_built(world: World) -> None:
    result = world.build()
    assert (world.project / "pylock.toml").is_file()
    assert "lock: no lock file, locking first" in world.reporter.steps
    assert result.written == (f"oci took {result.manifest_digest}",)
    assert result.summary_lines()[-1] == f"digest: {result.manifest_digest}"


def test_locked_refuses_a_stale_lock_before_any_sink(world: World) -> None:
    world.lock()
    world.depend_on("tinydep", "otherdep")
    with pytest.raises(LockError):
        world.build(lock_mode="locked")
    assert world.log == []


def test_a_stale_lock_is_built_by_default_with_a_warning(world: World) -> None:
    world.lock()
    world.depend_on("tinydep", "otherdep")
    result = world.build()
    (warning,) = world.reporter.warnings
    assert warning.endswith("; building from the lock as it is")
    assert result.written


def test_frozen_uses_the_lock_without_judging_it(world: World) -> None:
    world.lock()
    world.depend_on("tinydep", "otherdep")
    pulls_for_the_lock = len(world.registry.pulls)
    world.build(lock_mode="frozen")
    assert world.reporter.warnings == []
    # Judging a pylock pulls the base for every target it covers; frozen pulls one.
    assert len(world.registry.pulls) == pulls_for_the_lock + 1


def test_locked_or_frozen_without_a_lock_says_how_to_make_one(world: World) -> None:
    with pytest.raises(LockError, match="no pylock.toml or uv.lock to build from"):
        world.build(lock_mode="frozen")
    assert not (world.project / "pylock.toml").exists()


# -- the base -----------------------------------------------------------------------------


def test_the_base_is_pulled_at_the_digest_the_lock_recorded(world: World) -> None:
    world.lock()
    assert world.registry.index_digest in (world.project / "pylock.toml").read_text()
    world.registry.pulls.clear()
    world.build(lock_mode="frozen")
    assert world.registry.pulls == [f"{BASE}@{world.registry.index_digest} amd64"]
    assert (
        f"base: {BASE}@{world.registry.index_digest} for linux/amd64 (pinned by pylock.toml)"
        in (world.reporter.steps)
    )
    ((_, finished),) = world.log
    assert finished.base_upstream == BASE
    assert finished.base_pulled.digest == world.registry.index_digest


# -- bytecode -----------------------------------------------------------------------------


def test_no_engine_and_a_host_python_compile_on_the_host_with_a_warning(world: World) -> None:
    world.lock()
    world.host = Path(sys.executable)
    world.build(compile_bytecode=True)
    (warning,) = world.reporter.warnings
    assert warning.startswith(f"compiling bytecode with the host's {sys.executable} (no Docker")
    assert any(step.startswith("compile: ") and "modules" in step for step in world.reporter.steps)
    assert world.host_asked == [HOST]


def test_compile_with_image_needs_an_engine(world: World) -> None:
    world.lock()
    world.host = Path(sys.executable)
    with pytest.raises(LayerError, match="--compile-with image needs a Docker engine"):
        world.build(compile_bytecode=True, compile_with="image")
    assert world.log == []


def test_neither_engine_nor_host_python_is_one_error(world: World) -> None:
    world.lock()
    with pytest.raises(LayerError, match=f"no Python {HOST[0]}.{HOST[1]} on this host"):
        world.build(compile_bytecode=True)


def test_no_compile_asks_for_no_compiler(world: World) -> None:
    world.lock()
    asked: list[str] = []

    def engine() -> FakeEngine:
        asked.append("engine")
        raise DockerError("not here")

    world.engine = engine
    world.build(compile_bytecode=False)
    assert asked == [] and world.host_asked == []
    assert not any(step.startswith("compile:") for step in world.reporter.steps)


# -- sinks ----------------------------------------------------------------------------------


def test_sinks_get_one_finished_image_contexts_first_then_layouts_then_the_rest(
    world: World,
) -> None:
    world.lock()
    sinks = [
        world.sink("registry"),
        world.sink("docker", takes_index=False),
        world.sink("oci"),
        world.sink("context", takes_index=False),
        world.sink("oci-archive"),
    ]
    result = world.build(*sinks)
    assert [kind for kind, _ in world.log] == [
        "context",
        "oci",
        "oci-archive",
        "registry",
        "docker",
    ]
    assert result.written == tuple(f"{k} took {result.manifest_digest}" for k, _ in world.log)
    finished = world.log[0][1]
    assert all(f is finished for _, f in world.log)
    assert isinstance(finished.image, Image)
    assert [str(t) for t in finished.tags] == ["docker.io/library/app:latest"]
    assert finished.title == "app 1.0"
    assert [layer.created_by for layer in finished.layers][-1] == "imgbuild: project app 1.0"


def test_a_bad_tag_fails_before_anything_is_built(world: World) -> None:
    with pytest.raises(RegistryError, match="image reference 'Not A Tag'"):
        world.build(tags=("Not A Tag",))
    assert world.registry.pulls == [] and world.log == []


def test_expect_digest_mismatch_writes_nothing(world: World) -> None:
    world.lock()
    expected = "sha256:" + "0" * 64
    with pytest.raises(ImageError, match="nothing was written, loaded or pushed"):
        world.build(world.sink("oci"), expect_digest=expected)
    assert world.log == []
    # The same build, expecting what it makes, goes through.
    result = world.build(world.sink("oci"))
    world.log.clear()
    world.build(world.sink("oci"), expect_digest=result.manifest_digest)
    assert len(world.log) == 1


# -- the engine: only the missing layers are sent --------------------------------------------


def test_docker_sink_sends_only_layers_the_engine_lacks(world: World) -> None:
    world.lock()
    base = world.registry.bases["amd64"]
    base_tag = "imgbuild-base:" + base.manifest_digest.removeprefix("sha256:")[:16]
    engine = FakeEngine(holds={base_tag: base.diff_ids})
    result = world.build(DockerSink(connect=lambda: engine))
    (sent,) = engine.loads
    assert sorted(sent.values())[0] == 0  # the base layer's blob is left empty
    assert sum(1 for size in sent.values() if size == 0) == len(base.layers)
    assert result.written == ("loaded docker.io/library/app:latest",)
    assert "docker: loading (" in "\n".join(world.reporter.steps)


def test_docker_sink_sends_everything_when_the_engine_refuses_the_thin_archive(
    world: World,
) -> None:
    world.lock()
    base = world.registry.bases["amd64"]
    base_tag = "imgbuild-base:" + base.manifest_digest.removeprefix("sha256:")[:16]
    engine = FakeEngine(holds={base_tag: base.diff_ids}, refuse_thin=True)
    world.build(DockerSink(connect=lambda: engine))
    thin, full = engine.loads
    assert 0 in thin.values() and 0 not in full.values()
    assert "docker: the engine wants every layer; loading them all" in world.reporter.steps


def test_a_docker_sink_without_an_engine_fails_after_the_build(world: World) -> None:
    world.lock()
    with pytest.raises(DockerError, match="cannot reach the Docker engine"):
        world.build(DockerSink(connect=no_engine))


# -- several platforms --------------------------------------------------------------------


def test_several_platforms_make_an_index_from_each_base(world: World) -> None:
    world.lock()
    world.registry.pulls.clear()
    result = world.build(lock_mode="frozen", platforms=("linux/amd64", "linux/arm64"))
    ((_, finished),) = world.log
    assert isinstance(finished.image, ImageIndex)
    assert result.manifest_digest == finished.image.manifest.digest
    assert [p.split()[-1] for p in world.registry.pulls] == ["amd64", "arm64"]
    assert len(finished.image.images) == 2


@pytest.mark.parametrize("kind", ["docker", "context"])
def test_several_platforms_are_refused_by_one_image_sinks_before_any_work(
    world: World, kind: str
) -> None:
    with pytest.raises(ProjectError, match=f"--output {kind} takes one platform, and 2 were given"):
        world.build(
            world.sink("oci"),
            world.sink(kind, takes_index=False),
            platforms=("linux/amd64", "linux/arm64"),
        )
    assert world.registry.pulls == [] and world.log == []
    assert not (world.project / "pylock.toml").exists()


def test_a_project_wheel_built_for_this_machine_is_refused_for_another_cpu(world: World) -> None:
    # A project with a C extension: its backend runs on this machine's Python, so its wheel
    # is this machine's (cp3X-cp3X-linux_<cpu>). The amd64 image can import it; an arm64 one
    # cannot, and a build for both stops before any sink.
    host = f"cp{HOST[0]}{HOST[1]}"
    machine = platform.machine()
    tag = f"{host}-{host}-linux_{machine}"
    backend = BACKEND.replace("py3-none-any", tag).replace(
        "Root-Is-Purelib: true", "Root-Is-Purelib: false"
    )
    (world.project / "app_backend.py").write_text(backend)
    world.lock()
    world.build(lock_mode="frozen")
    assert len(world.log) == 1
    other = "linux/arm64" if machine == "x86_64" else "linux/amd64"
    with pytest.raises(TargetError) as refused:
        world.build(lock_mode="frozen", platforms=("linux/amd64", "linux/arm64"))
    assert str(refused.value).startswith(
        f"project app ({world.project}): its wheel app-1.0-{tag}.whl holds extension modules "
        f"built for this machine (CPython {HOST[0]}.{HOST[1]} on {machine}), which the image "
        f"({host} manylinux_2_36 {'aarch64' if other == 'linux/arm64' else 'x86_64'}) "
        "cannot import"
    )
    assert "build on a" in (refused.value.hint or "")
    assert len(world.log) == 1


def test_a_path_dependency_built_for_this_machine_is_refused_for_another_cpu(
    world: World,
) -> None:
    host = f"cp{HOST[0]}{HOST[1]}"
    tag = f"{host}-{host}-linux_{platform.machine()}"
    helper = world.project / "helper"
    helper.mkdir()
    backend = BACKEND.replace("py3-none-any", tag)
    for name in ("app-1.0", "Name: app", '"app.py"', 'open("app.py"'):
        backend = backend.replace(name, name.replace("app", "helper"))
    (helper / "helper_backend.py").write_text(backend.replace("Purelib: true", "Purelib: false"))
    (helper / "helper.py").write_text("VALUE = 3\n")
    (helper / "pyproject.toml").write_text(
        '[project]\nname = "helper"\nversion = "1.0"\n'
        '[build-system]\nrequires = []\nbuild-backend = "helper_backend"\nbackend-path = ["."]\n'
    )
    pyproject = world.project / "pyproject.toml"
    text = pyproject.read_text().replace('"tinydep"', '"tinydep", "helper"')
    pyproject.write_text(text + '\n[tool.uv.sources]\nhelper = { path = "helper" }\n')
    world.lock()
    other = "linux/arm64" if platform.machine() == "x86_64" else "linux/amd64"
    with pytest.raises(TargetError, match=rf"^helper \(helper\): its wheel helper-1.0-{tag}.whl"):
        world.build(lock_mode="frozen", platforms=(other,))
    assert world.log == []
    world.build(lock_mode="frozen")
    assert len(world.log) == 1


# -- what a dependency change touches -------------------------------------------------------


def _layer_digests(world: World) -> list[str]:
    (_, finished) = world.log[-1]
    image = finished.image
    assert isinstance(image, Image)
    return [layer.digest for layer in image.layers]


def test_a_dependency_bumped_or_added_changes_two_layers_and_the_sbom_goes_with_the_project(
    world: World,
) -> None:
    world.depend_on("tinydep", "otherdep")
    world.lock()
    world.build()
    before = _layer_digests(world)

    # Bumped: its own layer, and the project's (whose SBOM lists the new version).
    world.index.add_wheel("tinydep", "1.1", files={"tinydep/__init__.py": "VALUE = 11\n"})
    run_lock(
        LockRequest(project_dir=world.project, cache_dir=world.cache, upgrade=True),
        ports=world.ports(),
    )
    world.build()
    bumped = _layer_digests(world)
    assert len(bumped) == len(before)
    changed = [i for i, (a, b) in enumerate(zip(before, bumped, strict=True)) if a != b]
    assert len(changed) == 2 and changed[-1] == len(bumped) - 1

    # Added: the layer it joins (or its own), and the project's (its requirement, the SBOM).
    world.index.add_wheel("thirddep", "3.0", files={"thirddep/__init__.py": "VALUE = 3\n"})
    world.depend_on("tinydep", "otherdep", "thirddep")
    world.lock()
    world.build()
    added = _layer_digests(world)
    assert len(set(added) - set(bumped)) == 2 and added[-1] not in bumped
    assert len(set(bumped) - set(added)) <= 2


def test_layer_workers_are_forked_by_one_server_not_spawned_by_the_build() -> None:
    """Workers come from a fork server that imported their modules once: their parent is
    that server (one for all of them), not the build's process, whose threads may hold locks
    a forked child would inherit held."""
    context = worker_context()
    assert context.get_start_method() == "forkserver"
    with ProcessPoolExecutor(max_workers=3, mp_context=context) as pool:
        parents = {pool.submit(os.getppid).result() for _ in range(6)}
    assert len(parents) == 1 and os.getpid() not in parents
