"""Direct sources: a requirement met from a git repository, a URL archive or a local archive.

They are spelled two ways, and both come out as one ``DirectSource``:

- in ``[tool.uv.sources]``: ``name = { git = URL, tag|branch|rev = …, subdirectory = … }``,
  ``name = { url = "https://…/x.whl" }``, ``name = { path = "dist/x-1.0.tar.gz" }``;
- as a PEP 508 direct reference: ``name @ git+https://host/repo@v1#subdirectory=sub``,
  ``name @ https://host/x-1.0-py3-none-any.whl#sha256=…``, ``name @ file:///…/x.whl``.

Such a name is never looked up on an index (that would lock another package): ``imgbuild
lock`` fetches it, reads its metadata and records where it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

from imagebuild.errors import ProjectError
from imagebuild.project.spec import ProjectSpec

DirectKind = Literal["git", "url", "path"]
RevisionKind = Literal["rev", "tag", "branch"]
ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".zip")
"""File names a direct archive may have: a wheel or an sdist."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DirectSource:
    """Where one requirement's package comes from, when that is not an index."""

    name: NormalizedName
    """The package name (canonical)."""
    kind: DirectKind
    """``git``: a repository; ``url``: an archive over HTTP(S); ``path``: a local archive."""
    url: str
    """git: the repository URL (as written: git's own configuration supplies credentials);
    url: the archive URL without its fragment; path: the archive's ``file://`` URL."""
    revision: tuple[RevisionKind, str] | None = None
    """git: the requested revision (``tag``/``branch``/``rev``, value); None: the default branch."""
    subdirectory: str | None = None
    """git: where the project sits inside the repository."""
    sha256: str | None = None
    """url/path: the hex digest a ``#sha256=`` fragment asked for."""
    where: str = ""
    """Where it was declared, for messages (``…/pyproject.toml: tool.uv.sources.x``)."""

    @property
    def filename(self) -> str:
        """url/path: the archive's file name."""
        return unquote(urlsplit(self.url).path.rsplit("/", 1)[-1])

    def describe(self) -> str:
        """What a lock's inputs record for it: a PEP 508 form without credentials."""
        if self.kind != "git":
            return f"{self.name} @ {strip_userinfo(self.url)}"
        rev = f"@{self.revision[1]}" if self.revision else ""
        sub = f"#subdirectory={self.subdirectory}" if self.subdirectory else ""
        return f"{self.name} @ git+{strip_userinfo(self.url)}{rev}{sub}"


def strip_userinfo(url: str) -> str:
    """``url`` without user and password: what may be recorded or printed."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def uv_direct_sources(project: ProjectSpec) -> dict[NormalizedName, DirectSource]:
    """The git, URL and archive-path entries of ``project``'s ``[tool.uv.sources]``."""
    sources = project.tool_uv.get("sources", {})
    found: dict[NormalizedName, DirectSource] = {}
    if not isinstance(sources, Mapping):
        return found
    for raw_name, entry in sources.items():
        if not isinstance(entry, Mapping):
            continue
        name = canonicalize_name(str(raw_name))
        where = f"{project.pyproject}: tool.uv.sources.{raw_name}"
        if "git" in entry:
            found[name] = _uv_git(name, entry, where)
        elif "url" in entry:
            url = _string(entry, "url", where)
            found[name] = _archive(name, "url", url, where)
        elif isinstance(entry.get("path"), str) and entry["path"].endswith(ARCHIVE_SUFFIXES):
            path = (project.root / entry["path"]).resolve()
            if not path.is_file():
                raise ProjectError(
                    f"{where}: {entry['path']!r} does not exist",
                    hint="build the archive first, or fix the path",
                )
            found[name] = _archive(name, "path", path.as_uri(), where)
    return found


def _string(entry: Mapping[str, object], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise ProjectError(f"{where}: {key} must be a non-empty string")
    return value


def _uv_git(name: NormalizedName, entry: Mapping[str, object], where: str) -> DirectSource:
    url = _string(entry, "git", where)
    kinds: list[RevisionKind] = [k for k in ("rev", "tag", "branch") if k in entry]
    if len(kinds) > 1:
        raise ProjectError(
            f"{where}: give one of rev, tag and branch, not {' and '.join(kinds)}",
            hint="keep the one that names the revision you want",
        )
    revision = (kinds[0], _string(entry, kinds[0], where)) if kinds else None
    sub = entry.get("subdirectory")
    if sub is not None and not isinstance(sub, str):
        raise ProjectError(f"{where}: subdirectory must be a string")
    return DirectSource(
        name=name, kind="git", url=url, revision=revision, subdirectory=sub or None, where=where
    )


def _archive(name: NormalizedName, kind: DirectKind, url: str, where: str) -> DirectSource:
    parts = urlsplit(url)
    sha256: str | None = None
    fragment = parts.fragment
    if fragment:
        algorithm, _, value = fragment.partition("=")
        if algorithm != "sha256" or len(value) != 64:
            raise ProjectError(
                f"{where}: the URL fragment {fragment!r} is not a '#sha256=<64 hex digits>'",
                hint="give the archive's sha256 as '#sha256=…', or leave the fragment out",
            )
        sha256 = value.lower()
    source = DirectSource(
        name=name,
        kind=kind,
        url=urlunsplit(parts._replace(fragment="")),
        sha256=sha256,
        where=where,
    )
    if not source.filename.endswith(ARCHIVE_SUFFIXES):
        raise ProjectError(
            f"{where}: {strip_userinfo(source.url)} is not a wheel or an sdist "
            "(.whl, .tar.gz or .zip)",
            hint="point it at a wheel or sdist file",
        )
    return source


def requirement_source(req: Requirement, where: str) -> DirectSource | None:
    """The direct source a PEP 508 ``name @ URL`` requirement names; None for other ones."""
    if not req.url:
        return None
    name = canonicalize_name(req.name)
    where = f"{where}: {req.name} @ {strip_userinfo(req.url)}"
    if req.url.startswith("git+"):
        parts = urlsplit(req.url[4:])
        path, at, rev = parts.path.rpartition("@") if "@" in parts.path else (parts.path, "", "")
        sub = None
        for item in parts.fragment.split("&"):
            key, _, value = item.partition("=")
            if key == "subdirectory" and value:
                sub = value
        url = urlunsplit(parts._replace(path=path if at else parts.path, fragment=""))
        revision: tuple[RevisionKind, str] | None = ("rev", rev) if at and rev else None
        return DirectSource(
            name=name, kind="git", url=url, revision=revision, subdirectory=sub, where=where
        )
    scheme = urlsplit(req.url).scheme
    if scheme in ("http", "https"):
        return _archive(name, "url", req.url, where)
    if scheme == "file":
        local = Path(url2pathname(urlsplit(req.url).path))
        if not local.is_file():
            raise ProjectError(f"{where}: {local} does not exist", hint="fix the path")
        return _archive(name, "path", req.url, where)
    raise ProjectError(
        f"{where}: {scheme or 'this'} URLs are not supported",
        hint="use git+https://, https:// or file:// URLs",
    )
