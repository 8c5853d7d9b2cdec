"""The on-disk cache of Simple API pages, and of big JSON pages kept parsed.

Pages are kept with their validators (ETag, Last-Modified, Cache-Control max-age); big
JSON pages are also kept parsed, keyed by their exact bytes.

Best effort both ways: an unreadable entry counts as missing, and a write that fails is a
warning, once.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from imagebuild.cache import write_atomic
from imagebuild.digest import digest_bytes, digest_hex
from imagebuild.index.model import IndexFile
from imagebuild.index.pages import ACCEPT, parse_requires_python
from imagebuild.net.transfer import redact as _redact
from imagebuild.report import Reporter

_CACHE_MAGIC = b"imgbuild-http-cache 1\n"


@dataclass(frozen=True, kw_only=True, slots=True)
class CachedPage:
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
    def from_response(cls, response: httpx.Response) -> CachedPage:
        """The page a 200 answer carries, with its validators and freshness."""
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

    def revalidated(self, response: httpx.Response) -> CachedPage:
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
        """Whether the page may be used at ``now`` without asking the server."""
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


class HttpCache:
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

    def load(self, url: str) -> CachedPage | None:
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

    def store(self, url: str, page: CachedPage) -> None:
        """Keep ``page`` as the entry for ``url`` (credentials redacted)."""
        path = self._path(url)
        if path is not None:
            self.write(path, _encode_entry(page))

    def discard(self, url: str) -> None:
        """Forget the entry for ``url``, if any."""
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


def _encode_entry(page: CachedPage) -> bytes:
    header = {
        # Credentials in an index URL are not written to disk.
        "url": _redact(page.url),
        "content_type": page.content_type,
        "etag": page.etag,
        "last_modified": page.last_modified,
        "max_age": page.max_age,
        "fetched": page.fetched,
        "size": len(page.body),
        "sha256": digest_hex(digest_bytes(page.body)),
    }
    line = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _CACHE_MAGIC + line + b"\n" + page.body


def _decode_entry(raw: bytes, request_url: str) -> CachedPage:
    if not raw.startswith(_CACHE_MAGIC):
        raise ValueError("not a cache entry")
    line, sep, body = raw[len(_CACHE_MAGIC) :].partition(b"\n")
    header = json.loads(line)
    if not sep or not isinstance(header, dict):
        raise ValueError("no header")
    if header["size"] != len(body) or header["sha256"] != digest_hex(digest_bytes(body)):
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
    return CachedPage(
        # The stored URL lost its credentials; when it is the request URL, use that.
        url=request_url if url == _redact(request_url) else url,
        content_type=content_type,
        body=body,
        etag=etag,
        last_modified=last_modified,
        max_age=max_age,
        fetched=float(fetched),
    )


# -- big pages, kept parsed ------------------------------------------------------------------

ParsedPage = tuple[tuple[IndexFile, ...], tuple[int, int] | None]
"""A parsed JSON page: its files and its Simple API version."""


def parsed_path(bucket: Path, page: CachedPage, index_url: str, project: str) -> Path:
    """Where ``page`` is kept parsed: keyed by its exact bytes, its URLs and this Python.

    A project with tens of thousands of files (pydantic-core) costs more to parse than to
    download, and an index that sends no cache headers makes every run download it again:
    the same bytes then need no parsing.
    """
    key = hashlib.blake2b(digest_size=20)
    for part in (sys.version, page.url, index_url, project):
        key.update(part.encode() + b"\0")
    key.update(page.body)
    return bucket / f"{key.hexdigest()}.marshal"


def read_parsed(path: Path, index_url: str) -> ParsedPage | None:
    """The files kept at ``path``; None when absent or unreadable (then parse again)."""
    try:
        version, rows = marshal.loads(path.read_bytes())
        files = tuple(
            IndexFile(
                filename=f,
                url=u,
                sha256=h,
                size=n,
                upload_time=t,
                requires_python=parse_requires_python(rp) if rp else None,
                yanked=y,
                core_metadata=c,
                index_url=index_url,
            )
            for f, u, h, n, t, rp, y, c in rows
        )
    except (OSError, EOFError, ValueError, TypeError):
        return None
    return files, (tuple(version) if version else None)


def encode_parsed(files: tuple[IndexFile, ...], version: tuple[int, int] | None) -> bytes:
    """``files`` as marshal bytes (marshal holds only plain values: no code runs on load)."""
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
    return marshal.dumps((version, rows))
