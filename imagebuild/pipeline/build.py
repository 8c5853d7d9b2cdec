"""The build pipeline: the only module that knows every stage.

pyproject -> lock (checked when asked) -> base pulled and inspected -> target platform ->
wheels chosen and fetched -> project wheel built -> layers planned, installed, compiled
and tarred (each layer cached by what goes into it) -> image -> sinks.

Nothing is written to a sink until the whole image exists; sinks write to temporary
paths and rename, and Docker only sees a complete archive, so a failure never leaves a
half-built image tagged, loaded or pushed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import httpx

from imagebuild import __version__
from imagebuild.errors import ImageError, LayerError, LockError, ProjectError
from imagebuild.install.layers import (
    BytecodeCompiler,
    HostCompiler,
    VenvLayout,
    compile_sources,
    find_host_python,
    install_wheel,
    stage_venv,
)
from imagebuild.install.plan import LayerPlan, LayerSpec, PlannedWheel, plan_layers
from imagebuild.project.settings import ImageSettings, parse_python_version, parse_settings
from imagebuild.report import NullReporter, Reporter
from imagebuild.target.base import BaseFacts, CatalogEntry, find_entry, inspect_layers, load_catalog

if TYPE_CHECKING:
    from concurrent.futures import Future

    from packaging.utils import NormalizedName

    from imagebuild.build.pep517 import BuildEnvironments
    from imagebuild.digest import Digest
    from imagebuild.image.model import BaseImage, Image, ImageConfig, ImageIndex, Layer
    from imagebuild.image.name import ImageReference
    from imagebuild.image.store import BlobStore
    from imagebuild.lock.model import Lock, LockedPackage, WheelFile
    from imagebuild.net.credentials import IndexCredentials
    from imagebuild.project.spec import ProjectSpec
    from imagebuild.project.workspace import Workspace
    from imagebuild.sinks.engine import DockerEngine
    from imagebuild.sinks.remote import RegistryClient
    from imagebuild.target.platform import TargetPlatform

OUTPUT_KINDS = ("docker", "oci", "oci-archive", "registry", "context")


@dataclass(frozen=True, kw_only=True, slots=True)
class Output:
    """Where the finished image goes."""

    kind: str
    """One of ``docker``, ``oci``, ``oci-archive``, ``registry``, ``context``."""
    path: Path | None = None
    """Destination for ``oci`` and ``context`` (directories) and ``oci-archive`` (a file)."""


def parse_outputs(values: Sequence[str]) -> tuple[Output, ...]:
    """Parse ``--output`` values: ``docker``, ``oci:DIR``, ``oci-archive:FILE``, ``registry``,
    ``context:DIR`` (a Dockerfile and the layers as directories).
    """
    outputs = []
    for value in values:
        kind, _, rest = value.partition(":")
        if kind not in OUTPUT_KINDS:
            raise ProjectError(
                f"--output {value!r}: unknown output",
                hint="use docker, oci:DIR, oci-archive:FILE, registry or context:DIR",
            )
        if kind in ("oci", "oci-archive", "context"):
            if not rest:
                raise ProjectError(f"--output {value!r}: needs a path, e.g. {kind}:./image")
            outputs.append(Output(kind=kind, path=Path(rest).resolve()))
        elif rest:
            raise ProjectError(f"--output {value!r}: {kind} takes no path")
        else:
            outputs.append(Output(kind=kind))
    return tuple(outputs)


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildRequest:
    """Everything a build needs, already validated by the CLI."""

    project_dir: Path
    tags: tuple[str, ...] = ()
    outputs: tuple[Output, ...] = (Output(kind="docker"),)
    base: str | None = None
    python: tuple[int, int] | None = None
    lock_mode: str = "check-if-present"
    """``locked`` (refuse a stale lock), ``frozen`` (use as is) or ``check-if-present``."""
    groups: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    package: str | None = None
    """Build this workspace member (``project_dir`` is the workspace root)."""
    compile_bytecode: bool = True
    compile_with: str = "auto"
    """``auto`` (the base's own Python through Docker, else a host one of the same minor
    version, with a warning), ``host`` or ``image``."""
    platforms: tuple[str, ...] = ("linux/amd64",)
    """``os/arch`` of each image; more than one makes an image index (registry, oci)."""
    cache_dir: Path
    source_date_epoch: int = 0
    mirrors: Mapping[str, str] = field(default_factory=dict)
    docker_config: Path | None = None
    expect_digest: str | None = None
    """Refuse to send the image anywhere unless its (or its index's) digest is this."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildResult:
    """What was built and where it went."""

    manifest_digest: str
    """The image manifest's digest, or the image index's for several platforms."""
    written: tuple[str, ...]
    """One line per sink: what was loaded, written or pushed."""

    def summary_lines(self) -> list[str]:
        """Lines the CLI prints on success."""
        return [*self.written, f"digest: {self.manifest_digest}"]


def run_build(
    request: BuildRequest, *, http: httpx.Client, reporter: Reporter | None = None
) -> BuildResult:
    """Build the image described by ``request`` and send it to every output."""
    from concurrent.futures import ThreadPoolExecutor

    from imagebuild.build.pep517 import BuildEnvironments, build_project_wheel
    from imagebuild.image.mutate import build_index
    from imagebuild.image.name import ImageReference
    from imagebuild.image.store import BlobStore
    from imagebuild.lock.load import find_lock, load_lock
    from imagebuild.lock.pylock import recorded_bases
    from imagebuild.sinks.auth import CredentialStore
    from imagebuild.sinks.remote import RegistryClient

    reporter = reporter or NullReporter()
    _check_platforms(request)
    project, workspace, member_lock = locate_lock(request.project_dir, request.package)
    project_dir = project.root
    settings = parse_settings(project.tool_imgbuild)
    settings = _apply_overrides(
        settings,
        base=request.base,
        python=request.python,
        groups=request.groups,
        extras=request.extras,
    )
    tags = request.tags or (f"{project.name}:latest",)
    # A lock records no credentials: find them again for the project's indexes.
    indexes = lock_indexes(settings, project, workspace)
    credentials = index_credentials(indexes, project, workspace)
    http.auth = credentials
    for tag in tags:
        ImageReference.parse(tag)  # a bad tag fails now, not after the build

    if request.package is not None:
        lock_path: Path | None = member_lock if member_lock.is_file() else None
    else:
        lock_path = find_lock(project_dir)
    if lock_path is None:
        if request.lock_mode != "check-if-present":
            raise LockError(
                f"{request.project_dir}: no {member_lock.name} or uv.lock to build from",
                hint="run 'imgbuild lock' (or 'uv lock'), or drop --locked/--frozen",
            )
        # Like `uv run`: no lock yet, so make one first.
        reporter.step("lock: no lock file, locking first")
        lock_path = run_lock(
            LockRequest(
                project_dir=request.project_dir,
                cache_dir=request.cache_dir,
                base=request.base,
                python=request.python,
                mirrors=request.mirrors,
                docker_config=request.docker_config,
                package=request.package,
            ),
            http=http,
            reporter=reporter,
        ).path
    lock = load_lock(lock_path)
    cache = request.cache_dir
    store = BlobStore(cache / "blobs")
    registry = RegistryClient(
        http, credentials=CredentialStore.from_docker_config(request.docker_config)
    )
    # imgbuild's own lock pins the base to the digest it was made for: the same lock
    # builds on the same base after its tag has moved (`imgbuild lock --upgrade` moves it).
    pinned = recorded_bases(lock.path) if lock.kind == "pylock" else {}
    if request.lock_mode in ("locked", "check-if-present"):
        try:
            _check_lock(lock, project, workspace, settings, registry, store, cache, pinned, request)
        except LockError as exc:
            if request.lock_mode == "locked":
                raise
            # A stale lock is built as it is, but never silently.
            reporter.warn(f"{exc}; building from the lock as it is")
    reporter.step(f"lock: {lock_path.name}")

    # Build backends come from the indexes the project locks from, never from elsewhere.
    envs = BuildEnvironments(
        root=cache / "build-envs",
        indexes=tuple(credentials.authenticated(url) for url in indexes),
    )
    with (
        tempfile.TemporaryDirectory(prefix="imgbuild-", dir=_tmp_root(cache)) as tmp,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgbuild-project") as pool,
    ):
        work = Path(tmp)
        # The project's own wheel needs neither the base nor the dependencies: it is built
        # while they are pulled and fetched.
        reporter.step(f"build: {project.name} wheel")
        project_build = pool.submit(
            build_project_wheel,
            project_dir,
            work / "dist",
            source_date_epoch=request.source_date_epoch,
            envs=envs,
        )

        entry, reference = _base_reference(settings, project)
        run = _Run(
            request=request,
            project=project,
            settings=settings,
            lock=lock,
            http=http,
            registry=registry,
            store=store,
            envs=envs,
            work=work,
            reporter=reporter,
            entry=entry,
            reference=reference,
            base=_pinned_reference(reference, pinned).with_mirrors(request.mirrors),
            pinned=reference in pinned,
            project_wheel=project_build,
        )
        platforms = [_build_platform(run, platform) for platform in request.platforms]
        if len(platforms) == 1:
            target_image: Image | ImageIndex = platforms[0].image
        else:
            target_image = build_index([p.image for p in platforms], store)
        if request.expect_digest and target_image.manifest.digest != request.expect_digest:
            raise ImageError(
                f"built {target_image.manifest.digest}, not the expected "
                f"{request.expect_digest}; nothing was written, loaded or pushed",
                hint="the lock, the base's digest, SOURCE_DATE_EPOCH, --platform or the "
                "project's files differ from the build that gave the expected digest",
            )
        if len(platforms) == 1:
            (one,) = platforms
            written = _write_contexts(
                request, project, reference, run.base, one.base, one.layers, one.config, store
            )
        else:
            written = []
        written += _send(
            target_image,
            request,
            tags,
            work,
            registry,
            reporter,
            _engine_base_tag(platforms[0].base),
        )

    return BuildResult(manifest_digest=target_image.manifest.digest, written=tuple(written))


@dataclass(kw_only=True, slots=True)
class _Run:
    """What every platform's image of one build is made from, and what they share."""

    request: BuildRequest
    project: ProjectSpec
    settings: ImageSettings
    lock: Lock
    http: httpx.Client
    registry: RegistryClient
    store: BlobStore
    envs: BuildEnvironments
    work: Path
    reporter: Reporter
    entry: CatalogEntry | None
    """The base's catalog entry, if it is named by flavor."""
    reference: str
    """The base as configured."""
    base: ImageReference
    """The base to pull: at its pinned digest, through the mirrors."""
    pinned: bool
    project_wheel: Future[Path]
    """Built in the background while the first platform's base and wheels come in."""
    local_wheels: dict[str, PlannedWheel] = field(default_factory=dict)
    """Workspace members and path dependencies, built once for every platform."""
    compilers: dict[str, BytecodeCompiler | None] = field(default_factory=dict)
    """By architecture."""


def _build_platform(run: _Run, platform: str) -> _PlatformImage:
    """Pull the base for ``platform``, pick and fetch its wheels, and build its image."""
    from imagebuild.build.pep517 import build_project_wheel
    from imagebuild.install.fetch import WheelCache, fetch_wheels
    from imagebuild.lock.select import select_packages
    from imagebuild.target.platform import TargetPlatform

    request, settings, store, reporter = run.request, run.settings, run.store, run.reporter
    cache = request.cache_dir
    # Base image and the target platform it defines.
    os_name, _, arch = platform.partition("/")
    if run.pinned:
        note = f" (pinned by {run.lock.filename})"
    elif run.lock.kind == "pylock":
        note = (
            f" (not pinned by {run.lock.filename}: the tag is used; "
            "'imgbuild lock --upgrade' pins it)"
        )
    else:
        note = ""
    reporter.step(f"base: {run.base} for {platform}{note}")
    base_image = run.registry.pull_image(run.base, platform=(os_name, arch), store=store)
    facts = _base_facts(base_image, store, cache, arch, run.entry)
    if settings.python is not None and facts.python_version != settings.python:
        raise ProjectError(
            f"base {run.reference} has Python {'.'.join(map(str, facts.python_version))}, "
            f"not {'.'.join(map(str, settings.python))}",
            hint="pick a base with that Python or change --python",
        )
    target = TargetPlatform.from_oci(
        architecture=arch,
        python_version=facts.python_version,
        libc="musl" if facts.libc == "musl" else "glibc",
        libc_version=facts.libc_version,
    )

    # Wheels for the locked dependencies, chosen for the target and fetched.
    packages = select_packages(
        run.lock,
        root=run.project.name,
        target=target,
        extras=set(settings.extras),
        groups=set(settings.groups),
    )
    chosen, from_sdist, local = _sort_sources(packages, target)
    reporter.step(f"fetch: {len(chosen)} wheels for {target.describe()}")
    paths = fetch_wheels(run.http, [wheel for _, wheel in chosen], WheelCache(cache / "wheels"))
    dependencies = [
        PlannedWheel(name=pkg.name, version=str(pkg.version), path=paths[wheel])
        for pkg, wheel in chosen
    ]
    for pkg in from_sdist:
        from imagebuild.build.sdist import build_sdist_wheel

        assert pkg.sdist is not None
        reporter.step(f"build: {pkg.name} {pkg.version} from its sdist")
        wheel_path = build_sdist_wheel(
            run.http,
            pkg.sdist.url,
            (pkg.sdist.sha256 or "").removeprefix("sha256:"),
            pkg.sdist.filename,
            cache,
            indexes=run.envs.indexes,
        )
        dependencies.append(PlannedWheel(name=pkg.name, version=str(pkg.version), path=wheel_path))

    members = []
    for pkg in local:
        if pkg.name not in run.local_wheels:
            # Workspace members and path dependencies: built like the project, from source.
            source_dir = (run.lock.path.parent / pkg.source.location).resolve()
            reporter.step(f"build: {pkg.name} wheel from {pkg.source.location}")
            member_wheel = build_project_wheel(
                source_dir,
                run.work / "dist-local",
                source_date_epoch=request.source_date_epoch,
                envs=run.envs,
            )
            run.local_wheels[pkg.name] = PlannedWheel(
                name=pkg.name, version=member_wheel.name.split("-")[1], path=member_wheel
            )
        members.append(run.local_wheels[pkg.name])
    project_wheel = run.project_wheel.result()
    plan = plan_layers(
        dependencies,
        PlannedWheel(
            name=run.project.name, version=project_wheel.name.split("-")[1], path=project_wheel
        ),
        local=members,
    )
    venv = VenvLayout(base_interpreter=facts.interpreter, python_version=facts.python_version)
    if request.compile_bytecode and arch not in run.compilers:
        run.compilers[arch] = _compiler(
            facts,
            base_image,
            store,
            run.work,
            reporter,
            request.compile_with,
            native=lambda native: _pull_variant(run.registry, run.base, native, store, cache),
        )
    layers = _build_layers(
        plan, venv, run.compilers.get(arch), store, cache, run.work, request, reporter
    )
    config = _image_config(base_image, settings, run.project, venv, run.reference)
    image = _assemble(base_image, layers, config, request, run.reference, store)
    return _PlatformImage(image=image, base=base_image, layers=tuple(layers), config=config)


@dataclass(frozen=True, kw_only=True, slots=True)
class _PlatformImage:
    """One platform's image and what it was made from."""

    image: Image
    base: BaseImage
    layers: tuple[Layer, ...]
    config: ImageConfig


def _pull_variant(
    registry: RegistryClient, ref: ImageReference, arch: str, store: BlobStore, cache: Path
) -> tuple[BaseImage, BaseFacts]:
    """The base's variant for ``arch`` (the engine's own), to run its Python."""
    base = registry.pull_image(ref, platform=("linux", arch), store=store)
    return base, _base_facts(base, store, cache, arch, None)


def _check_platforms(request: BuildRequest) -> None:
    """Several platforms make an image index, which only some outputs can take."""
    for platform in request.platforms:
        os_name, sep, arch = platform.partition("/")
        if os_name != "linux" or not sep or not arch:
            raise ProjectError(
                f"--platform {platform!r}: not a platform imgbuild builds",
                hint="use linux/amd64 or linux/arm64",
            )
    if len(set(request.platforms)) != len(request.platforms):
        raise ProjectError(f"--platform names a platform twice: {', '.join(request.platforms)}")
    if len(request.platforms) > 1:
        for output in request.outputs:
            if output.kind in ("docker", "context"):
                raise ProjectError(
                    f"--output {output.kind} takes one platform, and "
                    f"{len(request.platforms)} were given",
                    hint="pass one --platform, or write the image index with --output "
                    "registry, oci:DIR or oci-archive:FILE",
                )


def _apply_overrides(
    settings: ImageSettings,
    *,
    base: str | None,
    python: tuple[int, int] | None,
    groups: Sequence[str] = (),
    extras: Sequence[str] = (),
) -> ImageSettings:
    """Command-line values win; groups and extras add to the configured ones."""
    from dataclasses import replace

    return replace(
        settings,
        base=base or settings.base,
        python=python or settings.python,
        groups=tuple(sorted(set(settings.groups) | set(groups))),
        extras=tuple(sorted(set(settings.extras) | set(extras))),
    )


def _sort_sources(
    packages: Sequence[LockedPackage], target: TargetPlatform
) -> tuple[list[tuple[LockedPackage, WheelFile]], list[LockedPackage], list[LockedPackage]]:
    """Split the selection: a wheel for the target, else the sdist, else a local directory."""
    from imagebuild.errors import TargetError

    wheels: list[tuple[LockedPackage, WheelFile]] = []
    sdists: list[LockedPackage] = []
    local: list[LockedPackage] = []
    for pkg in packages:
        if pkg.wheels:
            try:
                wheels.append((pkg, target.choose_wheel(pkg.name, pkg.wheels)))
                continue
            except TargetError:
                if pkg.sdist is None:
                    raise
        if pkg.sdist is not None:
            sdists.append(pkg)
        else:
            local.append(pkg)
    return wheels, sdists, local


def _check_lock(
    lock: Lock,
    project: ProjectSpec,
    workspace: Workspace,
    settings: ImageSettings,
    registry: RegistryClient,
    store: BlobStore,
    cache: Path,
    pinned: Mapping[str, Digest],
    request: BuildRequest,
) -> None:
    """``--locked``: imgbuild's own pylock by its recorded inputs, others as uv judges."""
    from imagebuild.lock.staleness import check_locked, check_pylock
    from imagebuild.lock.writer import project_inputs, project_roots
    from imagebuild.project.workspace import expand_local

    if lock.kind == "pylock":
        _, local, _ = expand_local(project_roots(project), project, workspace)
        # A base given by reference is pulled (at its pinned digest) to learn the targets.
        targets, _ = lock_targets(
            settings,
            project,
            registry=registry,
            store=store,
            cache=cache,
            mirrors=request.mirrors,
            pinned=pinned,
        )
        inputs = project_inputs(
            project,
            indexes=lock_indexes(settings, project, workspace),
            prereleases=settings.prereleases,
            targets=targets,
            local=[p.project for p in local.values()],
        )
        if check_pylock(lock.path, inputs):
            return
    check_locked(lock, project)


def _base_reference(
    settings: ImageSettings, project: ProjectSpec
) -> tuple[CatalogEntry | None, str]:
    """The catalog entry (for a flavor name) and the reference to pull."""
    catalog = load_catalog()
    flavors = {entry.flavor for entry in catalog}
    if settings.base not in flavors:
        return None, settings.base
    python = settings.python or _default_python(catalog, settings.base, project)
    entry = find_entry(catalog, settings.base, python)
    return entry, entry.reference


def _default_python(
    catalog: Sequence[CatalogEntry], flavor: str, project: ProjectSpec
) -> tuple[int, int] | None:
    """``.python-version`` if the project pins one (as uv does), else the newest allowed."""
    pin = project.root / ".python-version"
    if pin.is_file():
        text = pin.read_text(encoding="utf-8").strip().splitlines()[0]
        return parse_python_version(".".join(text.split(".")[:2]), str(pin))
    allowed = [
        e.python_version
        for e in catalog
        if e.flavor == flavor
        and (
            project.requires_python is None
            or project.requires_python.contains(".".join(map(str, e.python_version)) + ".0")
        )
    ]
    if not allowed:
        raise ProjectError(
            f"{project.root / 'pyproject.toml'}: requires-python {project.requires_python} "
            f"allows no Python of base {flavor!r}",
            hint="set [tool.imgbuild] base to another image",
        )
    return max(allowed)


def _base_facts(
    base: BaseImage, store: BlobStore, cache: Path, arch: str, entry: CatalogEntry | None
) -> BaseFacts:
    """Inspect the base once per manifest digest; the answer is cached as JSON."""
    record = cache / "bases" / f"{base.manifest_digest.removeprefix('sha256:')}.json"
    if record.is_file():
        data = json.loads(record.read_text(encoding="utf-8"))
        return BaseFacts(
            interpreter=PurePosixPath(data["interpreter"]),
            python_version=(data["python_version"][0], data["python_version"][1]),
            libc=data["libc"],
            libc_version=(data["libc_version"][0], data["libc_version"][1]),
            shell=data["shell"],
            arch=data["arch"],
        )
    facts = inspect_layers([store.path(d.digest) for d in base.layers], arch=arch, expected=entry)
    _write_json(
        record,
        {
            "interpreter": str(facts.interpreter),
            "python_version": list(facts.python_version),
            "libc": facts.libc,
            "libc_version": list(facts.libc_version),
            "shell": facts.shell,
            "arch": facts.arch,
        },
    )
    return facts


def _compiler(
    facts: BaseFacts,
    base: BaseImage,
    store: BlobStore,
    work: Path,
    reporter: Reporter,
    mode: str,
    native: Callable[[str], tuple[BaseImage, BaseFacts]] | None = None,
) -> BytecodeCompiler:
    """The base's own Python through Docker, else a host one of the target's minor version.

    An engine cannot run a base built for another CPU (no emulation is assumed): then
    ``native(arch)`` gives the same base's variant for the engine's CPU, whose Python of
    the same minor version writes pycs as valid there (bytecode does not depend on the CPU,
    and a multi-platform base ships one Python release on every platform).
    """
    from imagebuild.errors import DockerError
    from imagebuild.image.model import ImageConfig
    from imagebuild.image.mutate import build_image
    from imagebuild.sinks.engine import DockerEngine, EngineCompiler
    from imagebuild.sinks.layout import write_docker_archive

    version = ".".join(map(str, facts.python_version))
    host = find_host_python(facts.python_version)
    if mode == "host" and host is None:
        raise LayerError(
            f"no working python{version} on this host to compile bytecode",
            hint="install it, use --compile-with image, or pass --no-compile",
        )
    if mode == "host" and host is not None:
        return HostCompiler(host)
    # The base's own interpreter writes exactly the bytes the image would: a host Python of
    # another patch release may not (the compiler changes between 3.X.Y releases), so it is
    # preferred whenever an engine answers.
    try:
        engine = DockerEngine.from_env()
    except DockerError as exc:
        if mode == "auto" and host is not None:
            reporter.warn(
                f"compiling bytecode with the host's {host} (no Docker engine: {exc.message}); "
                "pyc bytes, and so the digest, follow that interpreter's patch release"
            )
            return HostCompiler(host)
        if mode == "image":
            raise LayerError(
                f"--compile-with image needs a Docker engine to run the base's python{version} "
                f"({exc.message})",
                hint="start Docker, set DOCKER_HOST, or use --compile-with host",
            ) from exc
        raise LayerError(
            f"no Python {version} on this host to compile bytecode for the target, and no "
            f"Docker engine to run the base image's ({exc.message})",
            hint=f"install python{version}, start Docker, or pass --no-compile",
        ) from exc
    engine_arch = engine.architecture()
    target_arch = str(base.config.get("architecture", engine_arch))
    if target_arch != engine_arch and native is not None:
        base, variant = native(engine_arch)
        if variant.python_version != facts.python_version:
            raise LayerError(
                f"the base's linux/{engine_arch} variant has Python "
                f"{'.'.join(map(str, variant.python_version))}, not {version}, so it cannot "
                f"compile bytecode for linux/{target_arch}",
                hint="pass --no-compile, or --compile-with host with a host python" + version,
            )
        reporter.step(
            f"compile: linux/{target_arch} bytecode by the base's linux/{engine_arch} "
            f"python{version} (the engine runs {engine_arch} only)"
        )
        facts = variant
    tag = _engine_base_tag(base)
    if engine.image_id(tag) is None:
        reporter.step(f"compile: loading the base into Docker to run its python{version}")
        image = build_image(base, [], config=ImageConfig(), created=_rfc3339(0), store=store)
        archive = work / "base.tar"
        write_docker_archive(image, archive, repo_tags=[tag])
        engine.load(archive)
        archive.unlink()
    return EngineCompiler(engine, tag, facts.interpreter)


def _layer_key(spec: LayerSpec, venv: VenvLayout, compiled: str | None, mtime: int) -> str:
    """Everything a layer's bytes depend on; equal keys give equal layers."""
    from imagebuild.digest import digest_file

    material = {
        "imgbuild": __version__,
        "kind": spec.kind,
        "wheels": [[w.name, w.version, digest_file(w.path)] for w in spec.wheels],
        "venv": str(venv.root),
        "interpreter": str(venv.base_interpreter),
        "python": list(venv.python_version),
        "compiled": compiled,
        "mtime": mtime,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _build_layers(
    plan: LayerPlan,
    venv: VenvLayout,
    compiler: BytecodeCompiler | None,
    store: BlobStore,
    cache: Path,
    work: Path,
    request: BuildRequest,
    reporter: Reporter,
) -> list[Layer]:
    from imagebuild.image.model import Layer
    from imagebuild.image.tarball import build_layer

    layers: dict[int, Layer] = {}
    pending: list[tuple[int, LayerSpec, Path, Path]] = []
    for index, spec in enumerate(plan.layers):
        compiled_by = compiler.identity if compiler is not None and spec.wheels else None
        key = _layer_key(spec, venv, compiled_by, request.source_date_epoch)
        record = cache / "layers" / f"{key}.json"
        if record.is_file():
            data = json.loads(record.read_text(encoding="utf-8"))
            if store.has(data["digest"]):
                layers[index] = Layer(**data)
                continue
        reporter.step(f"layer {index + 1}/{len(plan.layers)}: {spec.description}")
        staging = work / "layers" / str(index)
        staging.mkdir(parents=True)
        if spec.kind == "venv":
            stage_venv(staging, venv)
        for wheel in spec.wheels:
            install_wheel(wheel.path, staging, venv)
        pending.append((index, spec, staging, record))

    # One compiler run for every new layer: with the base's own Python that is one
    # container, not one per layer.
    sources = [
        f for _, spec, staging, _ in pending if spec.wheels for f in compile_sources(staging, venv)
    ]
    if compiler is not None and sources:
        reporter.step(f"compile: {len(sources)} modules")
        compiler.compile(work / "layers", sources)

    for index, spec, staging, record in pending:
        layer = build_layer(
            staging, store, mtime=request.source_date_epoch, created_by=spec.description
        )
        shutil.rmtree(staging)
        _write_json(
            record,
            {
                "digest": layer.digest,
                "diff_id": layer.diff_id,
                "size": layer.size,
                "media_type": layer.media_type,
                "created_by": layer.created_by,
            },
        )
        layers[index] = layer
    return [layers[index] for index in range(len(plan.layers))]


def _entrypoint(settings: ImageSettings, project: ProjectSpec, venv: VenvLayout) -> tuple[str, ...]:
    bin_dir = venv.root / "bin"
    if settings.entrypoint:
        first, *rest = settings.entrypoint
        return (first if "/" in first else str(bin_dir / first), *rest)
    scripts = sorted(project.scripts)
    if len(scripts) == 1:
        return (str(bin_dir / scripts[0]),)
    if not scripts:
        return (str(venv.python),)
    raise ProjectError(
        f"{project.root / 'pyproject.toml'}: several [project.scripts] ({', '.join(scripts)}) "
        "and no entrypoint",
        hint='set [tool.imgbuild] entrypoint = ["NAME"]',
    )


def _labels(project: ProjectSpec, settings: ImageSettings, base_ref: str) -> dict[str, str]:
    prefix = "org.opencontainers.image."
    labels = {f"{prefix}title": project.name, f"{prefix}base.name": base_ref}
    if project.version:
        labels[f"{prefix}version"] = str(project.version)
    if project.description:
        labels[f"{prefix}description"] = project.description[:512]
    if project.license:
        labels[f"{prefix}licenses"] = project.license[:256]
    urls = {k.lower(): v for k, v in project.urls.items()}
    for key in ("source", "repository", "source code", "code", "homepage"):
        if key in urls and any(h in urls[key] for h in ("github.com", "gitlab", "codeberg")):
            labels[f"{prefix}source"] = urls[key]
            break
    if "documentation" in urls:
        labels[f"{prefix}documentation"] = urls["documentation"]
    labels.update(dict(settings.labels))
    return labels


def _image_config(
    base: BaseImage,
    settings: ImageSettings,
    project: ProjectSpec,
    venv: VenvLayout,
    base_ref: str,
) -> ImageConfig:
    from imagebuild.image.model import ImageConfig

    base_env = _base_env(base)
    path = f"{venv.root}/bin:" + base_env.get(
        "PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    )
    env = (("PATH", path), ("VIRTUAL_ENV", str(venv.root)), *settings.env)
    return ImageConfig(
        entrypoint=_entrypoint(settings, project, venv),
        cmd=settings.cmd or (),
        env=env,
        user=settings.user,
        workdir=settings.workdir,
        labels=tuple(sorted(_labels(project, settings, base_ref).items())),
        exposed_ports=tuple(f"{p}/tcp" for p in settings.ports),
    )


def _assemble(
    base: BaseImage,
    layers: Sequence[Layer],
    config: ImageConfig,
    request: BuildRequest,
    base_ref: str,
    store: BlobStore,
) -> Image:
    from imagebuild.image.mutate import build_image

    annotations = {
        "org.opencontainers.image.base.name": base_ref,
        "org.opencontainers.image.base.digest": base.manifest_digest,
    }
    return build_image(
        base,
        layers,
        config=config,
        created=_rfc3339(request.source_date_epoch),
        store=store,
        annotations=annotations,
    )


def _write_contexts(
    request: BuildRequest,
    project: ProjectSpec,
    upstream: str,
    pulled: ImageReference,
    base: BaseImage,
    layers: Sequence[Layer],
    config: ImageConfig,
    store: BlobStore,
) -> list[str]:
    """``context:DIR`` outputs: FROM the base as it was pulled, pinned by digest."""
    from imagebuild.image.name import ImageReference
    from imagebuild.sinks.context import write_docker_context

    mirrored = pulled.name != ImageReference.parse(upstream).name

    written = []
    for output in request.outputs:
        if output.kind == "context" and output.path is not None:
            write_docker_context(
                output.path,
                title=f"{project.name} {project.version or ''}".strip(),
                base=f"{pulled.name}@{base.manifest_digest}",
                upstream=upstream if mirrored else None,
                layers=layers,
                config=config,
                store=store,
            )
            written.append(f"wrote Docker build context {output.path}")
    return written


def _send(
    image: Image | ImageIndex,
    request: BuildRequest,
    tags: Sequence[str],
    work: Path,
    registry: RegistryClient,
    reporter: Reporter,
    base_tag: str,
) -> list[str]:
    from imagebuild.image.model import ImageIndex
    from imagebuild.image.name import ImageReference
    from imagebuild.sinks.layout import write_oci_archive, write_oci_layout

    refs = [ImageReference.parse(tag) for tag in tags]
    ref_name = refs[0].tag or "latest"
    written = []
    for output in request.outputs:
        if output.kind == "oci" and output.path is not None:
            write_oci_layout(image, output.path, ref_name=ref_name)
            written.append(f"wrote OCI layout {output.path}")
        elif output.kind == "oci-archive" and output.path is not None:
            write_oci_archive(image, output.path, ref_name=ref_name)
            written.append(f"wrote OCI archive {output.path}")
    for output in request.outputs:
        if output.kind == "docker":
            from imagebuild.sinks.engine import DockerEngine

            assert not isinstance(image, ImageIndex), "one platform only (_check_platforms)"
            engine = DockerEngine.from_env()
            _load(engine, image, [str(r) for r in refs], work, base_tag, reporter)
            written.extend(f"loaded {ref}" for ref in refs)
        elif output.kind == "registry":
            for ref in refs:
                if isinstance(image, ImageIndex):
                    digest = registry.push_index(image, ref)
                else:
                    digest = registry.push_image(image, ref)
                written.append(f"pushed {ref}@{digest}")
    return written


def _load(
    engine: DockerEngine,
    image: Image,
    tags: Sequence[str],
    work: Path,
    base_tag: str,
    reporter: Reporter,
) -> None:
    """``docker load`` sending only the layers the engine lacks.

    The engine's copy of the base (loaded to compile bytecode) and the images these tags
    named before (the last build) tell which leading layers it already holds; see
    ``oci.write_docker_archive``. A loader that still wants them gets everything.
    """
    from imagebuild.errors import DockerError
    from imagebuild.sinks.layout import write_docker_archive

    config = json.loads(image.store.path(image.config.digest).read_bytes())
    ours = tuple(config["rootfs"]["diff_ids"])
    present = 0
    for candidate in (base_tag, *tags):
        theirs = engine.diff_ids(candidate)
        common = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        present = max(present, min(len(ours), len(theirs)) if common is None else common)
    archive = work / "image.tar"
    write_docker_archive(image, archive, repo_tags=tags, present=present)
    reporter.step(f"docker: loading ({len(ours) - present} of {len(ours)} layers to send)")
    try:
        engine.load(archive)
    except DockerError:
        if present == 0:
            raise
        reporter.step("docker: the engine wants every layer; loading them all")
        write_docker_archive(image, archive, repo_tags=tags)
        engine.load(archive)
    finally:
        archive.unlink(missing_ok=True)


def _engine_base_tag(base: BaseImage) -> str:
    """The tag the base has in the engine once loaded there (to run its Python)."""
    return f"imgbuild-base:{base.manifest_digest.removeprefix('sha256:')[:16]}"


def _base_env(base: BaseImage) -> dict[str, str]:
    config = base.config.get("config")
    env = config.get("Env") if isinstance(config, dict) else None
    pairs = (item.partition("=") for item in env or [] if isinstance(item, str))
    return {key: value for key, _, value in pairs}


def _rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tmp_root(cache: Path) -> Path:
    """Scratch space inside the cache, so staging and blobs share a filesystem."""
    root = cache / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _write_json(path: Path, data: object) -> None:
    """Write JSON atomically, so a killed build never leaves a torn cache record."""
    from imagebuild.cache import write_atomic

    write_atomic(path, json.dumps(data, sort_keys=True).encode("utf-8"))


# -- locking ----------------------------------------------------------------------------

PYPI = "https://pypi.org/simple/"


@dataclass(frozen=True, kw_only=True, slots=True)
class LockRequest:
    """What ``imgbuild lock`` was asked to do."""

    project_dir: Path
    cache_dir: Path
    check: bool = False
    """Only judge whether the existing lock is current (no network); never write."""
    upgrade: bool = False
    """Ignore the existing pins."""
    upgrade_packages: tuple[str, ...] = ()
    """Ignore the existing pins of these packages only."""
    index_urls: tuple[str, ...] = ()
    """Command-line indexes (primary first); empty means settings, then [[tool.uv.index]]."""
    package: str | None = None
    """Lock this workspace member (into ``pylock.<name>.toml`` at the workspace root)."""
    base: str | None = None
    python: tuple[int, int] | None = None
    mirrors: Mapping[str, str] = field(default_factory=dict)
    docker_config: Path | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class LockResult:
    """What the lock step did."""

    path: Path
    changed: bool
    packages: int
    targets: tuple[str, ...]

    def summary_lines(self) -> list[str]:
        """Lines the CLI prints on success."""
        verb = "wrote" if self.changed else "unchanged"
        return [f"{verb} {self.path} ({self.packages} packages for {', '.join(self.targets)})"]


def index_credentials(
    indexes: Sequence[str], project: ProjectSpec, workspace: Workspace | None
) -> IndexCredentials:
    """Credentials for ``indexes`` (the ones in use) and every ``[[tool.uv.index]]``."""
    from imagebuild.net.credentials import IndexCredentials, IndexEntry

    entries = [IndexEntry(url=url) for url in indexes]
    for tool_uv in (project.tool_uv, workspace.tool_uv if workspace is not None else {}):
        declared = tool_uv.get("index", [])
        for item in declared if isinstance(declared, list) else []:
            if isinstance(item, dict) and isinstance(item.get("url"), str):
                name = item.get("name")
                entries.append(IndexEntry(url=item["url"], name=str(name) if name else None))
    return IndexCredentials(entries)


def lock_indexes(
    settings: ImageSettings, project: ProjectSpec, workspace: Workspace | None = None
) -> tuple[str, ...]:
    """Indexes in priority order: [tool.imgbuild], else [[tool.uv.index]] (as uv orders them).

    A workspace member without index settings of its own takes the workspace root's.
    """
    if settings.index_url:
        return (settings.index_url, *settings.extra_index_urls)
    if (
        workspace is not None
        and project.root != workspace.root
        and not project.tool_uv.get("index")
    ):
        root_settings = parse_settings(workspace.tool_imgbuild, source=str(workspace.root))
        if root_settings.index_url:
            return (root_settings.index_url, *root_settings.extra_index_urls)
        uv_indexes: object = workspace.tool_uv.get("index", [])
    else:
        uv_indexes = project.tool_uv.get("index", [])
    preferred: list[str] = []
    default = PYPI
    if isinstance(uv_indexes, list):
        for entry in uv_indexes:
            if not isinstance(entry, dict) or entry.get("explicit") or "url" not in entry:
                continue
            if entry.get("default"):
                default = str(entry["url"])
            else:
                preferred.append(str(entry["url"]))
    return (*settings.extra_index_urls, *preferred, default)


def lock_targets(
    settings: ImageSettings,
    project: ProjectSpec,
    *,
    registry: RegistryClient | None,
    store: BlobStore | None,
    cache: Path,
    mirrors: Mapping[str, str],
    pinned: Mapping[str, Digest] | None = None,
) -> tuple[tuple[TargetPlatform, ...], dict[str, str]]:
    """The targets a lock covers, and the base digests seen (reference -> digest).

    A base given by reference is pulled to learn them: at the digest in ``pinned`` (what
    the lock recorded) when there is one, else at its tag.
    """
    from imagebuild.target.platform import TargetPlatform

    entry, reference = _base_reference(settings, project)
    archs = [p.partition("/")[2] for p in settings.platforms]
    digests: dict[str, str] = {}
    if entry is not None:
        targets = tuple(
            TargetPlatform.from_oci(
                architecture=arch,
                python_version=entry.python_version,
                libc="musl" if entry.libc == "musl" else "glibc",
                libc_version=entry.libc_version,
            )
            for arch in archs
        )
        return targets, digests
    if registry is None or store is None:
        raise ProjectError(f"base {reference!r} must be pulled to learn its Python and libc")
    found = []
    ref = _pinned_reference(reference, pinned or {}).with_mirrors(mirrors)
    # The digest of what the tag names (an index, for a multi-platform base), once.
    digests[reference] = ref.digest or registry.fetch_manifest(ref)[2]
    for arch in archs:
        base = registry.pull_image(ref, platform=("linux", arch), store=store)
        facts = _base_facts(base, store, cache, arch, None)
        found.append(
            TargetPlatform.from_oci(
                architecture=arch,
                python_version=facts.python_version,
                libc="musl" if facts.libc == "musl" else "glibc",
                libc_version=facts.libc_version,
            )
        )
    return tuple(found), digests


def _pinned_reference(reference: str, pinned: Mapping[str, Digest]) -> ImageReference:
    """``reference`` at the digest a lock recorded for it, if any."""
    from imagebuild.image.name import ImageReference

    ref = ImageReference.parse(reference)
    digest = pinned.get(reference)
    return ref.with_digest(digest) if digest and ref.digest is None else ref


def locate_lock(project_dir: Path, package: str | None) -> tuple[ProjectSpec, Workspace, Path]:
    """The project to lock, its workspace, and the lock file's path.

    Without ``package``: the project at ``project_dir`` and its ``pylock.toml``. With it:
    that member of the workspace rooted at ``project_dir``, locked into
    ``pylock.<name>.toml`` there (PEP 751's name for one service's lock).
    """
    from packaging.utils import canonicalize_name

    from imagebuild.project.spec import load_project
    from imagebuild.project.workspace import find_workspace_root, load_workspace

    if package is None:
        project = load_project(project_dir)
        return (
            project,
            load_workspace(find_workspace_root(project_dir)),
            project_dir / "pylock.toml",
        )
    workspace = load_workspace(project_dir)
    name = canonicalize_name(package)
    if name not in workspace.members:
        known = ", ".join(sorted(workspace.members)) or "none"
        raise ProjectError(
            f"{project_dir / 'pyproject.toml'}: no workspace member named {package!r}",
            hint=f"members: {known}",
        )
    return workspace.members[name], workspace, project_dir / f"pylock.{name}.toml"


def _lock_hints_path(cache: Path, project_dir: Path, indexes: Sequence[str]) -> Path:
    """Where the names a project's last lock needed are kept (a speed hint, nothing more)."""
    key = hashlib.sha256("\n".join([str(project_dir), *indexes]).encode()).hexdigest()
    return cache / "lock-hints" / f"{key[:32]}.json"


def _read_hints(path: Path) -> list[NormalizedName]:
    from packaging.utils import canonicalize_name

    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return (
        [canonicalize_name(n) for n in names if isinstance(n, str)]
        if isinstance(names, list)
        else []
    )


def _lookup_digest_in_background(
    registry: RegistryClient, reference: str, mirrors: Mapping[str, str]
) -> Callable[[], dict[str, str]]:
    """Start resolving ``reference`` to a manifest digest; the returned call waits for it."""
    import threading

    from imagebuild.errors import RegistryError
    from imagebuild.image.name import ImageReference

    found: dict[str, str] = {}

    def lookup() -> None:
        try:
            ref = ImageReference.parse(reference).with_mirrors(mirrors)
            found[reference] = registry.fetch_manifest(ref)[2]
        except RegistryError:
            pass  # recorded when reachable; the lock does not depend on it

    thread = threading.Thread(target=lookup, name="imgbuild-base-digest", daemon=True)
    thread.start()

    def wait() -> dict[str, str]:
        thread.join(timeout=30)
        return found

    return wait


def _declared_where(pyproject: Path | None, lock_dir: Path, origin: str) -> str:
    """Where a root requirement comes from, for conflict messages: the project's own
    pyproject.toml (with its extra or group), or a local project's, relative to the lock.
    """
    if pyproject is not None:
        try:
            return pyproject.relative_to(lock_dir).as_posix()
        except ValueError:
            return str(pyproject)
    return "pyproject.toml" if not origin else f"pyproject.toml {origin}"


def run_lock(
    request: LockRequest, *, http: httpx.Client, reporter: Reporter | None = None
) -> LockResult:
    """Resolve the project for every target and write (or check) ``pylock.toml``."""
    from imagebuild.image.store import BlobStore
    from imagebuild.index.simple import SimpleIndex
    from imagebuild.lock.resolve import resolve
    from imagebuild.lock.pylock import pins_as_preferences, recorded_bases
    from imagebuild.lock.staleness import check_pylock
    from imagebuild.lock.writer import project_inputs, project_roots, render_pylock, write_pylock
    from imagebuild.project.workspace import expand_local
    from imagebuild.sinks.auth import CredentialStore
    from imagebuild.sinks.remote import RegistryClient

    reporter = reporter or NullReporter()
    project, workspace, path = locate_lock(request.project_dir, request.package)
    settings = parse_settings(project.tool_imgbuild)
    settings = _apply_overrides(settings, base=request.base, python=request.python)
    indexes = request.index_urls or lock_indexes(settings, project, workspace)
    credentials = index_credentials(indexes, project, workspace)
    http.auth = credentials
    roots, local, declared_in = expand_local(project_roots(project), project, workspace)
    registry = RegistryClient(
        http, credentials=CredentialStore.from_docker_config(request.docker_config)
    )
    store = BlobStore(request.cache_dir / "blobs")
    # The base stays at the digest the lock recorded until --upgrade, like every pin.
    pinned = {} if request.upgrade else recorded_bases(path)
    targets, digests = lock_targets(
        settings,
        project,
        registry=registry,
        store=store,
        cache=request.cache_dir,
        mirrors=request.mirrors,
        pinned=pinned,
    )
    inputs = project_inputs(
        project,
        indexes=indexes,
        prereleases=settings.prereleases,
        targets=targets,
        local=[p.project for p in local.values()],
    )
    if request.check:
        if not path.is_file():
            raise LockError(f"{path.parent}: no {path.name}", hint="run 'imgbuild lock'")
        if not check_pylock(path, inputs):
            raise LockError(
                f"{path}: not written by imgbuild, so it cannot be checked",
                hint="run 'imgbuild lock' to replace it",
            )
        return LockResult(
            path=path, changed=False, packages=0, targets=tuple(t.describe() for t in targets)
        )

    if not request.upgrade and not request.upgrade_packages and path.is_file():
        # As `uv lock` does: a lock that still fits its inputs is kept as it is, with no
        # resolution and no request (an error here just means: resolve again).
        try:
            current = check_pylock(path, inputs)
        except LockError:
            current = False
        # Kept even when it records no digest for the base (the registry was unreachable,
        # or the base changed to one with the same targets): `--upgrade` records one.
        if current:
            reporter.step(f"lock: {path.name} is up to date")
            return LockResult(
                path=path,
                changed=False,
                packages=len(pins_as_preferences(path)),
                targets=tuple(t.describe() for t in targets),
            )

    # The catalog base's digest is recorded for the record only: look it up beside the
    # resolution rather than before it.
    digest_lookup = None
    entry, reference = _base_reference(settings, project)
    if entry is not None and reference in pinned:
        digests[reference] = pinned[reference]
    elif entry is not None:
        digest_lookup = _lookup_digest_in_background(registry, reference, request.mirrors)

    preferences = {} if request.upgrade else pins_as_preferences(path)
    for name in request.upgrade_packages:
        from packaging.utils import canonicalize_name

        preferences.pop(canonicalize_name(name), None)
    origins = {
        str(req): _declared_where(declared_in.get(str(req)), path.parent, origin)
        for origin, reqs in roots.items()
        for req in reqs
    }
    flat = [req for reqs in roots.values() for req in reqs]
    resolutions = []
    hints = _lock_hints_path(request.cache_dir, request.project_dir, indexes)
    # With their credentials in them: sdists' build requirements are installed from these
    # indexes by another process (the lock never records them, see locker.py).
    authenticated = [credentials.authenticated(url) for url in indexes]
    from imagebuild.build.sdist import sdist_metadata

    with SimpleIndex(
        http,
        authenticated,
        cache_dir=request.cache_dir,
        reporter=reporter,
        sdist_metadata=sdist_metadata,
    ) as index:
        # Every page the last lock of this project needed (and every locked name), fetched
        # at once instead of one dependency level at a time.
        index.prefetch(sorted(set(_read_hints(hints)) | set(preferences)))
        for target in targets:
            reporter.step(f"resolve: {target.describe()}")
            resolutions.append(
                resolve(
                    flat,
                    index=index,
                    target=target,
                    prereleases=settings.prereleases,
                    preferences=preferences,
                    origins=origins,
                    reporter=reporter,
                )
            )
    _write_json(hints, sorted({pin.name for r in resolutions for pin in r.pins}))
    if digest_lookup is not None:
        digests.update(digest_lookup())
    text = render_pylock(
        project,
        inputs,
        resolutions,
        roots=roots,
        lock_dir=path.parent,
        local=local,
        base_digests=digests,
    )
    old = path.read_text(encoding="utf-8") if path.is_file() else None
    if text != old:
        write_pylock(path, text)
    names = {pin.name for r in resolutions for pin in r.pins}
    return LockResult(
        path=path,
        changed=text != old,
        packages=len(names),
        targets=tuple(t.describe() for t in targets),
    )
