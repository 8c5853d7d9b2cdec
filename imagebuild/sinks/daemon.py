"""What imgbuild asks of a Docker engine, as protocols (no docker-py import here).

``sinks.engine.DockerEngine`` implements them through docker-py; tests write small fakes.
Kept apart from docker-py so that importing the pipeline (for ``imgbuild lock``, which
never talks to an engine) does not import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Protocol


class DockerDaemon(Protocol):
    """What the build asks of a Docker engine."""

    def load(self, archive: Path) -> tuple[str, ...]:
        """Load a docker/OCI archive; return the references or IDs the engine reports."""
        ...

    def image_id(self, ref: str) -> str | None:
        """The image ID behind ``ref``, or None if the engine does not have it."""
        ...

    def diff_ids(self, ref: str) -> tuple[str, ...]:
        """The layer diff IDs of the image ``ref`` names, base first; none if it is absent."""
        ...

    def run(
        self,
        image: str,
        command: Sequence[str],
        *,
        upload: Path | None = None,
        download: tuple[PurePosixPath, Path] | None = None,
    ) -> str:
        """Run ``command`` in ``image`` (network none, root) and return its output.

        ``upload`` is a tar unpacked at ``/`` before the start; ``download`` names a path
        in the container whose tar is written to a host file after a clean exit. Files
        move through the engine's API, never through a bind mount, so the engine may be
        on another machine (``DOCKER_HOST=tcp://…``, Docker-in-Docker in CI).
        """
        ...


class Engine(DockerDaemon, Protocol):
    """A Docker engine that also says which CPU it runs containers on."""

    def architecture(self) -> str:
        """The CPU the engine runs containers on, as OCI names it (``amd64``, ``arm64``)."""
        ...


def engine_base_tag(manifest_digest: str) -> str:
    """The tag a base (by its manifest digest) has in the engine once loaded to run its Python.

    The compile step loads the base under it; the delta load reads its layers back to know
    which of the image's leading layers the engine already holds.
    """
    return f"imgbuild-base:{manifest_digest.removeprefix('sha256:')[:16]}"
