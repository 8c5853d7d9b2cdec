"""The Docker engine, through docker-py: load archives, run the base's Python, clean up.

docker-py reports load failures inside the JSON progress stream (``errorDetail``) while
the HTTP status is 200, so every stream is read to the end and checked here; callers
only ever see ``DockerError``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Protocol

import docker
import docker.errors
import requests.exceptions

from imagebuild.errors import DockerError, LayerError
from imagebuild.layers import COMPILE_SCRIPT

_LOADED_RE = re.compile(r"Loaded image(?: ID)?: (\S+)")
_MOUNT = PurePosixPath("/imgbuild-staging")


class DockerDaemon(Protocol):
    """What the build asks of a Docker engine."""

    def load(self, archive: Path) -> tuple[str, ...]:
        """Load a docker/OCI archive; return the references or IDs the engine reports."""

    def image_id(self, ref: str) -> str | None:
        """The image ID behind ``ref``, or None if the engine does not have it."""

    def run(self, image: str, command: Sequence[str], *, mount: Path | None) -> str:
        """Run ``command`` in ``image`` (network none, root), return its output."""


def read_progress(stream: Iterable[dict[str, object]], action: str) -> list[str]:
    """Consume a docker JSON progress stream; raise on ``errorDetail`` / ``error``."""
    lines: list[str] = []
    for chunk in stream:
        if "errorDetail" in chunk or "error" in chunk:
            detail = chunk.get("errorDetail")
            message = (detail.get("message") if isinstance(detail, dict) else None) or chunk.get(
                "error"
            )
            raise DockerError(f"docker {action} failed: {message}")
        text = chunk.get("stream") or chunk.get("status")
        if isinstance(text, str) and text.strip():
            lines.append(text.strip())
    return lines


class DockerEngine:
    """A ``DockerDaemon`` backed by docker-py's low-level API client."""

    def __init__(self, client: docker.DockerClient) -> None:
        self.client = client

    @classmethod
    def from_env(cls) -> DockerEngine:
        """Connect as the docker CLI would (``DOCKER_HOST``, TLS variables)."""
        try:
            client = docker.from_env()
            client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerError(
                f"cannot reach the Docker engine ({exc})",
                hint="start Docker or set DOCKER_HOST; or use --output oci:DIR",
            ) from exc
        return cls(client)

    def load(self, archive: Path) -> tuple[str, ...]:
        """Stream ``archive`` to ``POST /images/load`` and check every progress message."""
        try:
            with archive.open("rb") as data:
                stream = self.client.api.load_image(data)
                lines = read_progress(_as_dicts(stream), "load")
        except docker.errors.APIError as exc:
            raise DockerError(f"docker load of {archive.name} failed: {exc.explanation}") from exc
        loaded = tuple(m[1] for m in map(_LOADED_RE.search, lines) if m)
        if not loaded:
            raise DockerError(f"docker load of {archive.name} reported no image: {lines[-3:]}")
        return loaded

    def image_id(self, ref: str) -> str | None:
        """Inspect ``ref``; None when the engine has no such image."""
        try:
            return str(self.client.api.inspect_image(ref)["Id"])
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as exc:
            raise DockerError(f"docker inspect {ref} failed: {exc.explanation}") from exc

    def run(self, image: str, command: Sequence[str], *, mount: Path | None) -> str:
        """Run a throwaway container with no network; the mount is read-write at /imgbuild-staging."""
        volumes = {str(mount): {"bind": str(_MOUNT), "mode": "rw"}} if mount else None
        try:
            output = self.client.containers.run(
                image,
                list(command),
                entrypoint=[],
                network_mode="none",
                user="0:0",
                volumes=volumes,
                remove=True,
                stdout=True,
                stderr=True,
            )
        except docker.errors.ContainerError as exc:
            stderr = exc.stderr.decode("utf-8", "replace") if exc.stderr else ""
            raise DockerError(
                f"command {command[0]} failed in {image} (exit {exc.exit_status}): "
                + stderr.strip()[-300:]
            ) from exc
        except docker.errors.APIError as exc:
            raise DockerError(f"docker run {image} failed: {exc.explanation}") from exc
        return bytes(output).decode("utf-8", "replace")


class EngineCompiler:
    """Compiles bytecode with the base image's own Python, run by the Docker engine.

    The staging directory is bind-mounted, so this needs an engine on this host.
    """

    def __init__(self, engine: DockerDaemon, image: str, interpreter: PurePosixPath) -> None:
        self.engine = engine
        self.image = image
        self.interpreter = interpreter

    @property
    def identity(self) -> str:
        """``image:`` and the image the interpreter comes from."""
        return f"image:{self.image}:{self.interpreter}"

    def compile(self, root: Path, files: Sequence[tuple[Path, PurePosixPath]]) -> int:
        """Write the file list into the mount and run the compile script over it."""
        listing = root / ".imgbuild-compile"
        listing.write_text(
            "".join(f"{_MOUNT / src.relative_to(root).as_posix()}\t{dst}\n" for src, dst in files),
            encoding="utf-8",
        )
        try:
            output = self.engine.run(
                self.image,
                [str(self.interpreter), "-I", "-c", COMPILE_SCRIPT, str(_MOUNT / listing.name)],
                mount=root,
            )
        except DockerError as exc:
            raise LayerError(
                f"compiling bytecode with {self.interpreter} in the base image failed: {exc}",
                hint="pass --no-compile to skip bytecode",
            ) from exc
        finally:
            listing.unlink()
        return int(output.strip().splitlines()[-1] or 0)


def _as_dicts(stream: object) -> Iterator[dict[str, object]]:
    if isinstance(stream, dict):
        yield stream
        return
    for item in stream:  # type: ignore[attr-defined]
        if isinstance(item, dict):
            yield item
