"""The Debian archive: a suite's signed Release, its Packages indexes and its .debs, verified.

Trust flows as in apt. ``fetch_release`` verifies a suite's ``InRelease`` with ``gpgv``
against a keyring (Debian's archive keyring by default) and reads only the text gpgv says
was signed; that text's SHA256 table vouches for every index (``fetch_packages``, and
``contents``), and each index's entries vouch for the .debs (``fetch_deb``). Nothing is
used before its hash matched.

The cache's Debian bucket (``CacheLayout.debian``) keeps, by sha256: verified InRelease
files (``inrelease/``; ``inrelease/latest/`` names the newest per mirror and suite), Packages
indexes parsed once (``packages/<hex>.json``: a warm call neither downloads nor parses 50 MB
of text), Contents indexes (``contents/``) and .debs (``debs/<hex>.deb``). A file gets its
final name only after its hash was checked, and a file lock per entry keeps threads and
processes from fetching one entry twice.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TypeVar

import httpx
from filelock import FileLock

from imagebuild.build.runner import ProcessFailed, run_captured
from imagebuild.cache import atomic_writer, write_atomic
from imagebuild.debian.model import ArchiveSource, IndexedPackage, LockedDeb
from imagebuild.debian.packages import (
    MIRROR_HINT,
    from_row,
    load_rows,
    parse_packages,
    store_rows,
)
from imagebuild.digest import Digest, Hasher, digest_bytes, digest_hex, parse_digest
from imagebuild.errors import DebianError
from imagebuild.net.http import attempts
from imagebuild.net.transfer import body, failure_text, fetch_retrying, redact, redact_text

DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
"""Debian's archive keyring (package ``debian-archive-keyring``): bookworm and trixie keys."""
GPGV_TIMEOUT = 60.0
"""Seconds gpgv may take to check one InRelease."""

_T = TypeVar("_T")
_NETWORK_HINT = "check the network and the mirror URL"
_RELOCK_HINT = (
    "the mirror serves other bytes than the lock records: use the mirror the base was locked "
    "from (or a snapshot mirror), or re-lock the base"
)
_BEGIN = b"-----BEGIN PGP SIGNED MESSAGE-----"
_KEYRING_HINT = (
    "check the keyring holds the archive's key (debian-archive-keyring) and the mirror is Debian's"
)
_SNAPSHOT_HINT = (
    "the mirror no longer has this version: use a snapshot mirror "
    "(https://snapshot.debian.org/archive/debian/<date>/) or re-lock the base"
)
# gpgv status keywords that make a signature worthless even if it verifies.
_UNTRUSTED = frozenset({"EXPKEYSIG", "REVKEYSIG", "EXPSIG", "BADSIG"})
_WEAK = frozenset({"1", "2", "3"})  # MD5, SHA1, RIPEMD160 (RFC 4880 ids)


@dataclass(frozen=True, kw_only=True, slots=True)
class Release:
    """A suite's verified Release: what it is, and the hash of every index it lists."""

    source: ArchiveSource
    """The mirror and suite it was fetched for."""
    suite: str
    """The ``Suite`` field (``stable``, ``oldstable``, ``oldstable-security``)."""
    codename: str
    """The ``Codename`` field (``bookworm``, ``bookworm-security``)."""
    date: datetime
    """When the archive published it."""
    valid_until: datetime | None
    """When it stops being valid (security suites set one), else None."""
    architectures: tuple[str, ...]
    components: tuple[str, ...]
    acquire_by_hash: bool
    """Whether indexes are also served as ``by-hash/SHA256/<hex>`` (safe from mirror updates)."""
    sha256: Mapping[str, tuple[Digest, int]]
    """Index path below ``dists/<suite>/`` -> (sha256, size), from the signed text."""
    inrelease: Digest
    """The sha256 of the InRelease file as fetched (signature included)."""
    signers: tuple[str, ...]
    """Fingerprints of the keys whose signatures verified, sorted."""

    def url(self, path: str) -> str:
        """The URL of ``path`` below this suite's ``dists/<suite>/`` directory."""
        return f"{self.source.mirror}/dists/{self.source.suite}/{path}"

    def index_urls(self, path: str) -> tuple[str, ...]:
        """Where to GET index ``path``: by hash first when the archive offers it."""
        plain = self.url(path)
        if not self.acquire_by_hash or path not in self.sha256:
            return (plain,)
        directory = path.rpartition("/")[0]
        hexdigest = digest_hex(self.sha256[path][0])
        return (self.url(f"{directory}/by-hash/SHA256/{hexdigest}"), plain)


