"""Choosing the bytecode compiler: the base's own Python through the engine, or the host's.

The base's interpreter writes exactly the bytes the image would; a host Python of another
patch release may not (the compiler changes between 3.X.Y releases). So the engine is
preferred whenever it answers, and a host interpreter of the target's minor version is
the fallback (``auto``, with a warning) or the explicit choice (``host``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagebuild.cache import CacheLayout, write_json
from imagebuild.errors import DockerError, ImageError, LayerError
from imagebuild.install.layers import BytecodeCompiler, HostCompiler
from imagebuild.install.native import NativeCompiler, from_hint, native_hint
from imagebuild.pipeline.config import rfc3339
from imagebuild.pipeline.layerwork import start_compile_server
from imagebuild.sinks.daemon import engine_base_tag

if TYPE_CHECKING:
    from imagebuild.image.model import BaseImage
    from imagebuild.image.store import BlobStore, LayerFiles
    from imagebuild.pipeline.ports import Ports
    from imagebuild.pipeline.requests import BuildRequest, CompileWith
    from imagebuild.sinks.daemon import Engine
    from imagebuild.target.base import BaseFacts


def prestart(request: BuildRequest, base: str, arch: str) -> None:
    """Start the compile server of the compiler the last build of ``base`` ran, if it can.

    The build calls it before the base is resolved: the base's interpreter starts (about
    35 ms) while the tag is looked up and the project's wheel built, not when the project's
    layer waits for it. When the compiler then chosen is another (the tag moved), its own
    server replaces this one (``keep_compiler``).
    """
    if not request.compile_bytecode:
        return
    try:
        hint = _hint(request, base, arch).read_text(encoding="utf-8")
        compiler = from_hint(json.loads(hint))
    except (OSError, ValueError):
        return
    if compiler is not None:
        start_compile_server(compiler)


def keep_compiler(
    request: BuildRequest, base: str, arch: str, compiler: BytecodeCompiler | None
) -> None:
    """Start ``compiler``'s server for the layers made in this process (the project's).

    A base's interpreter run here is also named for the next build's ``prestart``.
    """
    start_compile_server(compiler)
    if not isinstance(compiler, NativeCompiler):
        return
    hint, data = _hint(request, base, arch), native_hint(compiler)
    try:
        if json.loads(hint.read_text(encoding="utf-8")) == data:
            return
    except (OSError, ValueError):
        pass
    try:
        write_json(hint, data, durable=False)  # read back or ignored
    except OSError:
        pass  # a hint only


def _hint(request: BuildRequest, base: str, arch: str) -> Path:
    key = hashlib.sha256(f"{base}\0{arch}\0{request.compile_with}".encode()).hexdigest()[:24]
    return CacheLayout(request.cache_dir).compiler_hints / f"{key}.json"


NativeVariant = Callable[[str], "tuple[BaseImage, BaseFacts]"]
"""The base's variant for an architecture (the engine's own), pulled and inspected."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CompilerChoice:
    """What choosing a compiler for one base needs."""

    mode: CompileWith
    """``auto``, ``host`` or ``image`` (``--compile-with``)."""
    store: BlobStore
    """Where the base's blobs are (to load it into the engine)."""
    layers: LayerFiles | None = None
    """The base's layers to unpack (decompressed once per build); None: ``store``'s."""
    work: Path
    """Scratch directory of the build (for the base's archive)."""
    native: NativeVariant | None = None
    """Pulls the base's variant for the engine's CPU, when it differs from the target's."""
    rootfs: Path | None = None
    """Where bases' filesystems are unpacked to run their Python on this host, on disk (None:
    never); in memory instead when there is room (``cache.rootfs_home``)."""
    kept_tree: Callable[[], Path | None] | None = None
    """The tree of the base's Python kept elsewhere (``pipeline.basecache``), a tar to unpack
    instead of the base's layers; asked only when no tree is unpacked here."""
    layers_ready: Callable[[], None] | None = None
    """Waits until the base's blobs are in ``store`` (``basecache.ArrivingLayers``)."""


