"""``run_build``: the composition of one build, from pyproject to every sink.

pyproject -> lock (checked when asked) -> per platform: base pulled and inspected ->
target -> wheels chosen and fetched -> layers planned, installed, compiled and tarred
(each cached by what goes into it) -> image (an index over several) -> sinks.

Nothing is written to a sink until the whole image exists; sinks write to temporary
paths and rename, and Docker only sees a complete archive, so a failure never leaves a
half-built image tagged, loaded or pushed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagebuild.build.pep517 import BuildEnvironments, build_project_wheel
from imagebuild.build.runner import background_priority
from imagebuild.build.secrets import source_policy
from imagebuild.cache import (
    CacheLayout,
    build_envs_memory,
    memory_scratch_root,
    scratch_tree,
    sweep_scratch,
)
from imagebuild.digest import Digest
from imagebuild.errors import ImageError, LockError, ProjectError, RegistryError
from imagebuild.image.model import Image, ImageIndex
from imagebuild.image.mutate import build_index
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore, PlainLayers
from imagebuild.lock.inputs import project_roots
from imagebuild.lock.load import find_lock, load_lock
from imagebuild.lock.model import Lock
from imagebuild.lock.staleness import check_locked, check_recorded
from imagebuild.net.credentials import IndexCredentials
from imagebuild.pipeline.bases import lock_inputs, pinned_reference
from imagebuild.pipeline.buildenvs import RegistryEnvironments
from imagebuild.pipeline.locate import locate_lock, project_settings, workspace_lock
from imagebuild.pipeline.outputs import (
    check_engine_answers,
    fetched_from,
    pushed_only_to,
    write_order,
)
from imagebuild.pipeline.ports import Ports
from imagebuild.pipeline.requests import BuildRequest, BuildResult, LockRequest
from imagebuild.project.indexes import index_entries, lock_indexes
from imagebuild.project.settings import ImageSettings
from imagebuild.project.spec import ProjectSpec
from imagebuild.project.workspace import Workspace, expand_local
from imagebuild.sinks.sink import Finished, Sink
from imagebuild.target.choose import base_reference, check_python_fits

if TYPE_CHECKING:
    from imagebuild.pipeline.basepull import BaseSource
    from imagebuild.pipeline.layers import RemoteLayers
    from imagebuild.pipeline.platform import PlatformBuild, PlatformImage

# The stages past the lock (``pipeline.platform`` and what it imports: a third of a build's
# start-up) are imported once the project's wheel is building, so they load while its
# backend runs: a code change waits for that wheel and little else.


@dataclass(frozen=True, kw_only=True, slots=True)
class OpenProject:
    """The project a build starts from, as found and configured."""

    project: ProjectSpec
    workspace: Workspace
    settings: ImageSettings
    tags: tuple[ImageReference, ...]
    indexes: tuple[str, ...]
    credentials: IndexCredentials
    member_lock: Path
    """Where ``imgbuild lock`` writes this project's lock."""


def run_build(request: BuildRequest, *, ports: Ports, sinks: Sequence[Sink]) -> BuildResult:
    """Build the image described by ``request`` and send it to every sink."""
    check_platforms(request.platforms, sinks)
    found = open_project(request, ports)
    lock = find_build_lock(request, found, ports)
    cache = CacheLayout(request.cache_dir)
    store = BlobStore(cache.blobs)
    # imgbuild's own lock pins the base to the digest it was made for: the same lock
    # builds on the same base after its tag has moved (`imgbuild lock --upgrade` moves it).
    pinned = dict(lock.recorded.bases) if lock.recorded is not None else {}
    _judge_lock(request, found, lock, store, pinned, ports)
    fallback = found.project.root / "dist" if request.default_output else None
    sinks = check_engine_answers(sinks, fallback=fallback, reporter=ports.reporter)
    ports.reporter.step(f"lock: {lock.path.name}")
    pushed = pushed_only_to(sinks, found.tags)
    remote = _layer_cache(request, found.settings, ports, pushed=pushed)
    # Build backends come from the indexes the project locks from, never from elsewhere.
    envs = BuildEnvironments(
        root=cache.build_envs,
        memory=build_envs_memory(cache.build_envs),
        indexes=found.indexes,
        credentials=found.credentials,
        resident=ports.resident_hooks,
        shared=RegistryEnvironments(remote=remote) if remote is not None else None,
    )
    with (
        _scratch(cache) as (work, staging),
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgbuild-project") as pool,
    ):
        # The project's own wheel needs neither the base nor the dependencies: it is built
        # while they are pulled and fetched.
        ports.reporter.step(f"build: {found.project.name} wheel")
        project_wheel = pool.submit(_project_wheel, found, work / "dist", request, envs)
        from imagebuild.pipeline.platform import build_platform

        build = _platform_build(
            request,
            found,
            lock,
            pinned,
            ports,
            (store, work, staging),
            envs,
            project_wheel,
            remote,
            pushed=pushed,
        )
        images = [build_platform(build, platform) for platform in request.platforms]
        envs.share()  # with --cache-to: the backends' environments, for the next runner
        finished = _finished(images, found, build)
        check_expected(request.expect_digest, finished.image)
        written = [
            line for sink in write_order(sinks) for line in sink.write(finished, ports.reporter)
        ]
    return _result(finished, images, tuple(written))


