"""Secrets stay out of the project's wheel: excluded sources, and a check of what was built.

Two steps, around the PEP 517 build of the project (and of its local packages):

1. **Exclude.** ``.dockerignore`` in the source directory, then ``[tool.imgbuild] exclude``,
   in Docker's syntax (``*`` within one path segment, ``**`` across them, ``!`` re-includes,
   a pattern naming a directory takes all under it, the last matching line wins, paths are
   relative to the directory). With any pattern, the backend builds a copy of the source that
   holds only the files not excluded. The backend never sees an excluded file, so none of its
   own include rules (hatchling's, setuptools' ``package_data``, a ``force-include``) can put
   one back: this is what ``.dockerignore`` does to a ``docker build`` context, and what a ko
   or jib user gets by keeping a file out of the source set. Filtering the built wheel instead
   would need patterns on wheel paths, which differ from source paths (``src/`` layouts,
   data files), and would leave RECORD to be rewritten. Without a pattern the backend builds
   the source directory itself, as before.
2. **Refuse.** The built wheel's members (its ``.data`` files too) are checked before it is
   installed: a member that looks like a secret fails the build in one line naming it and the
   setting that allows it (``[tool.imgbuild] allow-secrets``, wheel paths or patterns). What
   looks like a secret: environment files (``.env``, ``.env.*`` but not ``.env.example``,
   ``.sample``, ``.template``, ``.dist``), SSH private keys (``id_rsa``, ``id_ed25519`` …),
   ``*.pem``/``*.key`` files holding a ``PRIVATE KEY``, ``.npmrc``, ``.pypirc``, ``.netrc``,
   ``.git-credentials``, ``.aws/credentials`` and Google ``credentials.json`` files with a
   private key, refresh token or client secret.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from imagebuild.errors import ProjectError
from imagebuild.project.settings import ImageSettings

IGNORE_FILE = ".dockerignore"
_TEMPLATE_SUFFIXES = frozenset({"example", "sample", "template", "dist", "defaults"})
_SSH_KEYS = frozenset(
    {"id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "id_ecdsa_sk", "id_ed25519_sk"}
)
_LOGIN_FILES = {
    ".npmrc": "an npm login file",
    ".pypirc": "a PyPI login file",
    ".netrc": "a netrc login file",
    "_netrc": "a netrc login file",
    ".git-credentials": "git credentials",
}
_GOOGLE_CREDENTIALS = frozenset({"credentials.json", "application_default_credentials.json"})
_GOOGLE_SECRET_KEYS = (b'"private_key"', b'"refresh_token"', b'"client_secret"')
_READ_LIMIT = 1 << 20  # bytes of a member read to look inside it


@dataclass(frozen=True, kw_only=True, slots=True)
class SourcePolicy:
    """What of a source directory may reach its wheel."""

    exclude: tuple[str, ...] = ()
    """``[tool.imgbuild] exclude`` patterns, applied after the directory's ``.dockerignore``."""
    allow_secrets: tuple[str, ...] = ()
    """Wheel paths (or patterns) that may ship though they look like secrets."""
    source: str = "pyproject.toml"
    """Where the settings came from, for messages."""


def source_policy(settings: ImageSettings) -> SourcePolicy:
    """The policy ``[tool.imgbuild]`` sets (``exclude``, ``allow-secrets``)."""
    return SourcePolicy(
        exclude=settings.exclude, allow_secrets=settings.allow_secrets, source=settings.source
    )


@dataclass(frozen=True, slots=True)
class IgnoreRule:
    """One line of ``.dockerignore`` (or one ``exclude`` entry)."""

    pattern: str
    """The cleaned pattern, without ``!``."""
    negate: bool
    """A ``!`` line: re-include what it matches."""
    regex: re.Pattern[str]
    """The pattern as a regular expression over a whole relative path."""

    def matches(self, path: str) -> bool:
        """Whether ``path`` or one of its parent directories matches the pattern."""
        parts = path.split("/")
        return any(self.regex.fullmatch("/".join(parts[:i])) for i in range(len(parts), 0, -1))


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go's ``filepath.Match`` plus ``**``) as a regex."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith(("!", "^")) else body
            out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def parse_ignore(lines: Iterable[str]) -> tuple[IgnoreRule, ...]:
    """Rules from ``.dockerignore`` lines (``#`` comments and blank lines skipped)."""
    rules = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        text = line[1:].strip() if negate else line
        cleaned = os.path.normpath(text.lstrip("/")).replace(os.sep, "/") if text else ""
        if cleaned in ("", "."):
            continue
        rules.append(IgnoreRule(cleaned, negate, _pattern_regex(cleaned)))
    return tuple(rules)


