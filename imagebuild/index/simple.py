"""``SimpleIndex``: the production ``PackageIndex`` (values and protocol in ``model``).

It speaks the PEP 691 JSON Simple API (HTML as a fallback; parsing in ``pages``) and reads
dependencies from PEP 658/714 metadata files (``metadata``), so resolving never downloads a
wheel when the index serves metadata. Pages are cached on disk and revalidated with ETag /
Cache-Control (``httpcache``).
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Generic, Self, TypeVar

import httpx
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from imagebuild.cache import CacheLayout
from imagebuild.digest import digest_bytes, digest_hex
from imagebuild.errors import PackageIndexError
from imagebuild.index.httpcache import (
    CachedPage,
    HttpCache,
    encode_parsed,
    parsed_path,
    read_parsed,
)
from imagebuild.index.metadata import parse_metadata, wheel_metadata
from imagebuild.index.model import DistMetadata, IndexFile, SdistMetadataReader
from imagebuild.index.pages import (
    ACCEPT,
    API_MAJOR,
    API_MINOR,
    HTML_TYPES,
    JSON_TYPES,
    charset,
    parse_html_page,
    parse_json_page,
)
from imagebuild.net.credentials import AUTH_HINT
from imagebuild.net.http import attempts
from imagebuild.net.transfer import NETWORK_HINT as _NETWORK_HINT
from imagebuild.net.transfer import failure_text, fetch_retrying, redact_text, write_stream
from imagebuild.net.transfer import one_line as _one_line
from imagebuild.net.transfer import redact as _redact
from imagebuild.report import NullReporter, Reporter

_PARSED_CACHE_ABOVE = 256 * 1024  # bytes of page below which parsing is cheaper

_K = TypeVar("_K")
_V = TypeVar("_V")
_T = TypeVar("_T")


class SimpleIndex:
    """A ``PackageIndex`` over one or more PEP 503/691 Simple API indexes, through httpx.

    ``files(name)`` asks each index in ``index_urls`` in turn and keeps the first that
    knows the project (uv's default ``first-index`` strategy: a project is never mixed
    from two indexes, so a later, public index cannot slip in versions of a project the
    first one owns).
    JSON pages are preferred; HTML pages are understood. ``metadata(file)`` reads the
    PEP 658/714 ``.metadata`` file when the index advertises one, else downloads the wheel
    and reads its ``METADATA``; an sdist without a metadata file is downloaded and its
    PEP 517 backend asked through ``sdist_metadata`` (the build stage's reader, handed in
    by the caller so that the index never imports the build stage), cached by hash.

    Both are memoised per instance and thread-safe: concurrent calls for one key share
    one fetch. A failed fetch is not memoised, so a later call tries again. ``prefetch``
    and ``prefetch_metadata`` start the same work on a pool of ``workers`` threads owned
    by the index (``close()`` or a ``with`` block stops it); their errors are dropped,
    and the real call raises them.

    With a ``cache_dir``, project pages are kept under ``cache_dir/http/`` with their
    ETag, Last-Modified and Cache-Control max-age: a fresh page is reused without a
    request, a stale one revalidated with a conditional GET. Metadata files are immutable
    and kept under ``cache_dir/metadata/``. Unreadable cache entries count as missing.

    Every failure is a ``PackageIndexError`` naming the project or file, the URL (never
    its credentials) and what went wrong, after the retries of ``net.transfer``'s
    ``fetch_retrying``: transport errors, 429 and 5xx, and bodies that break off.
    """

    def __init__(
        self,
        http: httpx.Client,
        index_urls: Sequence[str],
        *,
        cache_dir: Path | None,
        workers: int = 8,
        reporter: Reporter | None = None,
        sdist_metadata: SdistMetadataReader | None = None,
    ) -> None:
        if isinstance(index_urls, str):
            index_urls = [index_urls]
        if not index_urls:
            raise PackageIndexError(
                "no package index configured", hint="pass at least one Simple API URL"
            )
        self._http = http
        self.index_urls: tuple[str, ...] = tuple(url.rstrip("/") + "/" for url in index_urls)
        """The Simple API base URLs, in priority order, each ending in ``/``."""
        self._report = reporter or NullReporter()
        self._layout = CacheLayout(cache_dir) if cache_dir else None
        self._pages = HttpCache(self._layout.http if self._layout else None, self._report)
        self._metadata_dir = self._layout.metadata if self._layout else None
        self._cache_dir = cache_dir
        self._sdist_metadata = sdist_metadata
        self._files: _Once[NormalizedName, tuple[IndexFile, ...]] = _Once()
        self._metadata: _Once[tuple[str, str | None], DistMetadata] = _Once()
        self._release_metadata: dict[tuple[NormalizedName, Version], DistMetadata] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix="imgbuild-index"
        )
        self._warned: set[str] = set()
        self._warn_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop prefetching: queued work is dropped, running fetches are waited for."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- PackageIndex ------------------------------------------------------------------

    def files(self, name: NormalizedName) -> tuple[IndexFile, ...]:
        """Every usable file of ``name`` from the first index that knows it (see class doc)."""
        key = canonicalize_name(name)
        return self._files.get(key, lambda: self._load_files(key))

    def metadata(self, file: IndexFile) -> DistMetadata:
        """Core metadata of ``file``: PEP 658 file if advertised, else from the wheel or sdist.

        The wheels of one release carry the same metadata (uv assumes so too): once one
        wheel's is known, a sibling wheel's is answered from it, so locking for a second
        architecture reads nothing new.
        """
        if file.kind == "wheel":
            known = self._release_metadata.get((file.name, file.version))
            if known is not None:
                return known
        result = self._metadata.get((file.url, file.sha256), lambda: self._load_metadata(file))
        if file.kind == "wheel":
            self._release_metadata.setdefault((file.name, file.version), result)
        return result

    def prefetch(self, names: Iterable[NormalizedName]) -> None:
        """Fetch these project pages in the background (errors surface in ``files``)."""
        for name in names:
            key = canonicalize_name(name)
            if not self._files.started(key):
                self._submit(self.files, key)

    def prefetch_metadata(self, files: Iterable[IndexFile]) -> None:
        """Fetch metadata for these files in the background (errors surface in ``metadata``)."""
        for file in files:
            if not self._metadata.started((file.url, file.sha256)):
                self._submit(self.metadata, file)

    def _submit(self, call: Callable[[_T], object], arg: _T) -> None:
        try:
            self._pool.submit(_quietly, call, arg)
        except RuntimeError:  # closed: prefetching is only a hint
            pass

    # -- project pages -----------------------------------------------------------------

    def _load_files(self, name: NormalizedName) -> tuple[IndexFile, ...]:
        for index_url in self.index_urls:
            page_url = f"{index_url}{name}/"
            page, remember = self._fetch_page(page_url, name)
            if page is None:
                continue
            files = self._parse_page(page, index_url=index_url, project=name)
            # Only a page that parsed is kept: a broken one must not outlive its request.
            if remember and page.storable:
                self._pages.store(page_url, page)
            elif remember:
                self._pages.discard(page_url)  # the server no longer lets us keep it
            return files
        return ()

    def _fetch_page(self, url: str, project: NormalizedName) -> tuple[CachedPage | None, bool]:
        """The page at ``url`` (None for 404/410), and whether the cache should be updated."""
        subject = f"project {project}"
        cached = self._pages.load(url)
        if cached is not None and cached.is_fresh(time.time()):
            return cached, False
        headers = {"Accept": ACCEPT}
        if cached is not None and cached.etag:
            headers["If-None-Match"] = cached.etag
        if cached is not None and cached.last_modified:
            headers["If-Modified-Since"] = cached.last_modified
        response = self._request(url, subject, lambda: _get(self._http, url, headers, subject))
        status = response.status_code
        if status == 304 and cached is not None:
            return cached.revalidated(response), True
        if status in (404, 410):
            return None, False
        if status != 200:
            answered = f"{status} {response.reason_phrase}".rstrip()
            raise PackageIndexError(
                f"{subject}: GET {_redact(url)} answered {answered}",
                hint=AUTH_HINT if status in (401, 403) else "check the index URL",
            )
        return CachedPage.from_response(response), True

    def _parse_json_cached(
        self, page: CachedPage, where: str, index_url: str, project: NormalizedName
    ) -> tuple[tuple[IndexFile, ...], tuple[int, int] | None]:
        """Parse a JSON page; big ones are kept parsed on disk, keyed by their exact bytes.

        A project with tens of thousands of files (pydantic-core) costs more to parse than
        to download, and an index that sends no cache headers makes every run download it
        again: the same bytes then need no parsing. marshal holds only plain values.
        """
        path = None
        if self._layout is not None and len(page.body) > _PARSED_CACHE_ABOVE:
            path = parsed_path(self._layout.pages_parsed, page, index_url, project)
            kept = read_parsed(path, index_url)
            if kept is not None:
                return kept
        files, version = parse_json_page(page.body, where, page.url, index_url, project)
        if path is not None:
            self._pages.write(path, encode_parsed(files, version))
        return files, version

    def _parse_page(
        self, page: CachedPage, *, index_url: str, project: NormalizedName
    ) -> tuple[IndexFile, ...]:
        media = page.content_type.split(";")[0].strip().lower()
        where = f"project {project}: page {_redact(page.url)}"
        if media in JSON_TYPES:
            files, version = self._parse_json_cached(page, where, index_url, project)
        elif media in HTML_TYPES:
            text = page.body.decode(charset(page.content_type), errors="replace")
            files, version = parse_html_page(text, where, page.url, index_url, project)
        else:
            raise PackageIndexError(
                f"{where}: unexpected Content-Type {page.content_type or '(none)'!r}",
                hint="the URL must point at a PEP 503/691 Simple API (…/simple/)",
            )
        if version is not None and version[1] > API_MINOR:
            with self._warn_lock:
                first = index_url not in self._warned
                self._warned.add(index_url)
            if first:
                self._report.warn(
                    f"index {_redact(index_url)} speaks Simple API {version[0]}.{version[1]}, "
                    f"newer than imgbuild knows ({API_MAJOR}.{API_MINOR}); reading it anyway"
                )
        return files

    # -- metadata ----------------------------------------------------------------------

    def _load_metadata(self, file: IndexFile) -> DistMetadata:
        data = self._cached_metadata(file)
        if data is None:
            if file.core_metadata is not False:
                data = self._fetch_core_metadata(file)
            elif (
                file.kind == "wheel"
                and _serves_unadvertised_metadata(file.url)
                and (file.size is None or file.size > _PROBE_ABOVE)
            ):
                data = self._fetch_core_metadata(file, advertised=False)
            if data is None and file.kind == "sdist":
                data = self._metadata_from_sdist(file)
            elif data is None:
                data = self._metadata_from_wheel(file)
            result = parse_metadata(data, file)
            self._store_metadata(file, data)
            return result
        return parse_metadata(data, file)

    def _metadata_path(self, file: IndexFile) -> Path | None:
        if self._metadata_dir is None:
            return None
        # The file's own hash is part of the key: a local index may reuse a URL for new bytes.
        key = hashlib.sha256(f"{file.url}\n{file.sha256 or ''}".encode()).hexdigest()
        return self._metadata_dir / key[:2] / f"{key}.metadata"

    def _cached_metadata(self, file: IndexFile) -> bytes | None:
        path = self._metadata_path(file)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:
            return None
        expected = file.core_metadata
        if isinstance(expected, str) and digest_hex(digest_bytes(data)) != expected:
            return None  # damaged or stale entry: fetch again
        return data

    def _store_metadata(self, file: IndexFile, data: bytes) -> None:
        path = self._metadata_path(file)
        if path is not None:
            self._pages.write(path, data)

    def _fetch_core_metadata(self, file: IndexFile, *, advertised: bool = True) -> bytes | None:
        """The PEP 658 file's bytes, hash-checked; None if the index does not have it."""
        url = file.url + ".metadata"
        subject = f"{file.kind} {file.filename}"
        response = self._request(url, subject, lambda: _get(self._http, url, {}, subject))
        if response.status_code in (404, 410) and not advertised:
            return None
        if response.status_code in (404, 410):
            self._report.warn(
                f"{subject}: the index advertises a metadata file but {_redact(url)} "
                f"answered {response.status_code}; reading the wheel instead"
            )
            return None
        if response.status_code != 200:
            raise PackageIndexError(
                f"{subject}: GET {_redact(url)} answered "
                f"{response.status_code} {response.reason_phrase}".rstrip(),
                hint=_NETWORK_HINT,
            )
        data = response.content
        if isinstance(file.core_metadata, str):
            actual = digest_hex(digest_bytes(data))
            if actual != file.core_metadata:
                raise PackageIndexError(
                    f"{subject}: metadata file {_redact(url)} has sha256 {actual}, "
                    f"the index page says {file.core_metadata}",
                    hint="the index is inconsistent; retry later or report it to the index",
                )
        return data

    def _metadata_from_sdist(self, file: IndexFile) -> bytes:
        """Ask the sdist's PEP 517 backend (the injected reader); cached by the sdist's hash."""
        sdist_metadata = self._sdist_metadata
        if sdist_metadata is None:
            raise PackageIndexError(
                f"sdist {file.filename}: the index has no metadata file for it, and this "
                "index was given no build backend to ask",
                hint="pass sdist_metadata= (imagebuild.build.sdist.sdist_metadata)",
            )
        self._report.step(f"preparing the metadata of {file.filename} with its build backend")
        # The backend's own requirements come from this index list too, as in uv.
        if self._cache_dir is not None:
            return sdist_metadata(self._http, file, self._cache_dir, indexes=self.index_urls)
        with tempfile.TemporaryDirectory(prefix="imgbuild-sdist-cache-") as tmp:
            return sdist_metadata(self._http, file, Path(tmp), indexes=self.index_urls)

    def _metadata_from_wheel(self, file: IndexFile) -> bytes:
        subject = f"wheel {file.filename}"
        self._report.step(f"downloading {file.filename} to read its metadata")
        with tempfile.TemporaryDirectory(prefix="imgbuild-metadata-") as tmp:
            dest = Path(tmp) / "dist.whl"
            digest = self._request(
                file.url, subject, lambda: _download(self._http, file.url, dest, subject, file.size)
            )
            if digest is None:
                raise PackageIndexError(
                    f"{subject}: GET {_redact(file.url)} answered 404",
                    hint="the index lists a file it does not serve; retry later",
                )
            if file.sha256 is not None and digest != file.sha256:
                raise PackageIndexError(
                    f"{subject}: sha256 mismatch (index: {file.sha256}, downloaded: {digest})",
                    hint="the download was damaged or the index is inconsistent; retry later",
                )
            return wheel_metadata(dest, file)

    # -- HTTP --------------------------------------------------------------------------

    def _request(self, url: str, subject: str, call: Callable[[], _T]) -> _T:
        """Run ``call`` (one request; the client's transport retries) and translate failures."""
        try:
            return call()
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise PackageIndexError(
                f"{subject}: cannot request {_redact(url)}: {redact_text(_one_line(exc))}",
                hint="index URLs must be http:// or https://",
            ) from exc
        except httpx.HTTPError as exc:
            raise PackageIndexError(
                f"{subject}: GET {_redact(url)} {_failed(exc)}", hint=_NETWORK_HINT
            ) from exc


