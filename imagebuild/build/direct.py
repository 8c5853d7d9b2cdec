"""Direct sources made usable: a git commit's wheel and metadata, a direct archive's metadata.

A git commit is exported from the cache's mirror (``build.git``) and built through its own
PEP 517 backend, in a kept build environment from the project's indexes. Both results are
kept under the commit (``git/metadata/…``, ``git/wheels/…``): a commit never changes, so
each is made once. The wheel's key holds ``SOURCE_DATE_EPOCH`` as well, since its bytes
depend on it. Direct archives (``name @ https://…/x.whl``, a local sdist) are fetched and
hash-checked like index files and read like them (``build.sdist`` for an sdist).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import httpx
from filelock import FileLock
from packaging.utils import canonicalize_name, parse_wheel_filename

from imagebuild.build.git import GitMirrors
from imagebuild.build.pep517 import BuildEnvironments, build_project_wheel
from imagebuild.build.sdist import cached_wheel, run_backend
from imagebuild.cache import atomic_writer, write_atomic
from imagebuild.digest import digest_file, digest_hex
from imagebuild.errors import BuildError, FetchError
from imagebuild.net.transfer import fetch_retrying, redact, redact_text, write_stream


@dataclass(frozen=True, kw_only=True, slots=True)
class GitCommit:
    """One commit of a repository, and where the project sits in it."""

    url: str
    """The repository URL (as the lock or project wrote it)."""
    commit: str
    """The full commit id."""
    subdirectory: str | None = None
    """The project's directory inside the repository."""
    where: str = ""
    """The lock entry or source it comes from, for messages."""

    @property
    def key(self) -> str:
        """The cache key: the commit, and the subdirectory when there is one."""
        if not self.subdirectory:
            return self.commit
        return f"{self.commit}-{hashlib.sha256(self.subdirectory.encode()).hexdigest()[:12]}"


def git_metadata(bucket: Path, commit: GitCommit, envs: BuildEnvironments) -> bytes:
    """The core metadata the commit's backend prepares (kept under the commit)."""
    entry = bucket / "metadata" / f"{commit.key}.metadata"
    try:
        return entry.read_bytes()
    except OSError:
        pass
    mirrors = GitMirrors(bucket)
    repo = mirrors.ensure(commit.url, commit.commit, where=commit.where)
    with tempfile.TemporaryDirectory(prefix="imgbuild-git-") as tmp:
        source = mirrors.export(repo, commit.commit, Path(tmp) / "src", commit.subdirectory)
        data = _prepare_metadata(source, Path(tmp) / "out", commit.where, envs)
    write_atomic(entry, data)
    return data


def git_wheel(
    bucket: Path,
    commit: GitCommit,
    *,
    name: str,
    epoch: int,
    envs: BuildEnvironments,
) -> Path:
    """The wheel of ``name`` built from the commit (kept under the commit and the epoch).

    Raises ``BuildError`` when the commit cannot be had or verified, the backend fails, or
    the wheel is of another project than the lock says.
    """
    entry = bucket / "wheels" / f"{commit.key}-{epoch}"
    built = cached_wheel(entry)
    if built is not None:
        return built
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        built = cached_wheel(entry)
        if built is not None:
            return built
        mirrors = GitMirrors(bucket)
        repo = mirrors.ensure(commit.url, commit.commit, where=commit.where)
        with tempfile.TemporaryDirectory(prefix="imgbuild-git-") as tmp:
            source = mirrors.export(repo, commit.commit, Path(tmp) / "src", commit.subdirectory)
            wheel = build_project_wheel(
                source, Path(tmp) / "out", source_date_epoch=epoch, envs=envs
            )
            built_name = parse_wheel_filename(wheel.name)[0]
            if built_name != canonicalize_name(name):
                raise BuildError(
                    f"{commit.where}: commit {commit.commit} builds {built_name}, not {name}",
                    hint="check the repository (and subdirectory) the lock names",
                )
            final = entry / wheel.name
            with wheel.open("rb") as src, atomic_writer(final) as out:
                shutil.copyfileobj(src, out)
    return final


def _prepare_metadata(source: Path, out: Path, where: str, envs: BuildEnvironments) -> bytes:
    hint = "run 'python -m build --wheel' in a checkout of the revision to see why"
    dist_info = run_backend(source, out, where, BuildError, "metadata", envs, hint=hint)
    try:
        return (dist_info / "METADATA").read_bytes()
    except OSError:
        raise BuildError(f"{where}: the build backend wrote no METADATA", hint=hint) from None


def fetch_archive(http: httpx.Client, url: str, dest: Path, *, where: str) -> str:
    """Download (or copy, for ``file://``) ``url`` into ``dest``; its sha256 hex."""
    if urlsplit(url).scheme == "file":
        source = Path(url2pathname(urlsplit(url).path))
        try:
            shutil.copyfile(source, dest)
        except OSError as exc:
            raise FetchError(f"{where}: cannot read {source} ({exc})", hint="fix the path") from exc
        return digest_hex(digest_file(dest))

    def write(response: httpx.Response) -> str:
        if response.status_code != 200:
            raise FetchError(
                f"{where}: GET {redact(url)} answered {response.status_code}",
                hint="check the URL still serves the archive",
            )
        return write_stream(response, dest)

    try:
        return fetch_retrying(http, url, write)
    except httpx.HTTPError as exc:
        raise FetchError(
            f"{where}: GET {redact(url)} failed: {redact_text(str(exc))}",
            hint="check the URL and the network",
        ) from exc
