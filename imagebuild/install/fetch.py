"""Download wheels and verify them against the lock into a content-addressed cache."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import httpx
from filelock import FileLock

from imagebuild.cache import atomic_writer
from imagebuild.digest import Hasher, digest_hex, parse_digest
from imagebuild.errors import FetchError
from imagebuild.lock.model import WheelFile
from imagebuild.net.credentials import AUTH_HINT
from imagebuild.net.http import attempts
from imagebuild.net.transfer import (
    CHUNK,
    NETWORK_HINT,
    body,
    failure_text,
    fetch_retrying,
    redact,
    redact_text,
)
from imagebuild.report import NullReporter, Reporter

_RELOCK_HINT = (
    "the file no longer matches the lock: check the index serves the locked file, "
    "or re-lock with 'uv lock --refresh'"
)


class WheelStore(Protocol):
    """Where verified wheels are kept; ``fetch_wheels`` needs only these two methods."""

    def path_for(self, wheel: WheelFile) -> Path | None:
        """The stored file for ``wheel``, or ``None`` if it is not stored yet."""
        ...

    def store(self, wheel: WheelFile, chunks: Iterable[bytes]) -> Path:
        """Write ``chunks`` as ``wheel`` if their sha256 and size match the lock.

        Raises ``FetchError`` on a mismatch, leaving nothing at the final path.
        """
        ...


class WheelCache:
    """Wheels on disk addressed by their sha256: ``bucket/sha256/ab/<hex>/<filename>``.

    ``bucket`` is the cache's wheel bucket (``CacheLayout.wheels``). A file only ever
    reaches its final path by ``os.replace`` after its hash and size were checked, so a
    present file is a verified one. A file lock per entry keeps two processes from
    downloading into the same entry at once.
    """

    def __init__(self, bucket: Path) -> None:
        self.root = bucket

    def entry_dir(self, wheel: WheelFile) -> Path:
        """The directory that holds ``wheel`` (named after its digest)."""
        hexdigest = _hex(wheel)
        return self.root / "sha256" / hexdigest[:2] / hexdigest

    def final_path(self, wheel: WheelFile) -> Path:
        """Where ``wheel`` is kept once fetched (whether it is there yet or not)."""
        name = Path(wheel.filename).name
        if name != wheel.filename or name in ("", ".", ".."):
            raise FetchError(f"wheel {wheel.filename!r}: not a plain file name")
        return self.entry_dir(wheel) / name

    def path_for(self, wheel: WheelFile) -> Path | None:
        """The cached file for ``wheel``, or ``None`` (a size that disagrees counts as absent)."""
        path = self.final_path(wheel)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        if wheel.size is not None and size != wheel.size:
            return None
        return path

    def store(self, wheel: WheelFile, chunks: Iterable[bytes]) -> Path:
        """Verify and store ``chunks`` as ``wheel``; a concurrent writer's result is reused."""
        final = self.final_path(wheel)
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final.parent) + ".lock"):
            existing = self.path_for(wheel)
            if existing is not None:
                return existing
            with atomic_writer(final) as out:
                hasher = Hasher()
                for chunk in chunks:
                    hasher.update(chunk)
                    out.write(chunk)
                _verify(wheel, digest_hex(hasher.digest()), hasher.size)
        return final


def _hex(wheel: WheelFile) -> str:
    try:
        return digest_hex(parse_digest(wheel.sha256))
    except ValueError:
        raise FetchError(
            f"wheel {wheel.filename}: lock has no usable sha256 ({wheel.sha256!r})"
        ) from None


def _verify(wheel: WheelFile, hexdigest: str, size: int) -> None:
    expected = _hex(wheel)
    if hexdigest != expected:
        raise FetchError(
            f"wheel {wheel.filename}: sha256 mismatch (lock: {expected}, downloaded: {hexdigest})",
            hint=_RELOCK_HINT,
        )
    if wheel.size is not None and size != wheel.size:
        raise FetchError(
            f"wheel {wheel.filename}: size mismatch (lock: {wheel.size} bytes, "
            f"downloaded: {size} bytes)",
            hint=_RELOCK_HINT,
        )