def fetch_release(
    http: httpx.Client,
    source: ArchiveSource,
    *,
    cache: Path,
    keyring: Path = DEFAULT_KEYRING,
    refresh: bool = True,
    check_valid_until: bool = True,
    now: datetime | None = None,
) -> Release:
    """Fetch ``source``'s InRelease, verify its signature against ``keyring``, parse it.

    The archive moves (point releases, security updates), so this asks the mirror each
    time, unless ``refresh=False``: then the newest InRelease the cache holds for this mirror
    and suite is used if still valid (its signature checked again, in milliseconds), for a
    second call in one build or offline work. A Release past its ``Valid-Until`` (``now``:
    the current time) is refused, as apt refuses it, since a stale or replayed security suite
    hides fixes; a snapshot mirror serves old ones on purpose: ``check_valid_until=False``.
    """
    gpgv = _gpgv(keyring)
    moment = now or datetime.now(UTC)
    url = f"{source.mirror}/dists/{source.suite}/InRelease"
    pointer = cache / "inrelease" / "latest" / digest_hex(digest_bytes(url.encode()))
    if not refresh:
        cached = _cached_release(pointer, cache, source, gpgv=gpgv, keyring=keyring, url=url)
        if cached is not None and (not check_valid_until or not _expired(cached, moment)):
            return cached
    subject, missing = f"InRelease of {source.suite}", "check the mirror URL and the suite name"
    data = _get(http, url, lambda response: response.read(), subject=subject, missing=missing)
    release = _verified_release(data, source, gpgv=gpgv, keyring=keyring, url=url)
    if check_valid_until and _expired(release, moment):
        raise DebianError(
            f"InRelease of {source.suite} at {redact(url)} expired at "
            f"{release.valid_until:%Y-%m-%d %H:%M UTC} (Valid-Until)",
            hint="the mirror is stale: use an up-to-date mirror, or allow old Releases for a "
            "snapshot mirror (check_valid_until=False)",
        )
    write_atomic(cache / "inrelease" / digest_hex(release.inrelease), data)
    write_atomic(pointer, digest_hex(release.inrelease).encode())
    return release


def _expired(release: Release, now: datetime) -> bool:
    return release.valid_until is not None and release.valid_until < now


def _cached_release(
    pointer: Path, cache: Path, source: ArchiveSource, *, gpgv: str, keyring: Path, url: str
) -> Release | None:
    try:
        data = (cache / "inrelease" / pointer.read_text(encoding="ascii").strip()).read_bytes()
    except (OSError, UnicodeDecodeError):
        return None
    return _verified_release(data, source, gpgv=gpgv, keyring=keyring, url=url)


def _verified_release(
    data: bytes, source: ArchiveSource, *, gpgv: str, keyring: Path, url: str
) -> Release:
    text, signers = verify_clearsigned(data, gpgv=gpgv, keyring=keyring, url=url)
    release = parse_release(text, source=source, inrelease=digest_bytes(data), signers=signers)
    if source.suite not in (release.suite, release.codename):
        raise DebianError(
            f"InRelease at {redact(url)} is signed for suite {release.suite!r} (codename "
            f"{release.codename!r}), not {source.suite!r}",
            hint="the mirror serves another suite's Release there: check the suite name and "
            "the mirror",
        )
    return release


def _gpgv(keyring: Path) -> str:
    """The gpgv binary, after checking that it and ``keyring`` are there."""
    gpgv = shutil.which("gpgv")
    if gpgv is None:
        raise DebianError(
            "gpgv not found on PATH: InRelease signatures cannot be checked without it",
            hint="install it (apt-get install gpgv)",
        )
    if not keyring.is_file():
        raise DebianError(
            f"keyring {keyring} does not exist: InRelease signatures cannot be checked",
            hint="install debian-archive-keyring (apt-get install debian-archive-keyring) "
            "or name an existing keyring file",
        )
    return gpgv


def verify_clearsigned(
    data: bytes, *, gpgv: str, keyring: Path, url: str
) -> tuple[str, tuple[str, ...]]:
    """The text gpgv verified in clearsigned ``data``, and the signing keys' fingerprints.

    At least one signature must verify with a key of ``keyring``, with a hash other than
    MD5/SHA-1 and a key neither expired nor revoked; others made with keys the keyring
    lacks are ignored (as apt ignores them), but any bad signature refuses the file.
    """
    framed = data.strip()
    if not framed.startswith(_BEGIN) or not framed.endswith(b"-----END PGP SIGNATURE-----"):
        raise DebianError(f"InRelease at {redact(url)} is not a clearsigned file", hint=MIRROR_HINT)
    with tempfile.TemporaryDirectory(prefix="imgbuild-gpgv-") as tmp:
        signed, output = Path(tmp, "InRelease"), Path(tmp, "signed")
        signed.write_bytes(data)
        command = [gpgv, "--status-fd", "1", "--output", str(output)]
        command += ["--keyring", str(keyring.resolve()), str(signed)]
        env = {"GNUPGHOME": tmp, "LC_ALL": "C", "PATH": os.environ.get("PATH", "")}
        try:
            status = run_captured(command, env=env, timeout=GPGV_TIMEOUT)
        except ProcessFailed as exc:
            status = exc.stdout
            if exc.returncode < 0 or not status:
                raise DebianError(
                    f"InRelease at {redact(url)}: gpgv failed: {exc.last_line()}",
                    hint=f"check gpgv and the keyring {keyring}",
                ) from None
        signers, problem = _signers(status)
        if problem or not signers:
            what = problem or "no signature by a key of the keyring"
            hint = MIRROR_HINT if problem else _KEYRING_HINT
            raise DebianError(f"InRelease at {redact(url)}: {what} (keyring {keyring})", hint=hint)
        text = output.read_bytes().decode("utf-8")
    return text, signers


