"""The Docker engine, through docker-py: load archives, run the base's Python, clean up.

``DockerSink`` is the ``docker`` output: it loads the finished image sending only the
layers the engine lacks.

docker-py reports load failures inside the JSON progress stream (``errorDetail``) while
the HTTP status is 200, so every stream is read to the end and checked here; callers
only ever see ``DockerError``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import docker
import docker.errors
import requests.exceptions

from imagebuild.errors import DockerError, LayerError
from imagebuild.image.model import Image
from imagebuild.install.compilescript import COMPILE_FLAGS, COMPILE_SCRIPT, compile_listing
from imagebuild.install.layers import Sources
from imagebuild.sinks.daemon import DockerDaemon, engine_base_tag
from imagebuild.sinks.layout import write_docker_archive

if TYPE_CHECKING:
    from imagebuild.report import Reporter
    from imagebuild.sinks.sink import Finished

_LOADED_RE = re.compile(r"Loaded image(?: ID)?: (\S+)")
_STAGING = PurePosixPath("/imgbuild-staging")
# `docker info` reports the kernel's machine name.
_OCI_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}
_DOT = PurePosixPath(".")
COMPILE_LABEL = "org.imgbuild.compile"
"""The label on every container imgbuild runs (to compile bytecode)."""
_FOREIGN_MAX_AGE = 24 * 3600.0


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
        engine = cls(client)
        engine.sweep_compile_containers()
        return engine

    def sweep_compile_containers(self) -> int:
        """Remove compile containers that killed builds left; return how many.

        Ours are labelled (``org.imgbuild.compile``) with the host and process that made
        them; one is stale when that process is gone from this host, or, made on another
        host, when it is over a day old. A failure to list or remove is not the build's
        problem: the next build sweeps again.
        """
        api, removed = self.client.api, 0
        try:
            found = api.containers(all=True, filters={"label": f"{COMPILE_LABEL}=1"})
        except (docker.errors.APIError, requests.exceptions.RequestException):
            return 0
        for container in found:
            if compile_container_is_stale(container.get("Labels") or {}, container.get("Created")):
                try:
                    api.remove_container(container["Id"], force=True)
                    removed += 1
                except (docker.errors.APIError, requests.exceptions.RequestException):
                    pass
        return removed

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

    def architecture(self) -> str:
        """The CPU the engine runs containers on, as OCI names it (``amd64``, ``arm64``)."""
        try:
            machine = str(self.client.info().get("Architecture", ""))
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise DockerError(f"docker info failed: {exc}") from exc
        return _OCI_ARCH.get(machine, machine)

    def diff_ids(self, ref: str) -> tuple[str, ...]:
        """``RootFS.Layers`` of ``ref``; empty when the engine has no such image."""
        try:
            attrs = self.client.api.inspect_image(ref)
        except docker.errors.ImageNotFound:
            return ()
        except docker.errors.APIError as exc:
            raise DockerError(f"docker inspect {ref} failed: {exc.explanation}") from exc
        layers = attrs.get("RootFS", {}).get("Layers") or []
        return tuple(str(layer) for layer in layers)

    def run(
        self,
        image: str,
        command: Sequence[str],
        *,
        upload: Path | None = None,
        download: tuple[PurePosixPath, Path] | None = None,
    ) -> str:
        """A throwaway container: create, upload, start, wait, download, remove."""
        api = self.client.api
        try:
            container = api.create_container(
                image,
                list(command),
                entrypoint=[],
                user="0:0",
                # Sets and frozensets in code objects are marshalled in hash order.
                environment={"PYTHONHASHSEED": "0"},
                network_disabled=True,
                host_config=api.create_host_config(network_mode="none"),
                # Found and removed by the next build's sweep if this process is killed.
                labels=compile_labels(),
            )["Id"]
        except docker.errors.APIError as exc:
            raise DockerError(f"docker run {image} failed: {exc.explanation}") from exc
        try:
            if upload is not None:
                with upload.open("rb") as data:
                    api.put_archive(container, "/", data)
            api.start(container)
            status = int(api.wait(container).get("StatusCode", -1))
            output = bytes(api.logs(container, stdout=True, stderr=False)).decode(
                "utf-8", "replace"
            )
            if status != 0:
                stderr = bytes(api.logs(container, stdout=False, stderr=True))
                raise DockerError(
                    f"command {command[0]} failed in {image} (exit {status}): "
                    + stderr.decode("utf-8", "replace").strip()[-300:]
                )
            if download is not None:
                inside, dest = download
                stream, _ = api.get_archive(container, str(inside))
                with dest.open("wb") as out:
                    for chunk in stream:
                        out.write(chunk)
            return output
        except docker.errors.APIError as exc:
            raise DockerError(f"docker run {image} failed: {exc.explanation}") from exc
        finally:
            try:
                api.remove_container(container, force=True)
            except docker.errors.APIError:
                pass  # already gone; nothing of ours is left in it


def compile_labels() -> dict[str, str]:
    """The labels of a container this process runs: ours, and whose (host and pid)."""
    return {
        COMPILE_LABEL: "1",
        f"{COMPILE_LABEL}.host": socket.gethostname(),
        f"{COMPILE_LABEL}.pid": str(os.getpid()),
    }


def compile_container_is_stale(labels: dict[str, str], created: object) -> bool:
    """Whether a labelled container's process is gone (see ``sweep_compile_containers``)."""
    if labels.get(f"{COMPILE_LABEL}.host") != socket.gethostname():
        return isinstance(created, int | float) and time.time() - created > _FOREIGN_MAX_AGE
    pid = labels.get(f"{COMPILE_LABEL}.pid", "")
    if not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