def fetch_wheels(
    http: httpx.Client,
    wheels: Sequence[WheelFile],
    cache: WheelStore,
    *,
    workers: int = 8,
    reporter: Reporter | None = None,
    base_dir: Path | None = None,
) -> dict[WheelFile, Path]:
    """Make every wheel available locally, verified; returns wheel -> cached path.

    Cached wheels cause no request. The rest are downloaded in ``workers`` threads through
    ``http`` (``https``/``http`` URLs) or copied (``file://`` URLs and paths, relative ones
    resolved against ``base_dir``, default the working directory). The first failure
    cancels what has not started and is raised as ``FetchError``.
    """
    report = reporter or NullReporter()
    unique = list(dict.fromkeys(wheels))
    result: dict[WheelFile, Path] = {}
    todo: list[WheelFile] = []
    for wheel in unique:
        cached = cache.path_for(wheel)
        if cached is not None:
            result[wheel] = cached
        else:
            todo.append(wheel)
    if not todo:
        return result
    report.step(f"fetching {len(todo)} wheel(s) ({len(result)} cached)")
    base = base_dir or Path.cwd()
    counter = _Downloaded(report, todo)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        futures: dict[Future[Path], WheelFile] = {
            pool.submit(_fetch_one, http, wheel, cache, base, counter): wheel for wheel in todo
        }
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failures = [f for f in futures if f in done and f.exception() is not None]
        if failures:
            for future in pending:
                future.cancel()
            error = failures[0].exception()
            if isinstance(error, FetchError):
                raise error
            raise FetchError(
                f"wheel {futures[failures[0]].filename}: {redact_text(str(error))}"
            ) from error
        for future, wheel in futures.items():
            result[wheel] = future.result()
            report.step(f"fetched {wheel.filename}")
    counter.finish()
    return result


class _Downloaded:
    """Bytes read so far by every download thread, reported as ``download`` progress."""

    def __init__(self, reporter: Reporter, wheels: Sequence[WheelFile]) -> None:
        self._reporter = reporter
        sizes = [wheel.size for wheel in wheels]
        self._total = None if None in sizes else sum(s or 0 for s in sizes)
        self._done = 0
        self._lock = threading.Lock()
        reporter.progress("download", 0, self._total, "B")

    def counted(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """``chunks``, each counted as it passes."""
        for chunk in chunks:
            with self._lock:
                self._done += len(chunk)
                # A body fetched again counts twice: never claim the end before it comes.
                done = (
                    self._done if self._total is None else min(self._done, max(self._total - 1, 0))
                )
                self._reporter.progress("download", done, self._total, "B")
            yield chunk

    def finish(self) -> None:
        """The last call: every wheel is stored."""
        end = self._total if self._total is not None else self._done
        self._reporter.progress("download", end, end, "B")


def _fetch_one(
    http: httpx.Client, wheel: WheelFile, cache: WheelStore, base: Path, counter: _Downloaded
) -> Path:
    parts = urlsplit(wheel.url)
    if parts.scheme in ("http", "https"):
        return _download(http, wheel, cache, counter)
    if parts.scheme == "file":
        path = Path(url2pathname(unquote(parts.path)))
    elif parts.scheme == "" or len(parts.scheme) == 1:  # a plain or Windows-drive path
        path = Path(wheel.url)
        if not path.is_absolute():
            path = base / path
    else:
        raise FetchError(f"wheel {wheel.filename}: unsupported URL scheme in {redact(wheel.url)}")
    try:
        with path.open("rb") as src:
            return cache.store(wheel, counter.counted(iter(lambda: src.read(CHUNK), b"")))
    except FileNotFoundError:
        raise FetchError(
            f"wheel {wheel.filename}: local file {path} does not exist",
            hint="restore the file or re-lock",
        ) from None
    except OSError as exc:
        raise FetchError(f"wheel {wheel.filename}: cannot read {path}: {exc}") from exc


def _download(
    http: httpx.Client, wheel: WheelFile, cache: WheelStore, counter: _Downloaded
) -> Path:
    """Stream ``wheel`` into the cache, again if its body breaks off (``fetch_retrying``)."""
    url = redact(wheel.url)

    def store(response: httpx.Response) -> Path:
        status = response.status_code
        if status >= 500:
            raise FetchError(f"wheel {wheel.filename}: GET {url} answered {status}")
        if status != 200:
            raise FetchError(
                f"wheel {wheel.filename}: GET {url} answered "
                f"{status} {response.reason_phrase}".rstrip(),
                hint=AUTH_HINT
                if status in (401, 403)
                else "check the index still serves the locked file",
            )
        # iter_bytes undoes any Content-Encoding a server or proxy applied in transit, so
        # the bytes hashed are the file's own.
        return cache.store(wheel, counter.counted(body(response)))

    try:
        return fetch_retrying(http, wheel.url, store, size=wheel.size)
    except httpx.TransportError as exc:
        count = attempts(exc)
        failed = f"failed after {count} attempts" if count > 1 else "failed"
        raise FetchError(
            f"wheel {wheel.filename}: download from {url} {failed}: {failure_text(exc)}",
            hint=NETWORK_HINT,
        ) from exc
    except httpx.HTTPError as exc:
        raise FetchError(
            f"wheel {wheel.filename}: download failed: {redact_text(str(exc))}"
        ) from exc