def _signers(status: str) -> tuple[tuple[str, ...], str | None]:
    """Fingerprints of the good signatures in gpgv's status lines, and a refusal if any."""
    good: set[str] = set()
    for block in status.split("[GNUPG:] NEWSIG")[1:]:  # one block per signature
        lines = [line.split()[1:] for line in block.splitlines() if line.startswith("[GNUPG:] ")]
        keywords = {words[0] for words in lines if words}
        if "BADSIG" in keywords:
            return (), "BAD signature: its signed text was changed after signing"
        if not keywords & _UNTRUSTED:
            # VALIDSIG <fpr> <date> <ts> <expires> <version> <reserved> <pk-algo> <hash-algo>
            # <class> <primary-fpr>
            good.update(
                w[10] for w in lines if w[0] == "VALIDSIG" and len(w) > 10 and w[8] not in _WEAK
            )
    return tuple(sorted(good)), None


def parse_release(
    text: str, *, source: ArchiveSource, inrelease: Digest, signers: tuple[str, ...]
) -> Release:
    """The Release value of a Release file's (signed) text."""
    from debian import deb822  # python-debian: only a cold base reads a Release file

    paragraph = deb822.Release(text)
    table: dict[str, tuple[Digest, int]] = {}
    for entry in paragraph.get("SHA256", []):
        try:
            digest, size = parse_digest(entry["sha256"], bare_hex=True), int(entry["size"])
            table[entry["name"]] = (digest, size)
        except (KeyError, ValueError) as exc:
            raise DebianError(
                f"Release of {source.suite}: unreadable SHA256 line {entry!r}", hint=MIRROR_HINT
            ) from exc
    if not table:
        raise DebianError(
            f"Release of {source.suite} at {source.mirror} has no SHA256 table",
            hint="the archive is too old or not a Debian archive: use a current mirror",
        )
    return Release(
        source=source,
        suite=paragraph.get("Suite", ""),
        codename=paragraph.get("Codename", ""),
        date=_date(paragraph.get("Date"), source, "Date") or datetime.fromtimestamp(0, UTC),
        valid_until=_date(paragraph.get("Valid-Until"), source, "Valid-Until"),
        architectures=tuple(paragraph.get("Architectures", "").split()),
        components=tuple(paragraph.get("Components", "").split()),
        acquire_by_hash=paragraph.get("Acquire-By-Hash", "no").strip().lower() == "yes",
        sha256=table,
        inrelease=inrelease,
        signers=signers,
    )


def _date(value: str | None, source: ArchiveSource, field: str) -> datetime | None:
    try:
        when = parsedate_to_datetime(value) if value else None
    except (TypeError, ValueError) as exc:
        raise DebianError(
            f"Release of {source.suite}: unreadable {field} {value!r}", hint=MIRROR_HINT
        ) from exc
    return when.replace(tzinfo=when.tzinfo or UTC) if when else None


def fetch_packages(
    http: httpx.Client, release: Release, *, component: str = "main", arch: str, cache: Path
) -> tuple[IndexedPackage, ...]:
    """The packages of ``release``'s ``component`` for ``arch`` (``all`` ones included).

    Reads ``<component>/binary-<arch>/Packages.xz`` (``.gz`` if the Release lists no xz),
    checked against the Release's sha256 and size. The parsed index is kept by that sha256,
    so a warm call makes no request and parses nothing.
    """
    path = _index_path(release, component, arch)
    digest, _ = release.sha256[path]
    parsed = cache / "packages" / f"{digest_hex(digest)}.json"
    with FileLock(f"{parsed}.lock"):
        rows = load_rows(parsed)
        if rows is None:
            raw = cache / "packages" / f"{digest_hex(digest)}.raw"
            fetch_index(http, release, path, dest=raw)
            try:
                opener = lzma.open if path.endswith(".xz") else gzip.open
                with opener(raw, "rb") as stream:
                    packages = parse_packages(stream, mirror=release.source.mirror)
            finally:
                raw.unlink(missing_ok=True)
            store_rows(parsed, packages)
            return packages
    return tuple(from_row(row, release.source.mirror) for row in rows)