class EngineCompiler:
    """Compiles bytecode with the base image's own Python, run by the Docker engine.

    The sources go into the container as a tar and the tree comes back as one, so the
    engine need not share this host's files; only the ``.pyc`` files are taken back.
    """

    def __init__(self, engine: DockerDaemon, image: str, interpreter: PurePosixPath) -> None:
        self.engine = engine
        self.image = image
        self.interpreter = interpreter

    @property
    def identity(self) -> str:
        """``image:`` and the image the interpreter comes from."""
        return f"image:{self.image}:{self.interpreter}"

    def compile(self, root: Path, groups: Sequence[Sources]) -> int:
        """Send the sources under ``root``, compile them there, write the pycs back."""
        with tempfile.TemporaryDirectory(prefix="imgbuild-compile-", dir=root.parent) as tmp:
            upload, download = Path(tmp) / "in.tar", Path(tmp) / "out.tar"
            listing = _pack_sources(root, groups, upload)
            try:
                output = self.engine.run(
                    self.image,
                    [str(self.interpreter), *COMPILE_FLAGS, "-c", COMPILE_SCRIPT, str(listing)],
                    upload=upload,
                    download=(_STAGING, download),
                )
                _unpack_pycs(download, root)
            except DockerError as exc:
                raise LayerError(
                    f"compiling bytecode with {self.interpreter} in the base image failed: {exc}",
                    hint="pass --no-compile to skip bytecode",
                ) from exc
        lines = output.strip().splitlines()
        if not lines or not lines[-1].isdigit():
            raise LayerError(
                f"compiling bytecode with {self.interpreter} in the base image printed no "
                f"count of failures ({output.strip()[-200:]!r})",
                hint="pass --no-compile to skip bytecode",
            )
        return int(lines[-1])


def _pack_sources(root: Path, groups: Sequence[Sources], dest: Path) -> PurePosixPath:
    """A tar of the sources under ``/imgbuild-staging`` and the compile listing.

    Returns the listing's path in the container.
    """
    listing = _STAGING / ".imgbuild-compile"
    files = [pair for group in groups for pair in group]
    relative = [src.relative_to(root).as_posix() for src, _ in files]
    text = compile_listing(
        [(str(_STAGING / src.relative_to(root).as_posix()), str(dst)) for src, dst in group]
        for group in groups
    )
    directories = sorted({p for rel in relative for p in PurePosixPath(rel).parents} - {_DOT})
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for directory in [_DOT, *directories]:
            info = tarfile.TarInfo(_member(directory))
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        data = text.encode()
        info = tarfile.TarInfo(_member(PurePosixPath(listing.name)))
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
        for rel, (src, _) in zip(relative, files, strict=True):
            info = tarfile.TarInfo(_member(PurePosixPath(rel)))
            info.size, info.mode = src.stat().st_size, 0o644
            with src.open("rb") as content:
                tar.addfile(info, content)
    return listing


def _member(path: PurePosixPath) -> str:
    return (PurePosixPath(_STAGING.name) / path).as_posix()


def _unpack_pycs(archive: Path, root: Path) -> None:
    """Write every ``__pycache__/*.pyc`` of the returned tree into ``root``.

    The engine names the tree's top ``imgbuild-staging``; anything else in the tar (links,
    paths that climb out, files that are not pycs) is ignored.
    """
    with tarfile.open(archive) as tar:
        for info in tar:
            parts = PurePosixPath(info.name).parts
            if (
                not info.isfile()
                or len(parts) < 3
                or parts[0] != _STAGING.name
                or ".." in parts
                or parts[-2] != "__pycache__"
                or not parts[-1].endswith(".pyc")
            ):
                continue
            content = tar.extractfile(info)
            if content is None:
                continue
            target = root.joinpath(*parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            with content, target.open("wb") as out:
                shutil.copyfileobj(content, out)


def _as_dicts(stream: object) -> Iterator[dict[str, object]]:
    if isinstance(stream, dict):
        yield stream
        return
    for item in stream:  # type: ignore[attr-defined]
        if isinstance(item, dict):
            yield item


@dataclass(frozen=True, kw_only=True, slots=True)
class DockerSink:
    """``--output docker``: load the image into the engine under every tag."""

    connect: Callable[[], DockerDaemon]
    """Connects to the engine when the image is ready (``DockerEngine.from_env``)."""
    kind: str = field(default="docker", init=False)
    """The ``--output`` kind."""
    takes_index: bool = field(default=False, init=False)
    """An engine loads one image, not an index."""

    def write(self, finished: Finished, reporter: Reporter) -> tuple[str, ...]:
        """Load ``finished`` (one platform's image); one ``loaded <tag>`` line per tag."""
        image = finished.image
        assert isinstance(image, Image), "one platform only (the pipeline refuses more)"
        tags = [str(ref) for ref in finished.tags]
        base_tag = engine_base_tag(finished.base.manifest_digest)
        load_delta(self.connect(), image, tags, finished.work, base_tag, reporter)
        return tuple(f"loaded {tag}" for tag in tags)


def load_delta(
    engine: DockerDaemon,
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
    config = json.loads(image.store.path(image.config.digest).read_bytes())
    ours = tuple(config["rootfs"]["diff_ids"])
    present = 0
    for candidate in (base_tag, *tags):
        theirs = engine.diff_ids(candidate)
        common = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None
        )
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
