"""Git sources: repositories fetched into the cache, commits verified, trees exported.

git runs as a subprocess through ``build.runner`` with a timeout, no terminal prompt
(``GIT_TERMINAL_PROMPT=0``; ssh in batch mode) and no hooks. Credentials are git's own
business (credential helpers, ``insteadOf``, a URL the user wrote): nothing here records
them, and every URL or git message in an error is redacted.

A repository is fetched once into a bare mirror under the cache (``git/repos/<key>``,
every branch and tag), and a commit already there needs no network at all. A commit is
only ever used after ``git rev-parse <id>^{commit}`` gave back that very id: a lock's
commit id is never a branch that moves, an abbreviation, or a tag object.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from imagebuild.build.runner import ProcessFailed, run_captured
from imagebuild.errors import BuildError
from imagebuild.net.transfer import redact, redact_text

GIT_TIMEOUT = 300.0
"""Seconds one git command may take (a fetch of a large repository included)."""
_FULL_ID = re.compile(r"^[0-9a-f]{40}$")
_REFSPECS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*", "+HEAD:refs/imgbuild/HEAD")


@dataclass(frozen=True, kw_only=True, slots=True)
class GitRevision:
    """A revision to resolve: what a project asks for."""

    url: str
    """The repository URL, as written (it may carry credentials: never printed as is)."""
    kind: str | None = None
    """``tag``, ``branch`` or ``rev``; None for the remote's default branch."""
    value: str | None = None
    """The tag, branch or revision."""

    def describe(self) -> str:
        """``https://host/repo (tag v1)`` for messages, credentials redacted."""
        return f"{redact(self.url)} ({self.kind} {self.value})" if self.kind else redact(self.url)


def is_commit_id(text: str) -> bool:
    """Whether ``text`` is a full (40 hex digits, lower case) commit id."""
    return bool(_FULL_ID.match(text))


def _environ() -> dict[str, str]:
    environ = dict(os.environ)
    environ["GIT_TERMINAL_PROMPT"] = "0"
    environ.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    # A repository's own config (hooks, fsmonitor) is never run: the mirror is ours.
    return environ


def _git(args: Sequence[str], *, repo: Path | None = None, url: str = "") -> str:
    cmd = ["git", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false"]
    if repo is not None:
        cmd += ["--git-dir", str(repo)]
    try:
        return run_captured([*cmd, *args], env=_environ(), timeout=GIT_TIMEOUT)
    except FileNotFoundError as exc:
        raise BuildError(
            f"git {redact(url)}: git is not installed", hint="install git and put it on PATH"
        ) from exc


def _failure(exc: ProcessFailed) -> str:
    return redact_text(exc.last_line()).removeprefix("fatal: ")


class GitMirrors:
    """Bare mirrors of repositories under one cache bucket, one per URL."""

    def __init__(self, bucket: Path) -> None:
        self.root = bucket

    def _repo(self, url: str) -> Path:
        # Keyed by the URL as written, so a URL with other credentials is another mirror.
        key = hashlib.sha256(url.encode()).hexdigest()[:24]
        repo = self.root / "repos" / key
        if not (repo / "HEAD").is_file():
            repo.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=repo.parent))
            _git(["init", "--quiet", "--bare", str(staging)], url=url)
            try:
                staging.rename(repo)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)  # another process made it first
        return repo

    def _fetch(self, repo: Path, url: str, refspecs: Sequence[str] = _REFSPECS) -> None:
        try:
            _git(["fetch", "--quiet", "--force", "--no-tags", "--", url, *refspecs], repo=repo)
        except ProcessFailed as exc:
            raise BuildError(
                f"git {redact(url)}: fetch failed: {_failure(exc)}",
                hint="check the URL, and that git can reach it (its credential helpers "
                "and insteadOf settings are used)",
            ) from None

    def _commit_of(self, repo: Path, name: str) -> str | None:
        try:
            out = _git(
                ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{name}^{{commit}}"],
                repo=repo,
            )
        except ProcessFailed:
            return None
        return out.strip() or None

    def resolve(self, revision: GitRevision) -> str:
        """The commit ``revision`` names now (fetching the repository's refs first)."""
        url = revision.url
        with FileLock(str(self._repo(url)) + ".lock"):
            repo = self._repo(url)
            self._fetch(repo, url)
            kind, value = revision.kind, revision.value or ""
            names = {
                None: ["refs/imgbuild/HEAD"],
                "tag": [f"refs/tags/{value}"],
                "branch": [f"refs/heads/{value}"],
                "rev": [f"refs/tags/{value}", f"refs/heads/{value}", value],
            }[kind]
            for name in names:
                commit = self._commit_of(repo, name)
                if commit is not None:
                    return commit
            if kind == "rev" and is_commit_id(value):
                # A commit no branch or tag points at: servers that allow it send it by id.
                commit = self._fetch_commit(repo, url, value)
                if commit is not None:
                    return commit
        raise BuildError(
            f"git {revision.describe()}: no such {kind or 'default branch'} in the repository",
            hint="check the tag, branch or revision in tool.uv.sources",
        )

    def _fetch_commit(self, repo: Path, url: str, commit: str) -> str | None:
        if self._commit_of(repo, commit) is None:
            try:
                _git(["fetch", "--quiet", "--no-tags", "--", url, commit], repo=repo)
            except ProcessFailed:
                return None
        return self._commit_of(repo, commit)

    def ensure(self, url: str, commit: str, *, where: str) -> Path:
        """The mirror of ``url`` holding ``commit``, verified to be that very commit.

        A commit already mirrored needs no network. ``where`` names the lock entry in
        messages. Raises ``BuildError`` when ``commit`` is not a full commit id, is not in
        the repository (force-pushed away), or names something else (a tag object).
        """
        if not is_commit_id(commit):
            raise BuildError(
                f"{where}: {commit!r} is not a full commit id (40 hex digits)",
                hint="re-lock so the lock records the commit the revision resolved to",
            )
        with FileLock(str(self._repo(url)) + ".lock"):
            repo = self._repo(url)
            found = self._commit_of(repo, commit)
            if found is None:
                self._fetch(repo, url)
                found = self._fetch_commit(repo, url, commit)
        if found is None:
            raise BuildError(
                f"{where}: commit {commit} is no longer in {redact(url)}",
                hint="the history was rewritten; re-lock with 'imgbuild lock --upgrade' "
                "(or 'uv lock --upgrade')",
            )
        if found != commit:
            raise BuildError(
                f"{where}: {commit} names commit {found}, not itself (a tag object?)",
                hint="record the commit id itself; re-lock",
            )
        return repo

    def export(self, repo: Path, commit: str, dest: Path, subdirectory: str | None) -> Path:
        """Write the tree of ``commit`` (or its ``subdirectory``) into ``dest``; return it."""
        treeish = f"{commit}:{subdirectory.strip('/')}" if subdirectory else commit
        dest.mkdir(parents=True, exist_ok=True)
        archive = dest.parent / f".{dest.name}.tar"
        try:
            _git(["archive", "--format=tar", "-o", str(archive), treeish], repo=repo)
        except ProcessFailed as exc:
            raise BuildError(
                f"git commit {commit}: cannot export {subdirectory or 'its tree'}: {_failure(exc)}",
                hint="check the subdirectory names a directory of the repository",
            ) from None
        try:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
        finally:
            archive.unlink(missing_ok=True)
        return dest