def _platform_build(
    request: BuildRequest,
    found: OpenProject,
    lock: Lock,
    pinned: Mapping[str, Digest],
    ports: Ports,
    places: tuple[BlobStore, Path, Path],
    envs: BuildEnvironments,
    project_wheel: Future[Path],
    remote: RemoteLayers | None,
    *,
    pushed: frozenset[str] | None,
) -> PlatformBuild:
    """What every platform's image is made from; ``places``: the store, scratch and staging.

    ``pushed``: the registries every output pushes to (``outputs.pushed_only_to``).
    """
    from imagebuild.pipeline.local import LocalWheels
    from imagebuild.pipeline.platform import Compilers, PlatformBuild

    store, work, staging = places
    return PlatformBuild(
        request=request,
        project=found.project,
        settings=found.settings,
        lock=lock,
        base=base_source(found, pinned, request, lock, ports, store),
        store=store,
        layer_files=PlainLayers(store, work / "base-layers", memory=staging / "base-layers"),
        work=work,
        staging=staging,
        envs=envs,
        ports=ports,
        project_wheel=project_wheel,
        local_wheels=LocalWheels(
            lock_dir=lock.path.parent,
            out=work / "dist-local",
            epoch=request.source_date_epoch,
            envs=envs,
            reporter=ports.reporter,
            git_bucket=CacheLayout(request.cache_dir).git,
            policy=source_policy(found.settings),
        ),
        compilers=Compilers(),
        remote=remote,
        pushed_only_to=pushed,
    )


# Below the layer workers (0), above the link check (10): at 10 the wheel came after the
# last dependency layer, at 0 it slowed the unpacking (FastAPI cold, 10 paired runs).
_WHEEL_NICENESS = 5


def _project_wheel(
    found: OpenProject, out: Path, request: BuildRequest, envs: BuildEnvironments
) -> Path:
    """The project's wheel, from what ``.dockerignore`` and ``exclude`` keep, secrets refused.

    Its backend runs at a lower priority (``_WHEEL_NICENESS``): a cold build needs the wheel
    only after every dependency's layer, and on two cores the backend's processes had slowed
    the unpacking of the base's Python, which the first layer waits for. With nothing else
    to run, as in a code change's build, a lower priority costs nothing.
    """
    background_priority(_WHEEL_NICENESS)
    return build_project_wheel(
        found.project.root,
        out,
        source_date_epoch=request.source_date_epoch,
        envs=envs,
        policy=source_policy(found.settings),
    )


def _result(
    finished: Finished, images: Sequence[PlatformImage], written: tuple[str, ...]
) -> BuildResult:
    """What the build answers: where the image went, and its size and layers for the summary."""
    blobs = {finished.image.manifest.digest: finished.image.manifest.size}
    for platform in images:
        image = platform.image
        for desc in (image.manifest, image.config, *image.layers):
            blobs[desc.digest] = desc.size
    return BuildResult(
        manifest_digest=finished.image.manifest.digest,
        written=written,
        tag=str(finished.tags[0]),
        size=sum(blobs.values()),
        layers=sum(len(p.image.layers) for p in images),
        layers_built=sum(p.built for p in images),
    )