def _failed(outcome: httpx.Response | BaseException) -> str:
    """``failed 3 times, last: <what>`` (or ``failed: <what>`` after one attempt)."""
    if isinstance(outcome, httpx.Response):
        what = f"HTTP {outcome.status_code} {outcome.reason_phrase}".rstrip()
    else:
        text = failure_text(outcome)
        what = f"{type(outcome).__name__}: {text}" if text else type(outcome).__name__
    count = attempts(outcome)
    return f"failed {count} times, last: {what}" if count > 1 else f"failed: {what}"


def _server_error(response: httpx.Response, subject: str, url: str) -> PackageIndexError:
    return PackageIndexError(
        f"{subject}: GET {_redact(url)} {_failed(response)}", hint=_NETWORK_HINT
    )


def _get(http: httpx.Client, url: str, headers: Mapping[str, str], subject: str) -> httpx.Response:
    def read(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 500:
            raise _server_error(response, subject, url)
        response.read()
        return response

    return fetch_retrying(http, url, read, headers=headers)


def _download(
    http: httpx.Client, url: str, dest: Path, subject: str, size: int | None = None
) -> str | None:
    """Stream ``url`` into ``dest``; its sha256 hex, or None for a 404/410."""

    def write(response: httpx.Response) -> str | None:
        if response.status_code >= 500:
            raise _server_error(response, subject, url)
        if response.status_code in (404, 410):
            return None
        if response.status_code != 200:
            # Raise through httpx's own error type for one translation point.
            response.raise_for_status()
        return write_stream(response, dest)

    return fetch_retrying(http, url, write, size=size)


def _quietly(call: Callable[[_T], object], arg: _T) -> None:
    try:
        call(arg)
    except Exception:  # noqa: BLE001, S110 - a prefetch is a hint; the real call raises it
        pass


class _Once(Generic[_K, _V]):
    """Per-key single flight: the first caller computes, concurrent callers wait for it.

    Results are kept; failures are handed to everyone waiting, then forgotten.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[_K, Future[_V]] = {}

    def started(self, key: _K) -> bool:
        with self._lock:
            return key in self._futures

    def get(self, key: _K, compute: Callable[[], _V]) -> _V:
        with self._lock:
            future = self._futures.get(key)
            owner = future is None
            if future is None:
                future = self._futures[key] = Future()
        if not owner:
            return future.result()
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                del self._futures[key]
            future.set_exception(exc)
            raise
        future.set_result(value)
        return value


# PyPI's file host serves a PEP 658 metadata file for (nearly) every wheel, but a proxy in
# front of the index may strip the page's `core-metadata` keys, as the one on our CI does.
# For that host only, ask for the metadata file anyway and fall back to the wheel on a 404:
# an unverified but tiny request instead of downloading tens of megabytes. Name and version
# are still checked against the file name when the metadata is parsed.
# Small wheels are fetched whole at once: one quick request beats a probe that a mirror
# without metadata files answers with a slow 404.
_METADATA_HOSTS = ("files.pythonhosted.org",)
_PROBE_ABOVE = 10_000_000


def _serves_unadvertised_metadata(url: str) -> bool:
    return httpx.URL(url).host in _METADATA_HOSTS