def _index_path(release: Release, component: str, arch: str) -> str:
    for suffix in (".xz", ".gz"):
        path = f"{component}/binary-{arch}/Packages{suffix}"
        if path in release.sha256:
            return path
    raise DebianError(
        f"{release.source.suite} at {release.source.mirror} has no Packages index for "
        f"{component}/binary-{arch} (architectures: {' '.join(release.architectures)}; "
        f"components: {' '.join(release.components)})",
        hint="check the architecture and the component",
    )


def fetch_index(http: httpx.Client, release: Release, path: str, *, dest: Path) -> None:
    """Download index ``path`` of ``release`` to ``dest``, checked against the Release.

    By hash first when the archive offers it (a mirror mid-update still serves the file the
    Release names there), then by name.
    """
    digest, size = release.sha256[path]
    subject = f"index {path} of {release.source.suite}"
    write = _checked_writer(dest, digest=digest, size=size, subject=subject, hint=MIRROR_HINT)
    *by_hash, plain = release.index_urls(path)
    for url in by_hash:
        try:
            return _get(http, url, write, subject=subject, size=size, missing=MIRROR_HINT)
        except _NotFound:
            pass
    _get(http, plain, write, subject=subject, size=size, missing=MIRROR_HINT)


def fetch_deb(
    http: httpx.Client, deb: LockedDeb, *, cache: Path, mirror: str | None = None
) -> Path:
    """The cached file of ``deb``, downloaded first if needed and checked against its sha256.

    ``mirror`` replaces the mirror root of ``deb.url`` (the same pool path on another
    mirror, e.g. a snapshot of the archive). Safe to call from several threads at once.
    """
    url = f"{mirror.rstrip('/')}/{deb.pool_path}" if mirror else deb.url
    dest = cache / "debs" / f"{digest_hex(deb.sha256)}.deb"
    subject = f"package {deb.name} {deb.version} ({deb.architecture})"
    with FileLock(f"{dest}.lock"):
        if dest.is_file() and dest.stat().st_size == deb.size:
            return dest  # only a checked file ever gets this name
        write = _checked_writer(
            dest, digest=deb.sha256, size=deb.size, subject=subject, hint=_RELOCK_HINT
        )
        _get(http, url, write, subject=subject, size=deb.size, missing=_SNAPSHOT_HINT)
    return dest


class _NotFound(DebianError):
    """A 404 or 410 (an index not served by hash is then read by name)."""


def _get(
    http: httpx.Client,
    url: str,
    consume: Callable[[httpx.Response], _T],
    *,
    subject: str,
    missing: str,
    size: int | None = None,
) -> _T:
    """``consume`` the answer to GET ``url``; anything but a 200 fails in one line.

    ``missing`` is the hint for a 404 (raised as ``_NotFound``); ``size``, when known, sets
    the transfer's deadline (``fetch_retrying``).
    """
    shown = redact(url)

    def checked(response: httpx.Response) -> _T:
        status = response.status_code
        if status != 200:
            count = attempts(response)
            answer = f"{status} {response.reason_phrase}".rstrip()
            answer += f" ({count} attempts)" if count > 1 else ""
            error = _NotFound if status in (404, 410) else DebianError
            hint = missing if status in (404, 410) else _NETWORK_HINT
            raise error(f"{subject}: GET {shown} answered {answer}", hint=hint)
        return consume(response)

    try:
        return fetch_retrying(http, url, checked, size=size)
    except httpx.TransportError as exc:
        count = attempts(exc)
        failed = f"failed after {count} attempts" if count > 1 else "failed"
        raise DebianError(
            f"{subject}: GET {shown} {failed}: {failure_text(exc)}", hint=_NETWORK_HINT
        ) from exc
    except httpx.HTTPError as exc:
        raise DebianError(f"{subject}: GET {shown} failed: {redact_text(str(exc))}") from exc


def _checked_writer(
    dest: Path, *, digest: Digest, size: int, subject: str, hint: str
) -> Callable[[httpx.Response], None]:
    """A body consumer that leaves the body at ``dest`` only if it has ``digest`` and ``size``.

    Reading stops as soon as the body outgrows ``size``.
    """

    def write(response: httpx.Response) -> None:
        hasher = Hasher()
        with atomic_writer(dest) as out:
            for chunk in body(response):
                hasher.update(chunk)
                if hasher.size > size:
                    break
                out.write(chunk)
            if hasher.size != size or hasher.digest() != digest:
                got = f"{hasher.size} bytes" if hasher.size != size else hasher.digest()
                want = f"{size} bytes" if hasher.size != size else digest
                raise DebianError(
                    f"{subject}: {redact(str(response.request.url))} does not match "
                    f"(expected {want}, downloaded {got})",
                    hint=hint,
                )

    return write