@contextmanager
def _scratch(cache: CacheLayout) -> Iterator[tuple[Path, Path]]:
    """The build's scratch tree, and where its layers are staged (in memory when it can).

    Trees that killed builds left are removed first; running builds' trees are locked.
    """
    sweep_scratch(cache.tmp)
    memory = memory_scratch_root()
    if memory is not None:
        sweep_scratch(memory)
    with scratch_tree(cache.tmp) as work:
        if memory is None:
            yield work, work
            return
        with scratch_tree(memory) as staging:
            yield work, staging


def _layer_cache(
    request: BuildRequest,
    settings: ImageSettings,
    ports: Ports,
    *,
    pushed: frozenset[str] | None,
) -> RemoteLayers | None:
    """The registry layer cache the command line (else ``[tool.imgbuild]``) names, if any.

    The blobs of the layers it finds stay in the registry when every output is a push
    there (``pushed``, ``outputs.fetched_from``).
    """
    source = request.cache_from or settings.cache_from
    target = request.cache_to or settings.cache_to
    if source is None and target is None:
        return None
    if ports.layer_cache is None:
        raise ProjectError("--cache-from/--cache-to need a registry client, and none was given")
    source_ref = _cache_ref(source, "--cache-from")
    return ports.layer_cache(
        source_ref,
        _cache_ref(target, "--cache-to"),
        cache_dir=request.cache_dir,
        fetch_blobs=source_ref is None or fetched_from(source_ref.registry, pushed),
    )


def _cache_ref(text: str | None, where: str) -> ImageReference | None:
    if text is None:
        return None
    try:
        return ImageReference.parse(text)
    except RegistryError as exc:
        raise ProjectError(
            f"{where} {text!r}: {exc.message}",
            hint="name a registry repository, e.g. ghcr.io/org/app-cache",
        ) from None


def check_platforms(platforms: Sequence[str], sinks: Sequence[Sink]) -> None:
    """Every platform is ``linux/<arch>``, named once; several need sinks that take an index."""
    for platform in platforms:
        os_name, sep, arch = platform.partition("/")
        if os_name != "linux" or not sep or not arch:
            raise ProjectError(
                f"--platform {platform!r}: not a platform imgbuild builds",
                hint="use linux/amd64 or linux/arm64",
            )
    if len(set(platforms)) != len(platforms):
        raise ProjectError(f"--platform names a platform twice: {', '.join(platforms)}")
    if len(platforms) > 1:
        for sink in sinks:
            if not sink.takes_index:
                raise ProjectError(
                    f"--output {sink.kind} takes one platform, and {len(platforms)} were given",
                    hint="pass one --platform, or write the image index with --output "
                    "registry, oci:DIR or oci-archive:FILE",
                )


def check_expected(expected: str | None, image: Image | ImageIndex) -> None:
    """``--expect-digest``: refuse, before any sink runs, an image with another digest."""
    if expected and image.manifest.digest != expected:
        raise ImageError(
            f"built {image.manifest.digest}, not the expected "
            f"{expected}; nothing was written, loaded or pushed",
            hint="the lock, the base's digest, SOURCE_DATE_EPOCH, --platform or the "
            "project's files differ from the build that gave the expected digest",
        )


def open_project(request: BuildRequest, ports: Ports) -> OpenProject:
    """The project, its settings with the command line's, its tags and its indexes."""
    project, workspace, member_lock = locate_lock(request.project_dir, request.package)
    settings = project_settings(
        project,
        base=request.base,
        python=request.python,
        groups=request.groups,
        extras=request.extras,
    )
    tags = request.tags or (f"{project.name}:latest",)
    check_python_fits(settings, project)
    # A lock records no credentials: find them again for the project's indexes.
    indexes = request.index_urls or lock_indexes(settings, project, workspace)
    credentials = IndexCredentials(index_entries(indexes, project, workspace))
    ports.http.auth = credentials
    return OpenProject(
        project=project,
        workspace=workspace,
        settings=settings,
        # A bad tag fails now, not after the build.
        tags=tuple(ImageReference.parse(tag) for tag in tags),
        indexes=indexes,
        credentials=credentials,
        member_lock=member_lock,
    )


