"""One platform's image: its base pulled, its wheels chosen and fetched, its layers built.

Everything the platforms of one build share arrives in a frozen ``PlatformBuild``; what
they build once for all (local wheels, a compiler per CPU) sits in two small memos.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from imagebuild.build.pep517 import BuildEnvironments
from imagebuild.build.runner import background_priority
from imagebuild.cache import CacheLayout
from imagebuild.debian.linklines import on_demand_line
from imagebuild.image.descriptor import Descriptor
from imagebuild.image.model import BaseImage, Image, ImageConfig, Layer
from imagebuild.image.store import BlobStore, LayerFiles
from imagebuild.install.fetch import WheelCache
from imagebuild.install.layers import BytecodeCompiler, VenvLayout, ready_installer
from imagebuild.install.plan import LayerPlan, LayerSpec, PlannedWheel, plan_layers
from imagebuild.lock.model import Lock, LockedPackage
from imagebuild.lock.select import select_packages, sort_sources
from imagebuild.pipeline.basecache import ArrivingLayers, keep_base, kept_tree
from imagebuild.pipeline.basepull import BaseSource, pull_base
from imagebuild.pipeline.bases import base_facts, target_of
from imagebuild.pipeline.compiler import (
    CompilerChoice,
    choose_compiler,
    expected_identity,
    keep_compiler,
    prestart,
)
from imagebuild.pipeline.config import (
    build_image_config,
    build_platform_image,
    check_entrypoint,
)
from imagebuild.pipeline.layers import LayerJob, RemoteLayers, build_layers, look_ahead
from imagebuild.pipeline.links import LinkRecords, check_image_links, gather_link_records
from imagebuild.pipeline.local import LocalWheels
from imagebuild.pipeline.outputs import fetched_from
from imagebuild.pipeline.ports import Ports
from imagebuild.pipeline.requests import BuildRequest
from imagebuild.pipeline.sbom import ready_renderer, sbom_document, sbom_file
from imagebuild.pipeline.stdlib import stdlib_layers, with_stdlib_bytecode
from imagebuild.pipeline.wheels import LazyWheels
from imagebuild.project.settings import ImageSettings
from imagebuild.project.spec import ProjectSpec
from imagebuild.target.base import BaseFacts
from imagebuild.target.platform import TargetPlatform


class Compilers:
    """One bytecode compiler per CPU architecture, chosen the first time it is needed."""

    def __init__(self) -> None:
        self._by_arch: dict[str, BytecodeCompiler] = {}

    def get(self, arch: str, choose: Callable[[], BytecodeCompiler]) -> BytecodeCompiler:
        """The compiler for ``arch``; ``choose`` makes it the first time."""
        if arch not in self._by_arch:
            self._by_arch[arch] = choose()
        return self._by_arch[arch]


@dataclass(frozen=True, kw_only=True, slots=True)
class PlatformBuild:
    """What every platform's image of one build is made from, and what they share."""

    request: BuildRequest
    """The build request."""
    project: ProjectSpec
    """The project built."""
    settings: ImageSettings
    """Its settings, with the command line's values."""
    lock: Lock
    """The lock installed from."""
    base: BaseSource
    """The base."""
    store: BlobStore
    """Blobs: the base's, the layers', the image's."""
    layer_files: LayerFiles
    """The base's layers for the readers that walk them whole (``PlainLayers``)."""
    work: Path
    """Scratch directory of the build."""
    envs: BuildEnvironments
    """PEP 517 build environments (from the project's indexes)."""
    ports: Ports
    """The world."""
    project_wheel: Future[Path]
    """Built in the background while the first platform's base and wheels come in."""
    local_wheels: LocalWheels
    """Workspace members and path dependencies."""
    compilers: Compilers
    """Bytecode compilers by architecture."""
    remote: RemoteLayers | None = None
    """The registry layer cache, if the build names one."""
    pushed_only_to: frozenset[str] | None = None
    """The registries every output pushes to (``outputs.pushed_only_to``; None: some
    output reads every layer's bytes). The base's layers are fetched for the output unless
    every push goes to the base's own registry, which mounts them."""
    staging: Path | None = None
    """Where layer trees are staged: a tree in memory (``cache.memory_scratch_root``), or
    None for ``work``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PlatformImage:
    """One platform's image and what it was made from."""

    image: Image
    """The image."""
    base: BaseImage
    """Its base as pulled."""
    layers: tuple[Layer, ...]
    """imgbuild's own layers, bottom first."""
    config: ImageConfig
    """The configuration imgbuild set."""
    built: int = 0
    """How many of ``layers`` this build made (the others came from the layer cache)."""
    sbom: Descriptor | None = None
    """The image's SBOM document as a blob (``image.sbom``), for a registry referrer."""


