"""``--output`` values: parsed, made into sinks, and put in the order they are written.

Order is part of the interface: contexts first, then OCI layouts and archives, then the
engine and the registry, each group in command-line order (what a user sees as written
before something is loaded or pushed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagebuild.errors import DockerError, ProjectError

if TYPE_CHECKING:
    from imagebuild.image.name import ImageReference
    from imagebuild.report import Reporter
    from imagebuild.sinks.daemon import DockerDaemon
    from imagebuild.sinks.remote import RegistryClient
    from imagebuild.sinks.sink import Sink

OUTPUT_KINDS = ("docker", "oci", "oci-archive", "registry", "context")
_WRITE_ORDER = {"context": 0, "oci": 1, "oci-archive": 1, "docker": 2, "registry": 2}


@dataclass(frozen=True, kw_only=True, slots=True)
class Output:
    """Where the finished image goes, as the command line said it."""

    kind: str
    """One of ``docker``, ``oci``, ``oci-archive``, ``registry``, ``context``."""
    path: Path | None = None
    """Destination for ``oci`` and ``context`` (directories) and ``oci-archive`` (a file)."""


def parse_outputs(values: Sequence[str]) -> tuple[Output, ...]:
    """Parse ``--output`` values.

    They are ``docker``, ``oci:DIR``, ``oci-archive:FILE``, ``registry`` and ``context:DIR``
    (a Dockerfile and the layers as directories).
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


def make_sinks(
    outputs: Sequence[Output], *, registry: RegistryClient, engine: Callable[[], DockerDaemon]
) -> tuple[Sink, ...]:
    """One sink per output, in command-line order.

    ``engine`` is called only when an image is loaded, so a build that fails never
    connects.
    """
    # Each sink's module is imported only when it is asked for: docker-py and jinja2 cost
    # a build that writes an OCI layout a tenth of a second between them.
    sinks: list[Sink] = []
    for output in outputs:
        if output.kind == "docker":
            from imagebuild.sinks.engine import DockerSink

            sinks.append(DockerSink(connect=engine))
        elif output.kind == "registry":
            from imagebuild.sinks.remote import RegistrySink

            sinks.append(RegistrySink(client=registry))
        elif output.path is None:
            raise ProjectError(f"--output {output.kind}: needs a path")
        elif output.kind == "oci":
            from imagebuild.sinks.layout import OciLayoutSink

            sinks.append(OciLayoutSink(path=output.path))
        elif output.kind == "oci-archive":
            from imagebuild.sinks.layout import OciArchiveSink

            sinks.append(OciArchiveSink(path=output.path))
        else:
            from imagebuild.sinks.context import ContextSink

            sinks.append(ContextSink(path=output.path))
    return tuple(sinks)


def pushed_only_to(sinks: Sequence[Sink], tags: Sequence[ImageReference]) -> frozenset[str] | None:
    """The registries the image goes to, when every output is a push (``--push``).

    None when some output reads every layer's bytes: every kind but a push does. A push
    mounts the layers its registry holds in another repository (the base's, the registry
    cache's), and fetches only those it must send (``sinks.upload``).
    """
    if any(sink.kind != "registry" for sink in sinks):
        return None
    return frozenset(tag.registry for tag in tags)


def fetched_from(registry: str, pushed: frozenset[str] | None) -> bool:
    """Whether layers that live in ``registry`` are fetched for the outputs.

    They are, unless every output is a push to that same registry (``pushed_only_to``):
    a registry mounts only what it holds itself, and another one's layers are sent, so
    they are pulled meanwhile rather than when the push needs them.
    """
    return pushed is None or pushed != {registry}


def write_order(sinks: Sequence[Sink]) -> list[Sink]:
    """``sinks`` in the order they are written (see the module doc); stable within a group."""
    return sorted(sinks, key=lambda sink: _WRITE_ORDER.get(sink.kind, 2))


def check_engine_answers(
    sinks: Sequence[Sink], *, fallback: Path | None = None, reporter: Reporter | None = None
) -> tuple[Sink, ...]:
    """A ``docker`` output needs an engine: ask it before the build, not after it.

    ``--output oci:`` and the other file outputs need none, so they are not asked. With
    ``fallback`` (no output was asked for), an engine that does not answer is replaced by
    an archive ``docker load`` takes, written in that directory.
    """
    if not any(sink.kind == "docker" for sink in sinks):
        return tuple(sinks)
    from imagebuild.sinks.engine import DockerSink
    from imagebuild.sinks.layout import DockerArchiveSink

    for index, sink in enumerate(sinks):
        if isinstance(sink, DockerSink):
            try:
                sink.connect()
            except DockerError as exc:
                if fallback is None:
                    raise
                if reporter is not None:
                    reporter.warn(f"{exc}: the image is written as an archive in {fallback}")
                replaced = DockerArchiveSink(directory=fallback)
                return (*sinks[:index], replaced, *sinks[index + 1 :])
            break
    return tuple(sinks)
