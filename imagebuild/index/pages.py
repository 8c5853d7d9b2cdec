"""Simple API project pages (PEP 503 HTML, PEP 691 JSON) -> ``IndexFile`` values.

Pure parsing: the bytes come from ``simple.SimpleIndex``, which also decides which of the
two forms a page is by its Content-Type.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from html.parser import HTMLParser
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import (
    InvalidSdistFilename,
    NormalizedName,
    canonicalize_name,
    parse_sdist_filename,
)
from packaging.version import InvalidVersion

from imagebuild.digest import digest_hex, parse_digest
from imagebuild.errors import PackageIndexError
from imagebuild.index.model import IndexFile
from imagebuild.net.transfer import NETWORK_HINT as _NETWORK_HINT
from imagebuild.net.transfer import one_line as _one_line

ACCEPT = (
    "application/vnd.pypi.simple.v1+json, "
    "application/vnd.pypi.simple.v1+html;q=0.2, "
    "text/html;q=0.01"
)
"""The PEP 691 ``Accept`` header: JSON preferred, HTML understood."""

JSON_TYPES = frozenset(
    {"application/vnd.pypi.simple.v1+json", "application/vnd.pypi.simple.latest+json"}
)
HTML_TYPES = frozenset({"application/vnd.pypi.simple.v1+html", "text/html"})
# The newest Simple API minor version whose fields we know (1.4: PEP 792 project status).
# A newer minor is still read (PEP 629 promises compatibility) but is worth a warning.
API_MAJOR = 1
API_MINOR = 4


def sha256_hex(text: str | None) -> str | None:
    """A page's sha256 value as lowercase hex, or None when it is not one."""
    if text is None:
        return None
    try:
        return digest_hex(parse_digest(text, bare_hex=True))
    except ValueError:
        return None


def parse_json_page(
    body: bytes, where: str, page_url: str, index_url: str, project: NormalizedName
) -> tuple[tuple[IndexFile, ...], tuple[int, int] | None]:
    """A PEP 691 JSON page's usable files and API version; ``where`` names it in errors."""
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
    """The common entry, built with fewer checks; None sends it down the general path.

    The common entry is a wheel of this project with an absolute URL and well-formed fields.

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
        requires_python=parse_requires_python(requires_python.strip()) if requires_python else None,
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
        return (sha256_hex(digest) if isinstance(digest, str) else None) or True
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


def parse_html_page(
    text: str, where: str, page_url: str, index_url: str, project: NormalizedName
) -> tuple[tuple[IndexFile, ...], tuple[int, int] | None]:
    """A PEP 503 HTML page's usable files and API version; ``where`` names it in errors."""
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
            found = sha256_hex(digest) if sep and algorithm.lower() == "sha256" else None
            return found or True  # "true", or a hash we cannot check
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
    if major > API_MAJOR:
        raise PackageIndexError(
            f"{where}: Simple API version {major}.{minor} is newer than imgbuild reads "
            f"({API_MAJOR}.x)",
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
    specifier = parse_requires_python(requires_python.strip()) if requires_python else None
    return IndexFile(
        filename=filename,
        url=url,
        sha256=sha256_hex(sha256) if sha256 else None,
        size=size,
        upload_time=upload_time,
        requires_python=specifier,
        yanked=yanked,
        core_metadata=core_metadata,
        index_url=index_url,
    )


@functools.lru_cache(maxsize=1024)
def parse_requires_python(text: str) -> SpecifierSet | None:
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


def charset(content_type: str) -> str:
    """The charset a Content-Type names, if Python knows it; else UTF-8."""
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