def choose_compiler(
    facts: BaseFacts, base: BaseImage, choice: CompilerChoice, ports: Ports
) -> BytecodeCompiler:
    """The base's own Python through Docker, else a host one of the target's minor version.

    An engine cannot run a base built for another CPU (no emulation is assumed): then
    ``choice.native(arch)`` gives the same base's variant for the engine's CPU, whose
    Python of the same minor version writes pycs as valid there (bytecode does not depend
    on the CPU, and a multi-platform base ships one Python release on every platform).
    """
    version = ".".join(map(str, facts.python_version))
    host = ports.host_python(facts.python_version)
    if choice.mode == "host":
        if host is None:
            raise LayerError(
                f"no working python{version} on this host to compile bytecode",
                hint="install it, use --compile-with image, or pass --no-compile",
            )
        return HostCompiler(host)
    native = _native_run(facts, base, choice, ports)
    if native is not None:
        return native
    try:
        engine = ports.engine()
    except DockerError as exc:
        return _without_engine(exc, choice.mode, host, version, ports)
    engine_arch = engine.architecture()
    target_arch = str(base.config.get("architecture", engine_arch))
    if target_arch != engine_arch and choice.native is not None:
        base, facts = _native(facts, choice.native, target_arch, engine_arch, ports)
    tag = engine_base_tag(base.manifest_digest)
    if engine.image_id(tag) is None:
        ports.reporter.step(f"compile: loading the base into Docker to run its python{version}")
        if choice.layers_ready is not None:
            choice.layers_ready()
        _load_base(engine, base, tag, choice)
    from imagebuild.sinks.engine import EngineCompiler

    return EngineCompiler(engine, tag, facts.interpreter)


def expected_identity(base: BaseImage, facts: BaseFacts, mode: CompileWith) -> str | None:
    """The identity the compiler ``choose_compiler`` is about to give will most likely have.

    The base's own Python, run here or in the engine, compiles under the same name; None
    for ``host``. Only a guess for looking ahead: a fallback to a host Python, or to the
    base's variant for the engine's CPU, is named otherwise.
    """
    return None if mode == "host" else _image_identity(base, facts)


def _image_identity(base: BaseImage, facts: BaseFacts) -> str:
    """The name of the base's own interpreter, the same as ``EngineCompiler.identity``."""
    return f"image:{engine_base_tag(base.manifest_digest)}:{facts.interpreter}"


def _native_run(
    facts: BaseFacts, base: BaseImage, choice: CompilerChoice, ports: Ports
) -> BytecodeCompiler | None:
    """The base's own Python run here, under its own loader, when the CPUs match."""
    from imagebuild.cache import forget_idle_trees, rootfs_home
    from imagebuild.image.rootfs import tree_name, unpack_rootfs
    from imagebuild.install.native import host_arch, native_compiler

    arch = str(base.config.get("architecture", ""))
    if choice.rootfs is None or host_arch() != arch:
        return None
    name = tree_name(base)
    home = rootfs_home(choice.rootfs, name)
    identity = _image_identity(base, facts)
    kept = choice.kept_tree() if choice.kept_tree and not (home / name).is_dir() else None
    if kept is not None:
        try:
            root = unpack_rootfs(base, choice.store, home, made=forget_idle_trees, from_tar=kept)
        except ImageError:
            pass  # damaged: from the base's own layers instead
        else:
            compiler = native_compiler(root, facts.interpreter, arch=arch, identity=identity)
            if compiler is not None:
                return compiler
            shutil.rmtree(root, ignore_errors=True)  # its Python does not start: the layers'
    root = unpack_rootfs(base, choice.layers or choice.store, home, made=forget_idle_trees)
    compiler = native_compiler(root, facts.interpreter, arch=arch, identity=identity)
    if compiler is None:
        ports.reporter.step("compile: the base's python does not start here; using the engine")
    return compiler


def _without_engine(
    exc: DockerError, mode: CompileWith, host: Path | None, version: str, ports: Ports
) -> BytecodeCompiler:
    """No engine answered: the host's interpreter for ``auto`` (said aloud), else an error."""
    if mode == "auto" and host is not None:
        ports.reporter.warn(
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


def _native(
    facts: BaseFacts, native: NativeVariant, target_arch: str, engine_arch: str, ports: Ports
) -> tuple[BaseImage, BaseFacts]:
    """The base's variant for the engine's CPU, whose Python must be the same minor version."""
    version = ".".join(map(str, facts.python_version))
    base, variant = native(engine_arch)
    if variant.python_version != facts.python_version:
        raise LayerError(
            f"the base's linux/{engine_arch} variant has Python "
            f"{'.'.join(map(str, variant.python_version))}, not {version}, so it cannot "
            f"compile bytecode for linux/{target_arch}",
            hint="pass --no-compile, or --compile-with host with a host python" + version,
        )
    ports.reporter.step(
        f"compile: linux/{target_arch} bytecode by the base's linux/{engine_arch} "
        f"python{version} (the engine runs {engine_arch} only)"
    )
    return base, variant


def _load_base(engine: Engine, base: BaseImage, tag: str, choice: CompilerChoice) -> None:
    """Load the base alone into the engine under ``tag``, so its Python can run there."""
    from imagebuild.image.model import ImageConfig
    from imagebuild.image.mutate import build_image
    from imagebuild.sinks.layout import write_docker_archive

    image = build_image(base, [], config=ImageConfig(), created=rfc3339(0), store=choice.store)
    archive = choice.work / "base.tar"
    write_docker_archive(image, archive, repo_tags=[tag])
    engine.load(archive)
    archive.unlink()