def is_ignored(rules: tuple[IgnoreRule, ...], path: str) -> bool:
    """Whether ``path`` (relative, ``/``-separated) is excluded: the last matching rule wins."""
    ignored = False
    for rule in rules:
        if rule.matches(path):
            ignored = not rule.negate
    return ignored


def source_rules(source_dir: Path, policy: SourcePolicy) -> tuple[IgnoreRule, ...]:
    """The directory's ``.dockerignore`` rules, then the policy's ``exclude`` patterns."""
    ignore_file = source_dir / IGNORE_FILE
    try:
        lines = ignore_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    except (OSError, UnicodeDecodeError) as exc:
        raise ProjectError(
            f"{ignore_file}: cannot read: {exc}", hint="fix or remove the file"
        ) from None
    return parse_ignore([*lines, *policy.exclude])


def _kept_files(source_dir: Path, rules: tuple[IgnoreRule, ...]) -> Iterator[str]:
    """Relative paths of the files and links under ``source_dir`` that are not excluded."""
    reincludes = any(rule.negate for rule in rules)
    for root, dirs, files in os.walk(source_dir):
        rel_root = Path(root).relative_to(source_dir).as_posix()
        prefix = "" if rel_root == "." else f"{rel_root}/"
        kept_dirs = []
        for name in sorted(dirs):
            path = prefix + name
            if (source_dir / path).is_symlink():
                files.append(name)  # a link to a directory is copied as the link
            elif reincludes or not is_ignored(rules, path):
                kept_dirs.append(name)
        dirs[:] = kept_dirs
        for name in sorted(files):
            path = prefix + name
            if path == "pyproject.toml" or not is_ignored(rules, path):
                yield path


def filtered_copy(source_dir: Path, dest: Path, rules: tuple[IgnoreRule, ...]) -> Path:
    """Copy what ``rules`` keep of ``source_dir`` to ``dest`` (made here); return ``dest``.

    Links are copied as links, files with their modes. ``pyproject.toml`` is always kept.
    """
    dest.mkdir(parents=True)
    for path in _kept_files(source_dir, rules):
        src, dst = source_dir / path, dest / path
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


# --------------------------------------------------------------------------------------------
# What looks like a secret


def _looks_secret(name: str, read: _Reader) -> str | None:
    """Why the wheel member ``name`` looks like a secret, or ``None``."""
    path = PurePosixPath(name)
    base = path.name
    if base == ".env" or (
        base.startswith(".env.") and base.rsplit(".", 1)[-1] not in _TEMPLATE_SUFFIXES
    ):
        return "an environment file"
    if base in _SSH_KEYS:
        return "an SSH private key"
    if base in _LOGIN_FILES:
        return _LOGIN_FILES[base]
    if base == "credentials" and path.parent.name == ".aws":
        return "AWS credentials"
    if base.endswith((".pem", ".key")) and b"PRIVATE KEY" in read(name):
        return "a private key"
    if base in _GOOGLE_CREDENTIALS and any(key in read(name) for key in _GOOGLE_SECRET_KEYS):
        return "Google credentials"
    return None


class _Reader:
    """Reads the start of a wheel member (only members whose name already looks suspect)."""

    def __init__(self, wheel: zipfile.ZipFile) -> None:
        self._wheel = wheel

    def __call__(self, name: str) -> bytes:
        with self._wheel.open(name) as f:
            return f.read(_READ_LIMIT)


def _allowed(name: str, allow: tuple[str, ...]) -> bool:
    return any(name == pattern or fnmatch.fnmatchcase(name, pattern) for pattern in allow)


def wheel_secrets(wheel: Path, policy: SourcePolicy) -> tuple[tuple[str, str], ...]:
    """``(member, why)`` for each member of ``wheel`` that looks like a secret, not allowed."""
    found = []
    with zipfile.ZipFile(wheel) as zf:
        read = _Reader(zf)
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if info.is_dir() or _allowed(info.filename, policy.allow_secrets):
                continue
            why = _looks_secret(info.filename, read)
            if why is not None:
                found.append((info.filename, why))
    return tuple(found)


def check_wheel(wheel: Path, policy: SourcePolicy, *, source_dir: Path) -> None:
    """Refuse ``wheel`` (built from ``source_dir``) if it would ship something secret."""
    found = wheel_secrets(wheel, policy)
    if not found:
        return
    first, why = found[0]
    more = (
        f" (and {len(found) - 1} more: {', '.join(n for n, _ in found[1:4])}" if found[1:] else ""
    )
    more += ", …)" if len(found) > 4 else (")" if more else "")
    raise ProjectError(
        f"{source_dir}: the wheel would put {first} in the image, which looks like {why}{more}",
        hint=(
            f"leave it out with {IGNORE_FILE} or [tool.imgbuild] exclude in "
            f"{policy.source}, or ship it with [tool.imgbuild] "
            f'allow-secrets = ["{first}"]'
        ),
    )
