"""Package indexes: the ``PackageIndex`` protocol the resolver reads, and its values.

The production class, ``SimpleIndex``, speaks the PEP 691 JSON Simple API (HTML as a
fallback) and reads dependencies from PEP 658/714 metadata files, so resolving never
downloads a wheel when the index serves metadata. Pages are cached on disk and
revalidated with ETag / Cache-Control.
"""

from __future__ import annotations

import functools
import hashlib
import json
import marshal
import re
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import Generic, Literal, Protocol, Self, TypeVar
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import httpx
from packaging.metadata import parse_email
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import (
    InvalidSdistFilename,
    NormalizedName,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from imagebuild.cache import write_atomic
from imagebuild.errors import PackageIndexError
from imagebuild.net.credentials import AUTH_HINT
from imagebuild.net.http import attempts
from imagebuild.net.transfer import NETWORK_HINT as _NETWORK_HINT
from imagebuild.net.transfer import one_line as _one_line
from imagebuild.net.transfer import redact as _redact
from imagebuild.net.transfer import write_stream
from imagebuild.report import NullReporter, Reporter

FileKind = Literal["wheel", "sdist"]


@dataclass(frozen=True, kw_only=True, slots=True)
class IndexFile:
    """One distribution file listed on a project page."""

    filename: str
    """The file name (wheel or sdist)."""
    url: str
    """Absolute download URL (relative URLs on the page are resolved against it)."""
    sha256: str | None
    """Lowercase hex sha256 from the page's ``hashes``, if given."""
    size: int | None = None
    """Size in bytes, if the page gives it (mandatory from API v1.1)."""
    upload_time: str | None = None
    """``yyyy-mm-ddThh:mm:ss[.ffffff]Z`` as served, if given."""
    requires_python: SpecifierSet | None = None
    """The file's ``requires-python``; the resolver skips files the target does not meet."""
    yanked: str | None = None
    """``None`` if not yanked, else the reason (empty string when none was given)."""
    core_metadata: str | bool = False
    """PEP 658/714: False (none), True (served, no hash) or the metadata file's sha256 hex."""
    index_url: str = ""
    """The Simple API base URL this file was listed on (pylock ``index``)."""

    @property
    def kind(self) -> FileKind:
        """``wheel`` or ``sdist`` by file name."""
        return "wheel" if self.filename.endswith(".whl") else "sdist"

    @property
    def name(self) -> NormalizedName:
        """Canonical project name from the file name."""
        if self.kind == "wheel":
            return parse_wheel_filename(self.filename)[0]
        return parse_sdist_filename(self.filename)[0]

    @property
    def version(self) -> Version:
        """Version from the file name."""
        if self.kind == "wheel":
            return parse_wheel_filename(self.filename)[1]
        return parse_sdist_filename(self.filename)[1]


@dataclass(frozen=True, kw_only=True, slots=True)
class DistMetadata:
    """The parts of a distribution's core metadata that resolution needs."""

    name: NormalizedName
    """Canonical name."""
    version: Version
    """Version."""
    requires_dist: tuple[Requirement, ...] = ()
    """``Requires-Dist`` entries, in file order (markers may use ``extra``)."""
    requires_python: SpecifierSet | None = None
    """``Requires-Python``."""
    provides_extra: tuple[NormalizedName, ...] = ()
    """``Provides-Extra``, canonicalised."""


class PackageIndex(Protocol):
    """What the resolver asks of an index (one or several, merged)."""

    def files(self, name: NormalizedName) -> tuple[IndexFile, ...]:
        """Every file of project ``name`` (all versions); empty if the project is unknown.

        Files whose name does not parse are left out. Order: as listed by the index.
        Raises ``PackageIndexError`` when the index fails (not for a 404, which is empty).
        """

    def metadata(self, file: IndexFile) -> DistMetadata:
        """Core metadata of ``file`` (PEP 658 file when served, else from the wheel itself).

        Raises ``PackageIndexError`` when it cannot be had (for example an sdist whose
        build backend fails).
        """

    def prefetch(self, names: Iterable[NormalizedName]) -> None:
        """Start fetching these project pages in the background (a hint; may do nothing)."""

    def prefetch_metadata(self, files: Iterable[IndexFile]) -> None:
        """Start fetching metadata for these files in the background (a hint)."""


# -- SimpleIndex ---------------------------------------------------------------------------

ACCEPT = (
    "application/vnd.pypi.simple.v1+json, "
    "application/vnd.pypi.simple.v1+html;q=0.2, "
    "text/html;q=0.01"
)
"""The PEP 691 ``Accept`` header: JSON preferred, HTML understood."""

_JSON_TYPES = frozenset(
    {"application/vnd.pypi.simple.v1+json", "application/vnd.pypi.simple.latest+json"}
)
_HTML_TYPES = frozenset({"application/vnd.pypi.simple.v1+html", "text/html"})
# The newest Simple API minor version whose fields we know (1.4: PEP 792 project status).
# A newer minor is still read (PEP 629 promises compatibility) but is worth a warning.
_API_MAJOR = 1
_API_MINOR = 4
_PARSED_CACHE_ABOVE = 256 * 1024  # bytes of page below which parsing is cheaper
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_CACHE_MAGIC = b"imgbuild-http-cache 1\n"

_K = TypeVar("_K")
_V = TypeVar("_V")
_T = TypeVar("_T")


class SdistMetadataReader(Protocol):
    """Core metadata of an sdist from its PEP 517 backend (``build.sdist.sdist_metadata``)."""

    def __call__(
        self, http: httpx.Client, file: IndexFile, cache_dir: Path, *, indexes: Sequence[str]
    ) -> bytes:
        """The ``METADATA`` bytes of ``file``; build requirements come from ``indexes``."""
        ...


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

    Every failure is a ``PackageIndexError`` naming the project or file, the URL and what
    went wrong; the client's transport retries transport errors, 429 and 5xx first
    (``imagebuild.net.http``).
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
        self._pages = _HttpCache(cache_dir / "http" if cache_dir else None, self._report)
        self._metadata_dir = cache_dir / "metadata" if cache_dir else None
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

    def _fetch_page(self, url: str, project: NormalizedName) -> tuple[_CachedPage | None, bool]:
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
            raise PackageIndexError(
                f"{subject}: GET {_redact(url)} answered {status} {response.reason_phrase}".rstrip(),
                hint=AUTH_HINT if status in (401, 403) else "check the index URL",
            )
        return _CachedPage.from_response(response), True

    def _parse_json_cached(
        self, page: _CachedPage, where: str, index_url: str, project: NormalizedName
    ) -> tuple[tuple[IndexFile, ...], tuple[int, int] | None]:
        """Parse a JSON page; big ones are kept parsed on disk, keyed by their exact bytes.

        A project with tens of thousands of files (pydantic-core) costs more to parse than
        to download, and an index that sends no cache headers makes every run download it
        again: the same bytes then need no parsing. marshal holds only plain values.
        """
        path = None
        if self._cache_dir is not None and len(page.body) > _PARSED_CACHE_ABOVE:
            key = hashlib.blake2b(digest_size=20)
            for part in (sys.version, page.url, index_url, project):
                key.update(part.encode() + b"\0")
            key.update(page.body)
            path = self._cache_dir / "pages-parsed" / f"{key.hexdigest()}.marshal"
            try:
                version, rows = marshal.loads(path.read_bytes())
                files = tuple(
                    IndexFile(
                        filename=f,
                        url=u,
                        sha256=h,
                        size=n,
                        upload_time=t,
                        requires_python=_requires_python(rp) if rp else None,
                        yanked=y,
                        core_metadata=c,
                        index_url=index_url,
                    )
                    for f, u, h, n, t, rp, y, c in rows
                )
                return files, (tuple(version) if version else None)
            except (OSError, EOFError, ValueError, TypeError):
                pass  # not there yet, or unreadable: parse
        files, version = _parse_json_page(page.body, where, page.url, index_url, project)
        if path is not None:
            rows = [
                (
                    f.filename,
                    f.url,
                    f.sha256,
                    f.size,
                    f.upload_time,
                    str(f.requires_python) if f.requires_python is not None else None,
                    f.yanked,
                    f.core_metadata,
                )
                for f in files
            ]
            self._pages.write(path, marshal.dumps((version, rows)))
        return files, version

    def _parse_page(
        self, page: _CachedPage, *, index_url: str, project: NormalizedName
    ) -> tuple[IndexFile, ...]:
        media = page.content_type.split(";")[0].strip().lower()
        where = f"project {project}: page {_redact(page.url)}"
        if media in _JSON_TYPES:
            files, version = self._parse_json_cached(page, where, index_url, project)
        elif media in _HTML_TYPES:
            text = page.body.decode(_charset(page.content_type), errors="replace")
            files, version = _parse_html_page(text, where, page.url, index_url, project)
        else:
            raise PackageIndexError(
                f"{where}: unexpected Content-Type {page.content_type or '(none)'!r}",
                hint="the URL must point at a PEP 503/691 Simple API (…/simple/)",
            )
        if version is not None and version[1] > _API_MINOR:
            with self._warn_lock:
                first = index_url not in self._warned
                self._warned.add(index_url)
            if first:
                self._report.warn(
                    f"index {_redact(index_url)} speaks Simple API {version[0]}.{version[1]}, "
                    f"newer than imgbuild knows ({_API_MAJOR}.{_API_MINOR}); reading it anyway"
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
            result = _parse_metadata(data, file)
            self._store_metadata(file, data)
            return result
        return _parse_metadata(data, file)

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
        if isinstance(expected, str) and hashlib.sha256(data).hexdigest() != expected:
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
            actual = hashlib.sha256(data).hexdigest()
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
                file.url, subject, lambda: _download(self._http, file.url, dest, subject)
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
            return _wheel_metadata(dest, file)

    # -- HTTP --------------------------------------------------------------------------

    def _request(self, url: str, subject: str, call: Callable[[], _T]) -> _T:
        """Run ``call`` (one request; the client's transport retries) and translate failures."""
        try:
            return call()
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise PackageIndexError(
                f"{subject}: cannot request {_redact(url)}: {_one_line(exc)}",
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
        text = _one_line(outcome)
        what = f"{type(outcome).__name__}: {text}" if text else type(outcome).__name__
    count = attempts(outcome)
    return f"failed {count} times, last: {what}" if count > 1 else f"failed: {what}"


def _server_error(response: httpx.Response, subject: str, url: str) -> PackageIndexError:
    return PackageIndexError(
        f"{subject}: GET {_redact(url)} {_failed(response)}", hint=_NETWORK_HINT
    )


def _get(http: httpx.Client, url: str, headers: Mapping[str, str], subject: str) -> httpx.Response:
    response = http.get(url, headers=headers, follow_redirects=True)
    if response.status_code >= 500:
        raise _server_error(response, subject, url)
    return response


def _download(http: httpx.Client, url: str, dest: Path, subject: str) -> str | None:
    """Stream ``url`` into ``dest``; its sha256 hex, or None for a 404/410."""
    with http.stream("GET", url, follow_redirects=True) as response:
        if response.status_code >= 500:
            raise _server_error(response, subject, url)
        if response.status_code in (404, 410):
            return None
        if response.status_code != 200:
            # Raise through httpx's own error type for one translation point.
            response.raise_for_status()
        return write_stream(response, dest)


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


# -- the on-disk HTTP cache ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class _CachedPage:
    """A project page as served, with what is needed to reuse or revalidate it."""

    url: str
    """The URL the body came from (after redirects): relative links resolve against it."""
    content_type: str
    body: bytes
    etag: str | None = None
    last_modified: str | None = None
    max_age: int | None = None
    """Seconds the page stays fresh after ``fetched``; None: revalidate every time."""
    no_store: bool = False
    fetched: float = 0.0
    """When the page was current, as a Unix time (``Age`` already subtracted)."""

    @classmethod
    def from_response(cls, response: httpx.Response) -> _CachedPage:
        max_age, no_store = _cache_control(response.headers.get("Cache-Control"))
        return cls(
            url=str(response.url),
            content_type=response.headers.get("Content-Type", ""),
            body=response.content,
            etag=response.headers.get("ETag"),
            last_modified=response.headers.get("Last-Modified"),
            max_age=max_age,
            no_store=no_store,
            fetched=_fetched_at(response),
        )

    def revalidated(self, response: httpx.Response) -> _CachedPage:
        """This page after a 304: new freshness, validators updated when sent again."""
        control = response.headers.get("Cache-Control")
        max_age, no_store = _cache_control(control) if control else (self.max_age, False)
        return replace(
            self,
            etag=response.headers.get("ETag") or self.etag,
            last_modified=response.headers.get("Last-Modified") or self.last_modified,
            max_age=max_age,
            no_store=no_store,
            fetched=_fetched_at(response),
        )

    @property
    def storable(self) -> bool:
        """Worth keeping: allowed, and either reusable as is or revalidatable."""
        has_validator = self.etag is not None or self.last_modified is not None
        return not self.no_store and (bool(self.max_age) or has_validator)

    def is_fresh(self, now: float) -> bool:
        return self.max_age is not None and 0 <= now - self.fetched < self.max_age


def _cache_control(value: str | None) -> tuple[int | None, bool]:
    """``(max-age, no-store)`` from a Cache-Control header; ``no-cache`` means max-age 0."""
    max_age: int | None = None
    no_store = no_cache = False
    for directive in (value or "").split(","):
        key, _, arg = directive.strip().partition("=")
        key = key.strip().lower()
        if key == "no-store":
            no_store = True
        elif key == "no-cache":
            no_cache = True
        elif key == "max-age":
            try:
                max_age = max(0, int(arg.strip().strip('"')))
            except ValueError:
                max_age = 0
    return (0 if no_cache else max_age), no_store


def _fetched_at(response: httpx.Response) -> float:
    # A CDN's copy may already be this old: count its Age against max-age.
    try:
        age = max(0, int(response.headers.get("Age", "0")))
    except ValueError:
        age = 0
    return time.time() - age


class _HttpCache:
    """Project pages on disk, one file per URL + Accept; best effort in both directions."""

    def __init__(self, root: Path | None, reporter: Reporter) -> None:
        self.root = root
        self._report = reporter
        self._warned = False

    def _path(self, url: str) -> Path | None:
        if self.root is None:
            return None
        key = hashlib.sha256(f"{url}\n{ACCEPT}".encode()).hexdigest()
        return self.root / key[:2] / key

    def load(self, url: str) -> _CachedPage | None:
        """The stored page for ``url``, or None when absent or unreadable in any way."""
        path = self._path(url)
        if path is None:
            return None
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        try:
            return _decode_entry(raw, url)
        except (ValueError, KeyError, TypeError):
            return None

    def store(self, url: str, page: _CachedPage) -> None:
        path = self._path(url)
        if path is not None:
            self.write(path, _encode_entry(page))

    def discard(self, url: str) -> None:
        path = self._path(url)
        if path is not None:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # a leftover entry is revalidated before use anyway

    def write(self, path: Path, data: bytes) -> None:
        """Write atomically; a failure is a warning (once), never an error."""
        try:
            write_atomic(path, data)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                self._report.warn(f"cannot write the index cache at {path.parent}: {exc}")


def _encode_entry(page: _CachedPage) -> bytes:
    header = {
        # Credentials in an index URL are not written to disk.
        "url": _redact(page.url),
        "content_type": page.content_type,
        "etag": page.etag,
        "last_modified": page.last_modified,
        "max_age": page.max_age,
        "fetched": page.fetched,
        "size": len(page.body),
        "sha256": hashlib.sha256(page.body).hexdigest(),
    }
    line = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _CACHE_MAGIC + line + b"\n" + page.body


def _decode_entry(raw: bytes, request_url: str) -> _CachedPage:
    if not raw.startswith(_CACHE_MAGIC):
        raise ValueError("not a cache entry")
    line, sep, body = raw[len(_CACHE_MAGIC) :].partition(b"\n")
    header = json.loads(line)
    if not sep or not isinstance(header, dict):
        raise ValueError("no header")
    if header["size"] != len(body) or header["sha256"] != hashlib.sha256(body).hexdigest():
        raise ValueError("body damaged")
    url = header["url"]
    etag, last_modified, max_age = header["etag"], header["last_modified"], header["max_age"]
    fetched, content_type = header["fetched"], header["content_type"]
    if not (
        isinstance(url, str)
        and isinstance(content_type, str)
        and isinstance(etag, str | None)
        and isinstance(last_modified, str | None)
        and (max_age is None or (isinstance(max_age, int) and not isinstance(max_age, bool)))
        and isinstance(fetched, int | float)
    ):
        raise TypeError("bad header field")
    return _CachedPage(
        # The stored URL lost its credentials; when it is the request URL, use that.
        url=request_url if url == _redact(request_url) else url,
        content_type=content_type,
        body=body,
        etag=etag,
        last_modified=last_modified,
        max_age=max_age,
        fetched=float(fetched),
    )


# -- parsing pages -----------------------------------------------------------------------------


def _parse_json_page(
    body: bytes, where: str, page_url: str, index_url: str, project: NormalizedName
) -> tuple[tuple[IndexFile, ...], tuple[int, int] | None]:
    try:
        page = json.loads(body)
    except ValueError as exc:
        raise PackageIndexError(
            f"{where}: not valid JSON ({_one_line(exc)})",
            hint="the index or a proxy answered garbage; retry later",
        ) from exc
    if not isinstance(page, dict):
        raise PackageIndexError(f"{where}: JSON page is not an object", hint=_NETWORK_HINT)
    meta = page.get("meta")
    version = _api_version(meta.get("api-version") if isinstance(meta, dict) else None, where)
    items = page.get("files")
    if not isinstance(items, list):
        raise PackageIndexError(f"{where}: JSON page has no 'files' list", hint=_NETWORK_HINT)
    files: list[IndexFile] = []
    wheel_prefix = project.replace("-", "_") + "-"
    for item in items:
        if not isinstance(item, dict):
            continue
        fast = _fast_json_wheel(item, wheel_prefix, index_url)
        if fast is not None:
            files.append(fast)
            continue
        filename, url = item.get("filename"), item.get("url")
        if not isinstance(filename, str) or not isinstance(url, str):
            continue
        hashes = item.get("hashes")
        sha256 = hashes.get("sha256") if isinstance(hashes, dict) else None
        if url.startswith(("https://", "http://")) and "#" not in url:
            fragment_hash = None  # absolute, no fragment: the common case, kept cheap
        else:
            url, fragment_hash = _split_url(urljoin(page_url, url))
        size, upload_time = item.get("size"), item.get("upload-time")
        requires_python = item.get("requires-python")
        file = _index_file(
            project=project,
            filename=filename,
            url=url,
            sha256=sha256 if isinstance(sha256, str) else fragment_hash,
            size=size if isinstance(size, int) and not isinstance(size, bool) else None,
            upload_time=upload_time if isinstance(upload_time, str) else None,
            requires_python=requires_python if isinstance(requires_python, str) else None,
            yanked=_json_yanked(item.get("yanked", False)),
            core_metadata=_json_core_metadata(item),
            index_url=index_url,
        )
        if file is not None:
            files.append(file)
    return tuple(files), version


def _fast_json_wheel(
    item: dict[str, object], wheel_prefix: str, index_url: str
) -> IndexFile | None:
    """The common entry (a wheel of this project, absolute URL, well-formed fields), built
    with fewer checks; None sends the entry down the general path.

    Pages of big projects list tens of thousands of wheels, and this loop was most of the
    time it took to read one.
    """
    filename = item.get("filename")
    url = item.get("url")
    if (
        not isinstance(filename, str)
        or not isinstance(url, str)
        or not filename.endswith(".whl")
        or not filename.lower().startswith(wheel_prefix)
        or filename.count("-") not in (4, 5)
        or "/" in filename
        or not url.startswith("https://")
        or "#" in url
    ):
        return None
    hashes = item.get("hashes")
    sha256 = hashes.get("sha256") if isinstance(hashes, dict) else None
    size = item.get("size")
    upload_time = item.get("upload-time")
    requires_python = item.get("requires-python")
    if (
        not isinstance(sha256, str)
        or len(sha256) != 64
        or not isinstance(size, int)
        or isinstance(size, bool)
        or not isinstance(upload_time, str)
        or not (requires_python is None or isinstance(requires_python, str))
    ):
        return None
    return IndexFile(
        filename=filename,
        url=url,
        sha256=sha256.lower(),
        size=size,
        upload_time=upload_time,
        requires_python=_requires_python(requires_python.strip()) if requires_python else None,
        yanked=_json_yanked(item.get("yanked", False)),
        core_metadata=_json_core_metadata(item),
        index_url=index_url,
    )


def _json_yanked(value: object) -> str | None:
    if value is True:
        return ""
    if isinstance(value, str):
        return value
    return None


def _json_core_metadata(item: Mapping[str, object]) -> str | bool:
    # PEP 714: the new key wins when present, even if false.
    key = "core-metadata" if "core-metadata" in item else "dist-info-metadata"
    value = item.get(key, False)
    if isinstance(value, dict):
        digest = value.get("sha256")
        return digest.lower() if isinstance(digest, str) and _SHA256_RE.match(digest) else True
    return value is True


class _LinkParser(HTMLParser):
    """Collects anchors, ``<base href>`` and the PEP 629 repository version of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[dict[str, str | None]] = []
        self.base: str | None = None
        self.repository_version: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # HTMLParser has already unescaped attribute values (&gt;= becomes >=).
        values = dict(attrs)
        if tag == "a":
            self.anchors.append(values)
        elif tag == "base" and self.base is None:
            self.base = values.get("href")
        elif tag == "meta" and values.get("name") == "pypi:repository-version":
            self.repository_version = values.get("content")


def _parse_html_page(
    text: str, where: str, page_url: str, index_url: str, project: NormalizedName
) -> tuple[tuple[IndexFile, ...], tuple[int, int] | None]:
    parser = _LinkParser()
    parser.feed(text)
    parser.close()
    version = _api_version(parser.repository_version, where)
    base = urljoin(page_url, parser.base) if parser.base else page_url
    files: list[IndexFile] = []
    for attrs in parser.anchors:
        href = attrs.get("href")
        if not href:
            continue
        url, sha256 = _split_url(urljoin(base, href))
        filename = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        # A bare data-yanked attribute (value None) is a yank without a reason.
        yanked = (attrs["data-yanked"] or "") if "data-yanked" in attrs else None
        file = _index_file(
            project=project,
            filename=filename,
            url=url,
            sha256=sha256,
            size=None,
            upload_time=None,
            requires_python=attrs.get("data-requires-python"),
            yanked=yanked,
            core_metadata=_html_core_metadata(attrs),
            index_url=index_url,
        )
        if file is not None:
            files.append(file)
    return tuple(files), version


def _html_core_metadata(attrs: Mapping[str, str | None]) -> str | bool:
    for key in ("data-core-metadata", "data-dist-info-metadata"):
        if key in attrs:
            value = (attrs[key] or "").strip()
            if value.lower() == "false":
                return False
            algorithm, sep, digest = value.partition("=")
            if sep and algorithm.lower() == "sha256" and _SHA256_RE.match(digest):
                return digest.lower()
            return True  # "true", or a hash we cannot check
    return False


def _api_version(value: object, where: str) -> tuple[int, int] | None:
    if value is None:
        return None  # PEP 629 made it optional for HTML; 1.0 pages may lack it
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", value) if isinstance(value, str) else None
    if match is None:
        raise PackageIndexError(
            f"{where}: unreadable Simple API version {value!r}",
            hint="the URL must point at a PEP 503/691 Simple API (…/simple/)",
        )
    major, minor = int(match[1]), int(match[2])
    if major > _API_MAJOR:
        raise PackageIndexError(
            f"{where}: Simple API version {major}.{minor} is newer than imgbuild reads "
            f"({_API_MAJOR}.x)",
            hint="upgrade imgbuild or use an index that serves API v1",
        )
    return major, minor


def _index_file(
    *,
    project: NormalizedName,
    filename: str,
    url: str,
    sha256: str | None,
    size: int | None,
    upload_time: str | None,
    requires_python: str | None,
    yanked: str | None,
    core_metadata: str | bool,
    index_url: str,
) -> IndexFile | None:
    """An ``IndexFile``, or None for files a resolver cannot use (eggs, bad names, strays)."""
    if "/" in filename or "\\" in filename:
        return None
    # Big projects list tens of thousands of files: check names cheaply here (a wheel's
    # name and version hold no "-"); packaging parses a file fully when it is considered.
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        if len(parts) not in (5, 6) or (
            parts[0].lower() != project.replace("-", "_") and canonicalize_name(parts[0]) != project
        ):
            return None
    elif filename.endswith((".tar.gz", ".zip")):
        try:
            name = parse_sdist_filename(filename)[0]
        except (InvalidSdistFilename, InvalidVersion):
            return None
        if name != project:
            return None
    else:
        return None
    specifier = _requires_python(requires_python.strip()) if requires_python else None
    return IndexFile(
        filename=filename,
        url=url,
        sha256=sha256.lower() if sha256 and _SHA256_RE.match(sha256) else None,
        size=size,
        upload_time=upload_time,
        requires_python=specifier,
        yanked=yanked,
        core_metadata=core_metadata,
        index_url=index_url,
    )


@functools.lru_cache(maxsize=1024)
def _requires_python(text: str) -> SpecifierSet | None:
    """Parsed once per distinct string (a project repeats a handful across its files)."""
    if not text:
        return None
    try:
        return SpecifierSet(text)
    except InvalidSpecifier:
        return None  # as pip does: an unreadable constraint does not hide the file


def _split_url(url: str) -> tuple[str, str | None]:
    """``url`` without its fragment, and the sha256 the fragment carried (PEP 503)."""
    parts = urlsplit(url)
    algorithm, _, digest = parts.fragment.partition("=")
    sha256 = digest if algorithm.lower() == "sha256" else None
    return urlunsplit(parts._replace(fragment="")), sha256


def _charset(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "charset" and value:
            name = value.strip().strip('"')
            try:
                "".encode(name)
            except LookupError:
                break
            return name
    return "utf-8"


# -- metadata files ----------------------------------------------------------------------------


def _parse_metadata(data: bytes, file: IndexFile) -> DistMetadata:
    """Core metadata bytes -> ``DistMetadata``, checked against the file's name and version."""
    where = f"{file.kind} {file.filename}: metadata"
    hint = "this release's metadata is broken; exclude it or pin another version"
    raw, _unparsed = parse_email(data)
    name, version = raw.get("name"), raw.get("version")
    if not name or not version:
        raise PackageIndexError(f"{where} has no Name or Version", hint=hint)
    try:
        parsed_version = Version(version)
    except InvalidVersion as exc:
        raise PackageIndexError(f"{where}: invalid Version {version!r}", hint=hint) from exc
    if canonicalize_name(name) != file.name or parsed_version != file.version:
        raise PackageIndexError(
            f"{where} says {name} {version}, the file name says {file.name} {file.version}",
            hint=hint,
        )
    requires: list[Requirement] = []
    for line in raw.get("requires_dist", []):
        try:
            requires.append(Requirement(line))
        except InvalidRequirement as exc:
            raise PackageIndexError(
                f"{where}: invalid Requires-Dist {line!r} ({_one_line(exc)})", hint=hint
            ) from exc
    requires_python: SpecifierSet | None = None
    if raw.get("requires_python", "").strip():
        try:
            requires_python = SpecifierSet(raw["requires_python"])
        except InvalidSpecifier:
            requires_python = None  # as pip does: ignore an unreadable Requires-Python
    extras = dict.fromkeys(canonicalize_name(extra) for extra in raw.get("provides_extra", []))
    return DistMetadata(
        name=canonicalize_name(name),
        version=parsed_version,
        requires_dist=tuple(requires),
        requires_python=requires_python,
        provides_extra=tuple(extras),
    )


def _wheel_metadata(path: Path, file: IndexFile) -> bytes:
    """The ``*.dist-info/METADATA`` of the wheel at ``path`` (the one named for the file)."""
    subject = f"wheel {file.filename}"
    try:
        with zipfile.ZipFile(path) as archive:
            candidates = []
            for member in archive.namelist():
                parts = member.split("/")
                if len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] == "METADATA":
                    candidates.append(parts[0])
            wanted = [c for c in candidates if _dist_info_name(c) == file.name]
            chosen = wanted or candidates
            if len(chosen) != 1:
                raise PackageIndexError(
                    f"{subject}: expected one .dist-info/METADATA, found {len(chosen)}",
                    hint="the wheel is malformed; use another version",
                )
            return archive.read(f"{chosen[0]}/METADATA")
    except (zipfile.BadZipFile, OSError, KeyError) as exc:
        raise PackageIndexError(
            f"{subject}: cannot read it as a zip archive ({_one_line(exc)})",
            hint="the download was damaged or the wheel is malformed; retry later",
        ) from exc


def _dist_info_name(directory: str) -> NormalizedName:
    return canonicalize_name(directory.removesuffix(".dist-info").rpartition("-")[0])


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
