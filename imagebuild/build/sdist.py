"""Source distributions: their metadata, and wheels built from pure-Python ones (PEP 517).

A package that publishes only an sdist has no metadata file to read: its backend is asked
for it (``prepare_metadata_for_build_wheel``; pypa/build builds a wheel instead when the
backend lacks the hook). At image build time such a package is built into a wheel, and
only a pure-Python one (every tag ``*-none-any``, ``Root-Is-Purelib: true``) is accepted:
imgbuild builds on the host, which is not the target.

Both run the backend with ``SOURCE_DATE_EPOCH=0`` in a kept build environment (see
``build.pep517.BuildEnvironments``: its requirements come from the indexes the project locks
from, installed with uv when it is on PATH, pip otherwise). Both results are kept on disk
under the sdist's sha256, so the work is done once:
``cache_dir/sdist-metadata/<sha256>.metadata`` and
``cache_dir/sdist-wheels/<sha256>/<wheel filename>``. Entries only ever appear whole, by
``os.replace``, and only after the download matched its hash.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit
from urllib.request import url2pathname

import httpx
from build import BuildBackendException, BuildException, FailedProcessError
from filelock import FileLock
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion

from imagebuild.build.pep517 import BuildEnvironments, RequirementsInstallError
from imagebuild.build.runner import ProcessFailed, hook_runner
from imagebuild.cache import CacheLayout, atomic_writer, build_envs_memory, write_atomic
from imagebuild.digest import Hasher, digest_hex, parse_digest
from imagebuild.errors import BuildError, FetchError, ImagebuildError, PackageIndexError
from imagebuild.net.credentials import AUTH_HINT, IndexCredentials
from imagebuild.net.http import attempts
from imagebuild.net.transfer import NETWORK_HINT as _NETWORK_HINT
from imagebuild.net.transfer import failure_text, fetch_retrying, redact_text, write_stream
from imagebuild.net.transfer import one_line as _one_line
from imagebuild.net.transfer import redact as _redact

if TYPE_CHECKING:
    from imagebuild.index.model import IndexFile

_HOOK_RUNNER = hook_runner({"SOURCE_DATE_EPOCH": "0"})
_BUILD_HINT = "use a version of it that ships a wheel for the target"

_Error = type[ImagebuildError]


def sdist_metadata(
    http: httpx.Client, file: IndexFile, cache_dir: Path, *, indexes: Sequence[str]
) -> bytes:
    """The core metadata (``METADATA`` bytes) of the sdist ``file``, from its PEP 517 backend.

    Downloads the sdist through ``http`` (checked against ``file.sha256`` when the index
    gave one), unpacks it safely and asks its backend, whose requirements come from
    ``indexes`` into an environment kept under ``cache_dir/build-envs``. The answer is
    cached under ``cache_dir/sdist-metadata/`` by the sdist's sha256; a cached answer costs
    no request when the index gave the hash. Name and version are not checked here (the caller
    compares them with the file name).

    Raises ``PackageIndexError`` naming the sdist when it cannot be downloaded, does not
    match its hash, is not a safe archive, or its backend fails.
    """
    subject = f"sdist {file.filename}"
    error: _Error = PackageIndexError
    _plain_name(file.filename, subject, error)
    if file.sha256 is not None:
        cached = _read(_metadata_entry(cache_dir, file.sha256))
        if cached is not None:
            return cached
    with tempfile.TemporaryDirectory(prefix="imgbuild-sdist-") as tmp:
        work = Path(tmp)
        archive = work / file.filename
        digest = _download(http, file.url, archive, subject, error, file.size)
        if file.sha256 is not None and digest != file.sha256:
            raise PackageIndexError(
                f"{subject}: sha256 mismatch (index: {file.sha256}, downloaded: {digest})",
                hint="the download was damaged or the index is inconsistent; retry later",
            )
        entry = _metadata_entry(cache_dir, digest)
        cached = _read(entry)  # the index gave no hash, but these bytes were seen before
        if cached is not None:
            return cached
        source = _unpack(archive, work / "src", subject, error)
        data = _prepare_metadata(
            source, work / "out", subject, error, _envs(cache_dir, indexes, http)
        )
    _write_atomic(entry, data)
    return data


def build_sdist_wheel(
    http: httpx.Client,
    url: str,
    sha256: str,
    filename: str,
    cache_dir: Path,
    *,
    indexes: Sequence[str],
) -> Path:
    """The path of a pure-Python wheel built from the sdist ``filename`` at ``url``.

    ``sha256`` is the sdist's digest (hex, or ``sha256:<hex>`` as a lock records it). A
    wheel built before from the same sdist is returned without any request or build. Else
    the sdist is downloaded, verified, unpacked and built in a build environment whose
    requirements come from ``indexes``, with ``SOURCE_DATE_EPOCH=0``; the wheel is kept at
    ``cache_dir/sdist-wheels/<sha256>/<wheel filename>`` and that path returned. A file
    lock keeps two processes from building the same sdist at once.

    Raises ``FetchError`` when the download fails or does not match ``sha256`` (nothing
    is cached then), and ``BuildError`` when the archive is unsafe, the backend fails, or
    the wheel is not pure Python (every tag ``*-none-any`` and ``Root-Is-Purelib: true``).
    """
    subject = f"sdist {filename}"
    _plain_name(filename, subject, FetchError)
    expected = _hex(sha256, subject)
    entry = CacheLayout(cache_dir).sdist_wheels / expected
    built = cached_wheel(entry)
    if built is not None:
        return built
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        built = cached_wheel(entry)  # another process may have built it meanwhile
        if built is not None:
            return built
        with tempfile.TemporaryDirectory(prefix="imgbuild-sdist-") as tmp:
            work = Path(tmp)
            archive = work / filename
            digest = _download(http, url, archive, subject, FetchError)
            if digest != expected:
                raise FetchError(
                    f"{subject}: sha256 mismatch (lock: {expected}, downloaded: {digest})",
                    hint="the file no longer matches the lock: check the index serves the "
                    "locked file, or re-lock",
                )
            source = _unpack(archive, work / "src", subject, BuildError)
            wheel = _build_wheel(source, work / "out", subject, _envs(cache_dir, indexes, http))
            _check_pure(wheel, subject)
            _check_identity(wheel, filename, subject)
            final = entry / wheel.name
            with wheel.open("rb") as src, atomic_writer(final) as out:
                shutil.copyfileobj(src, out)
    return final


# -- cache ---------------------------------------------------------------------------------


def _metadata_entry(cache_dir: Path, sha256: str) -> Path:
    return CacheLayout(cache_dir).sdist_metadata / f"{sha256}.metadata"


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    # A cache that cannot be written only costs a rebuild next time: never fail for it.
    try:
        write_atomic(path, data)
    except OSError:
        pass


def cached_wheel(entry: Path) -> Path | None:
    """The one wheel a cache entry directory holds, if it holds exactly one."""
    try:
        wheels = [p for p in entry.iterdir() if p.suffix == ".whl" and not p.name.startswith(".")]
    except OSError:
        return None
    return wheels[0] if len(wheels) == 1 else None


def _hex(sha256: str, subject: str) -> str:
    try:
        return digest_hex(parse_digest(sha256, bare_hex=True))
    except ValueError:
        raise FetchError(
            f"{subject}: no usable sha256 ({sha256!r})",
            hint="re-lock so the lock records the sdist's hash",
        ) from None


def _plain_name(filename: str, subject: str, error: _Error) -> None:
    if Path(filename).name != filename or filename in ("", ".", ".."):
        raise error(f"{subject}: not a plain file name")
    if not filename.endswith((".tar.gz", ".zip")):
        raise error(
            f"{subject}: not a .tar.gz or .zip source distribution",
            hint="use a version of it that ships a wheel for the target",
        )


# -- download ------------------------------------------------------------------------------


def _download(
    http: httpx.Client,
    url: str,
    dest: Path,
    subject: str,
    error: _Error,
    size: int | None = None,
) -> str:
    """Stream ``url`` into ``dest``; its sha256 hex (a broken-off body is fetched again).

    A ``file://`` URL (a local sdist a lock names) is copied instead.
    """
    if url.startswith("file:"):
        return _copy_local(url, dest, subject, error)

    def write(response: httpx.Response) -> str:
        status = response.status_code
        if status >= 500:
            raise error(f"{subject}: GET {_redact(url)} {_failed(response)}", hint=_NETWORK_HINT)
        if status != 200:
            raise error(
                f"{subject}: GET {_redact(url)} answered "
                f"{status} {response.reason_phrase}".rstrip(),
                hint=AUTH_HINT if status in (401, 403) else "check the index still serves the file",
            )
        return write_stream(response, dest)

    try:
        return fetch_retrying(http, url, write, size=size)
    except httpx.TransportError as exc:
        raise error(f"{subject}: GET {_redact(url)} {_failed(exc)}", hint=_NETWORK_HINT) from exc
    except httpx.HTTPError as exc:
        raise error(
            f"{subject}: GET {_redact(url)} failed: {redact_text(_one_line(exc))}",
            hint=_NETWORK_HINT,
        ) from exc


def _copy_local(url: str, dest: Path, subject: str, error: _Error) -> str:
    source = Path(url2pathname(urlsplit(url).path))
    hasher = Hasher()
    try:
        with source.open("rb") as src, dest.open("wb") as out:
            while chunk := src.read(1 << 20):
                hasher.update(chunk)
                out.write(chunk)
    except OSError as exc:
        raise error(
            f"{subject}: cannot read {source} ({_one_line(exc)})", hint="check the file exists"
        ) from exc
    return digest_hex(hasher.digest())


def _failed(outcome: httpx.Response | httpx.TransportError) -> str:
    """``failed 3 times, last: <what>`` (or ``failed: <what>`` after one attempt)."""
    if isinstance(outcome, httpx.Response):
        what = f"HTTP {outcome.status_code} {outcome.reason_phrase}".rstrip()
    else:
        what = f"{type(outcome).__name__}: {failure_text(outcome)}".rstrip(": ")
    count = attempts(outcome)
    return f"failed {count} times, last: {what}" if count > 1 else f"failed: {what}"


# -- unpack --------------------------------------------------------------------------------


def _unpack(archive: Path, dest: Path, subject: str, error: _Error) -> Path:
    """Extract ``archive`` into ``dest`` and return the project directory inside it.

    Members that would land outside ``dest`` (absolute paths, ``..``, links pointing out)
    refuse the whole sdist: an archive that tries is broken or hostile.
    """
    dest.mkdir(parents=True)
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    _check_member(name, subject, error)
                zf.extractall(dest)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for member in tf.getmembers():
                    _check_member(member.name, subject, error)
                # The data filter also refuses links out of dest, devices and odd modes.
                tf.extractall(dest, filter="data")
    except tarfile.FilterError as exc:
        raise error(
            f"{subject}: unsafe archive member ({_one_line(exc)})",
            hint="the sdist is broken or hostile; use a version with a wheel",
        ) from exc
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise error(
            f"{subject}: cannot unpack it ({type(exc).__name__}: {_one_line(exc)})",
            hint="the download was damaged or the sdist is malformed; retry or use a wheel",
        ) from exc
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        project = entries[0]  # the usual <name>-<version>/ top directory
    else:
        project = dest
    if not (project / "pyproject.toml").is_file() and not (project / "setup.py").is_file():
        raise error(
            f"{subject}: no pyproject.toml or setup.py at the top of the archive",
            hint="the sdist is malformed; use a version of it that ships a wheel",
        )
    return project


def _check_member(name: str, subject: str, error: _Error) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise error(
            f"{subject}: archive member {name!r} would be written outside the sdist's directory",
            hint="the sdist is broken or hostile; use a version of it that ships a wheel",
        )


# -- PEP 517 -------------------------------------------------------------------------------


def run_backend(
    source: Path,
    out: Path,
    subject: str,
    error: _Error,
    action: Literal["metadata", "wheel"],
    envs: BuildEnvironments,
    *,
    hint: str = _BUILD_HINT,
) -> Path:
    """Ask ``source``'s PEP 517 backend for its metadata directory or a wheel, under ``out``.

    Every failure (build requirements, the backend, the process) is one ``error`` naming
    ``subject``, with credentials hidden from what the installer or backend said.
    """
    what = "metadata" if action == "metadata" else "a wheel"
    try:
        with envs.builder(source, _HOOK_RUNNER) as builder:
            if action == "metadata":
                return Path(builder.metadata_path(out))
            return Path(builder.build("wheel", out))
    except RequirementsInstallError as exc:
        raise error(
            # The installer was given URLs with credentials: its own words may quote them.
            f"{subject}: installing its build requirements failed: {redact_text(_one_line(exc))}",
            hint=hint,
        ) from exc
    except BuildBackendException as exc:
        cause = exc.exception
        detail = cause.last_line() if isinstance(cause, ProcessFailed) else _one_line(exc)
        raise error(
            f"{subject}: the build backend failed to make {what}: {redact_text(_one_line(detail))}",
            hint=hint,
        ) from exc
    except (BuildException, FailedProcessError, ProcessFailed, OSError) as exc:
        raise error(
            f"{subject}: cannot build {what}: {_one_line(exc) or type(exc).__name__}",
            hint=hint,
        ) from exc


def _envs(cache_dir: Path, indexes: Sequence[str], http: httpx.Client) -> BuildEnvironments:
    # The installer of build requirements is another process: it gets the credentials of
    # the client's auth, put into its index URLs at that boundary only.
    credentials = http.auth if isinstance(http.auth, IndexCredentials) else None
    root = CacheLayout(cache_dir).build_envs
    return BuildEnvironments(
        root=root,
        memory=build_envs_memory(root),
        indexes=tuple(indexes),
        credentials=credentials,
    )


def _prepare_metadata(
    source: Path, out: Path, subject: str, error: _Error, envs: BuildEnvironments
) -> bytes:
    dist_info = run_backend(source, out, subject, error, "metadata", envs)
    data = _read(dist_info / "METADATA")
    if data is None:
        raise error(f"{subject}: the build backend wrote no METADATA", hint=_BUILD_HINT)
    return data


def _build_wheel(source: Path, out: Path, subject: str, envs: BuildEnvironments) -> Path:
    wheel = run_backend(source, out, subject, BuildError, "wheel", envs)
    if wheel.suffix != ".whl" or not wheel.is_file():
        raise BuildError(f"{subject}: the build backend made no wheel", hint=_BUILD_HINT)
    return wheel


def _check_pure(wheel: Path, subject: str) -> None:
    """Refuse ``wheel`` unless every tag is ``*-none-any`` and it is ``Root-Is-Purelib``."""
    refusal = (
        f"{subject}: builds a platform wheel ({wheel.name}); "
        "imgbuild only builds pure-Python sdists"
    )
    hint = "use a version with a wheel for the target"
    try:
        tags = parse_wheel_filename(wheel.name)[3]
    except InvalidWheelFilename as exc:
        raise BuildError(
            f"{subject}: the build backend made {wheel.name}, not a valid wheel name",
            hint=_BUILD_HINT,
        ) from exc
    if not all(tag.abi == "none" and tag.platform == "any" for tag in tags):
        raise BuildError(refusal, hint=hint)
    if not _root_is_purelib(wheel, subject):
        raise BuildError(refusal, hint=hint)


def _check_identity(wheel: Path, sdist: str, subject: str) -> None:
    """Refuse a wheel whose name or version is not the sdist's (it would be locked wrong)."""
    name, version, _, _ = parse_wheel_filename(wheel.name)
    try:
        expected = parse_sdist_filename(sdist)
    except (InvalidSdistFilename, InvalidVersion):
        return  # an odd sdist name the index let through: nothing to compare with
    if (name, version) != expected:
        raise BuildError(
            f"{subject}: built {wheel.name}, which is {name} {version}, "
            f"not {expected[0]} {expected[1]}",
            hint="the sdist is inconsistent; use a version of it that ships a wheel",
        )


def _root_is_purelib(wheel: Path, subject: str) -> bool:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [
                n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/WHEEL")
            ]
            if len(names) != 1:
                raise BuildError(
                    f"{subject}: the built wheel {wheel.name} has {len(names)} "
                    ".dist-info/WHEEL files, not one",
                    hint=_BUILD_HINT,
                )
            text = zf.read(names[0]).decode("utf-8", "replace")
    except (zipfile.BadZipFile, OSError, KeyError) as exc:
        raise BuildError(
            f"{subject}: cannot read the built wheel {wheel.name} ({_one_line(exc)})",
            hint=_BUILD_HINT,
        ) from exc
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "root-is-purelib":
            return value.strip().lower() == "true"
    return False


# -- messages ------------------------------------------------------------------------------