def find_build_lock(request: BuildRequest, found: OpenProject, ports: Ports) -> Lock:
    """The lock to build from; without one (and unless told not to), one made first."""
    if request.package is not None:
        path = found.member_lock if found.member_lock.is_file() else None
    else:
        path = find_lock(found.project.root)
    if path is None:
        # A workspace member: the lock uv wrote at the workspace root, as `uv sync` finds it.
        path = workspace_lock(found.project, found.workspace)
    if path is None:
        if request.lock_mode != "check-if-present":
            raise LockError(
                f"{request.project_dir}: no {found.member_lock.name} or uv.lock to build from",
                hint="run 'imgbuild lock' (or 'uv lock'), or drop --locked/--frozen",
            )
        # Like `uv run`: no lock yet, so make one first.
        from imagebuild.pipeline.lock import run_lock

        ports.reporter.step("lock: no lock file, locking first")
        made = LockRequest(
            project_dir=request.project_dir,
            cache_dir=request.cache_dir,
            base=request.base,
            python=request.python,
            mirrors=request.mirrors,
            package=request.package,
        )
        path = run_lock(made, ports=ports).path
    return load_lock(path)


def _judge_lock(
    request: BuildRequest,
    found: OpenProject,
    lock: Lock,
    store: BlobStore,
    pinned: Mapping[str, Digest],
    ports: Ports,
) -> None:
    """``--locked`` refuses a stale lock; by default it is built with a warning.

    imgbuild's own pylock is judged by its recorded inputs, others as uv judges them.
    """
    if request.lock_mode == "frozen":
        return
    project = found.project
    try:
        if lock.recorded is not None:
            _, local, _ = expand_local(project_roots(project), project, found.workspace)
            inputs, _, _ = lock_inputs(
                found.settings,
                project,
                indexes=found.indexes,
                local=[p.project for p in local.values()],
                registry=ports.registry,
                store=store,
                cache=request.cache_dir,
                mirrors=request.mirrors,
                pinned=pinned,
            )
            if check_recorded(lock.recorded, inputs, filename=lock.filename):
                return
        check_locked(lock, project, workspace=found.workspace)
    except LockError as exc:
        if request.lock_mode == "locked":
            raise
        # A stale lock is built as it is, but never silently.
        ports.reporter.warn(f"{exc}; building from the lock as it is")


def base_source(
    found: OpenProject,
    pinned: Mapping[str, Digest],
    request: BuildRequest,
    lock: Lock,
    ports: Ports,
    store: BlobStore,
) -> BaseSource:
    """The base as configured: what to pull (pinned, through the mirrors) or build."""
    from imagebuild.pipeline.basepull import BaseSource

    entry, reference = base_reference(found.settings, found.project)
    built = None
    if entry is not None and entry.built:
        # Only a built base needs the Debian assembler (its modules cost a build 12 ms).
        from imagebuild.pipeline.debbase import BuiltBases, base_recipe

        built = BuiltBases(
            base_recipe(entry, found.settings),
            settings=found.settings,
            lock=lock,
            lock_mode=request.lock_mode,
            http=ports.http,
            cache=CacheLayout(request.cache_dir),
            store=store,
            reporter=ports.reporter,
        )
    return BaseSource(
        entry=entry,
        reference=reference,
        pull=pinned_reference(reference, pinned).with_mirrors(request.mirrors),
        pinned=reference in pinned or built is not None,
        built=built,
    )


def _finished(
    images: Sequence[PlatformImage], found: OpenProject, build: PlatformBuild
) -> Finished:
    """The image (an index over several platforms) and what sinks need beside it."""
    first = images[0]
    image: Image | ImageIndex = first.image
    if len(images) > 1:
        image = build_index([p.image for p in images], build.store)
    project = found.project
    return Finished(
        image=image,
        tags=found.tags,
        work=build.work,
        base=first.base,
        base_pulled=build.base.pull,
        base_upstream=build.base.reference,
        layers=first.layers,
        config=first.config,
        title=f"{project.name} {project.version or ''}".strip(),
        sboms=tuple((p.image.digest, p.sbom) for p in images if p.sbom is not None),
    )