def build_platform(build: PlatformBuild, platform: str) -> PlatformImage:
    """Pull the base for ``platform``, plan its wheels, and build its image.

    Wheels are fetched only where something reads them (``pipeline.wheels``): a layer or
    record the caches hold needs no download. The link check of the wheels below the
    project runs while their layers are built: its answer is awaited before the project's
    layer, so a refused image is never assembled, and the layers made meanwhile are kept.
    """
    request, project = build.request, build.project
    arch = platform.partition("/")[2]
    prestart(request, str(build.base.pull), arch)  # the last build's compiler, meanwhile
    base_image, facts, base_layers = pull_base(
        build.base,
        platform,
        lock=build.lock,
        project=build.project,
        settings=build.settings,
        ports=build.ports,
        store=build.store,
        layer_files=build.layer_files,
        remote=build.remote,
        cache_dir=request.cache_dir,
    )
    pushed = build.pushed_only_to
    base_for_output = fetched_from(build.base.pull.registry, pushed)
    if base_for_output:
        base_layers.start()  # the image's output reads or sends them: they come meanwhile
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgbuild-links") as checks:
        prepared = _prepare(build, arch, base_image, facts, base_layers, checks)
        venv, compiler, job = prepared.venv, prepared.compiler, prepared.job
        base_image = _stdlib_bytecode(build, base_image, facts, compiler)
        # The project's wheel may still be building: everything below it is built meanwhile.
        lower = build_layers(prepared.below, venv, compiler, job, building=ready_renderer)
        prepared.links.result()
    top, sbom = _project_top(build, prepared, arch, base_image)
    upper = build_layers(top, venv, compiler, job)
    layers = [*lower.layers, *upper.layers]
    if base_for_output:
        base_layers.wait()
    if build.base.built is None:  # a pulled base: its facts and Python for other runners
        keep_base(base_image, facts, request.cache_dir, build.remote)
    config = build_image_config(base_image, build.settings, project, venv, build.base.reference)
    image = build_platform_image(
        base_image,
        layers,
        config,
        epoch=request.source_date_epoch,
        base_ref=build.base.reference,
        store=build.store,
        blobs_in_store=pushed is None,
    )
    return PlatformImage(
        image=image,
        base=base_image,
        layers=tuple(layers),
        config=config,
        built=lower.built + upper.built,
        sbom=sbom,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class _Prepared:
    """A platform's plan below the project, checked, and what builds it."""

    below: LayerPlan
    """The layers below the project's."""
    venv: VenvLayout
    """The venv, with the base's interpreter."""
    compiler: BytecodeCompiler | None
    """The bytecode compiler (None: no bytecode)."""
    wheels: LazyWheels
    """Fetches the locked wheels when they are read."""
    base_layers: ArrivingLayers
    """The base's layers, for the link checks that read them."""
    job: LayerJob
    """Where the layers are made and kept."""
    target: TargetPlatform
    """The image's Python, libc and CPU."""
    links: Future[None]
    """The link check of the wheels below the project (raises what it refuses)."""


def _prepare(
    build: PlatformBuild,
    arch: str,
    base: BaseImage,
    facts: BaseFacts,
    base_layers: ArrivingLayers,
    checks: ThreadPoolExecutor,
) -> _Prepared:
    """Plan the layers below the project's, check their wheels' scripts, ready the compiler.

    The compiler is readied (the base's Python unpacked, or the base loaded into the engine)
    meanwhile, on a thread of its own. The ELF link check is then started on ``checks``, to
    run beside the layers: reading a scientific stack's extension modules took a cold build
    1.3 s on one core while the other idled.
    """
    request = build.request
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgbuild-compiler") as pool:
        choosing = (
            pool.submit(build.compilers.get, arch, lambda: _choose(build, facts, base, base_layers))
            if request.compile_bytecode
            else None
        )
        target = target_of(arch, facts)
        dependencies, local, wheels = _dependencies(build, target)
        members = build.local_wheels.for_target(local, target)
        below = _plan_below(build, base, dependencies, members)
        venv = VenvLayout(base_interpreter=facts.interpreter, python_version=facts.python_version)
        job = _layer_job(build, wheels)
        # A runner with an empty cache fetches the registry cache's layers while the
        # compiler is readied (their keys name it: the one expected is asked for).
        if not request.compile_bytecode:
            look_ahead(below, venv, None, job)
        elif (expected := expected_identity(base, facts, request.compile_with)) is not None:
            look_ahead(below, venv, expected, job)
        check_entrypoint(
            build.settings,
            build.project,
            venv,
            lambda: _scripts(build, wheels, dependencies, members),
        )
        below_wheels = [*dependencies, *members]
        # The check's records and wheels are asked for at once (the network), the check
        # itself once the compiler is ready: the base's library index and the unpacking of
        # its Python are both Python code, and side by side on one GIL they held the first
        # layer back.
        gathering = checks.submit(
            gather_link_records,
            below_wheels,
            base,
            cache=CacheLayout(build.request.cache_dir),
            fetch=wheels.ensure,
            remote=build.remote,
        )
        compiler = choosing.result() if choosing is not None else None
    links = checks.submit(
        _check_links_behind, build, arch, base, below_wheels, wheels, base_layers, gathering
    )
    return _Prepared(
        below=below,
        venv=venv,
        compiler=compiler,
        wheels=wheels,
        base_layers=base_layers,
        job=job,
        target=target,
        links=links,
    )


def _plan_below(
    build: PlatformBuild,
    base: BaseImage,
    dependencies: Sequence[PlannedWheel],
    members: Sequence[PlannedWheel],
) -> LayerPlan:
    """The layers below the project's, within the budget the base's layers leave."""
    stdlib = stdlib_layers(build.base.built is not None, build.request.compile_bytecode)
    return plan_layers(
        dependencies,
        None,
        local=members,
        max_layers=build.settings.max_layers,
        base_layers=len(base.layers) + stdlib,
        project_later=True,
    )


def _project_top(
    build: PlatformBuild, prepared: _Prepared, arch: str, base: BaseImage
) -> tuple[LayerPlan, Descriptor]:
    """The project's layer, alone on top: its wheel and the SBOM (what changes with it)."""
    request = build.request
    if not build.project_wheel.done():
        ready_installer()  # while its backend runs: its layer then starts at once
    project_wheel = _planned(build.project.name, build.project_wheel.result())
    prepared.target.check_built(
        project_wheel.path.name, f"project {build.project.name} ({build.project.root})"
    )
    _check_links(build, arch, base, [project_wheel], prepared.wheels, prepared.base_layers)
    sbom = sbom_document(
        [w for spec in prepared.below.layers for w in spec.wheels] + [project_wheel],
        lock=build.lock,
        project=build.project.name,
        venv=prepared.venv,
        store=build.store,
        epoch=request.source_date_epoch,
        records=CacheLayout(request.cache_dir).layers,
        remote=build.remote,
        fetch=prepared.wheels.ensure,
    )
    spec = LayerSpec(
        kind="project",
        wheels=(project_wheel,),
        files=(sbom_file(prepared.venv, sbom, build.store),),
    )
    return LayerPlan(layers=(spec,)), sbom


def _scripts(
    build: PlatformBuild,
    wheels: LazyWheels,
    dependencies: Sequence[PlannedWheel],
    members: Sequence[PlannedWheel],
) -> Collection[str]:
    """The console scripts the image's wheels install (they are fetched to be read)."""
    from imagebuild.install.scripts import scripts_of  # (not when the answer is kept)

    wheels.ensure(dependencies)
    return scripts_of([build.project_wheel.result(), *(w.path for w in (*dependencies, *members))])


def _stdlib_bytecode(
    build: PlatformBuild, base: BaseImage, facts: BaseFacts, compiler: BytecodeCompiler | None
) -> BaseImage:
    """A built base with its standard library's pycs (Debian's postinst would write them)."""
    if build.base.built is None or compiler is None:
        return base
    return with_stdlib_bytecode(
        base,
        python=facts.python_version,
        compiler=compiler,
        store=build.store,
        cache=CacheLayout(build.request.cache_dir),
        work=build.work,
        reporter=build.ports.reporter,
        remote=build.remote,
    )


def _check_links(
    build: PlatformBuild,
    arch: str,
    base: BaseImage,
    wheels: Sequence[PlannedWheel],
    lazy: LazyWheels,
    base_layers: LayerFiles,
    gathering: Future[LinkRecords] | None = None,
) -> None:
    """Refuse wheels whose ELF files need a library the image will not have.

    What only plugins lack is said in a warning. ``gathering`` brings the check's records
    and wheels when they were asked for earlier.
    """
    on_demand = check_image_links(
        wheels,
        base,
        gathered=gathering.result() if gathering is not None else None,
        fetch=lazy.ensure,
        remote=build.remote,
        arch=arch,
        store=base_layers,
        cache=CacheLayout(build.request.cache_dir),
        http=build.ports.http,
        recipe=build.base.built.base if build.base.built is not None else None,
    )
    if on_demand:
        build.ports.reporter.warn(on_demand_line(on_demand))


def _check_links_behind(
    build: PlatformBuild,
    arch: str,
    base: BaseImage,
    wheels: Sequence[PlannedWheel],
    lazy: LazyWheels,
    base_layers: LayerFiles,
    gathering: Future[LinkRecords],
) -> None:
    """``_check_links`` at background priority, beside the layers: its answer is needed last.

    At the layers' priority it slowed them (FastAPI cold: 4.5% slower, 10 paired runs).
    """
    background_priority()
    _check_links(build, arch, base, wheels, lazy, base_layers, gathering)


def _planned(name: str, wheel: Path) -> PlannedWheel:
    """The project's wheel, as planned."""
    return PlannedWheel(name=name, version=wheel.name.split("-")[1], path=wheel)


def _layer_job(build: PlatformBuild, wheels: LazyWheels) -> LayerJob:
    """Where this build's layers are made and kept."""
    return LayerJob(
        fetch=wheels.ensure,
        store=build.store,
        records=CacheLayout(build.request.cache_dir).layers,
        work=build.staging or build.work,
        mtime=build.request.source_date_epoch,
        reporter=build.ports.reporter,
        remote=build.remote,
    )


def _dependencies(
    build: PlatformBuild, target: TargetPlatform
) -> tuple[list[PlannedWheel], list[LockedPackage], LazyWheels]:
    """The dependencies' wheels for ``target``, the local packages, and the wheels' fetcher.

    A locked wheel is fetched when it is read (``LazyWheels``); a package with no wheel for
    the target is built from its locked sdist now.
    """
    settings, reporter = build.settings, build.ports.reporter
    packages = select_packages(
        build.lock,
        root=build.project.name,
        target=target,
        extras=set(settings.extras),
        groups=set(settings.groups),
    )
    chosen, from_sdist, local = sort_sources(packages, target)
    reporter.step(f"fetch: {len(chosen)} wheels for {target.describe()}")
    lazy = LazyWheels(
        build.ports.http, WheelCache(CacheLayout(build.request.cache_dir).wheels), reporter
    )
    wheels = lazy.plan(chosen)
    for pkg in from_sdist:
        wheels.append(_sdist_wheel(build, pkg))
    return wheels, local, lazy


def _sdist_wheel(build: PlatformBuild, pkg: LockedPackage) -> PlannedWheel:
    """A wheel built from ``pkg``'s locked sdist (kept in the cache by the sdist's hash)."""
    from imagebuild.build.sdist import build_sdist_wheel  # (only a lock with sdists)

    assert pkg.sdist is not None
    build.ports.reporter.step(f"build: {pkg.name} {pkg.version} from its sdist")
    path = build_sdist_wheel(
        build.ports.http,
        pkg.sdist.url,
        (pkg.sdist.sha256 or "").removeprefix("sha256:"),
        pkg.sdist.filename,
        build.request.cache_dir,
        indexes=build.envs.indexes,
    )
    return PlannedWheel(
        name=pkg.name, version=str(pkg.version), path=path, size=path.stat().st_size
    )


def _choose(
    build: PlatformBuild, facts: BaseFacts, base: BaseImage, layers: ArrivingLayers
) -> BytecodeCompiler:
    """The compiler for this base; a base for another CPU runs as the engine's variant."""

    def native(arch: str) -> tuple[BaseImage, BaseFacts]:
        variant = build.base.image(build.ports.registry, arch, build.store)
        return variant, base_facts(variant, build.layer_files, build.request.cache_dir, arch, None)

    choice = CompilerChoice(
        mode=build.request.compile_with,
        store=build.store,
        layers=layers,
        work=build.work,
        native=native,
        rootfs=CacheLayout(build.request.cache_dir).rootfs,
        kept_tree=lambda: kept_tree(base, build.remote),
        layers_ready=layers.wait,
    )
    compiler = choose_compiler(facts, base, choice, build.ports)
    arch = str(base.config.get("architecture", ""))
    keep_compiler(build.request, str(build.base.pull), arch, compiler)
    return compiler
