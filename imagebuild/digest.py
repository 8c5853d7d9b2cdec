"""The one digest type and its one parser: always the string ``sha256:<64 lowercase hex>``.

Lock files and index pages may give a sha256 as bare hex; it becomes a ``Digest`` here, at
the edge, and is carried prefixed everywhere after that.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import NewType

Digest = NewType("Digest", str)
"""A content digest, ``sha256:<hex>``; never bare hex."""

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def is_digest(text: str) -> bool:
    """Whether ``text`` is exactly ``sha256:<64 lowercase hex digits>``."""
    algorithm, sep, value = text.partition(":")
    return bool(sep) and algorithm == "sha256" and _HEX64.fullmatch(value) is not None


def parse_digest(text: str, *, bare_hex: bool = False) -> Digest:
    """``text`` as a ``Digest``, or ``ValueError`` naming it.

    With ``bare_hex``, ``<hex>`` and any letter case are accepted too (lock files and index
    pages write sha256 values that way) and normalised to ``sha256:<lowercase hex>``.
    """
    if bare_hex:
        algorithm, sep, value = text.partition(":")
        if not sep:
            algorithm, value = "sha256", text
        candidate = f"{algorithm.lower()}:{value.lower()}"
    else:
        candidate = text
    if not is_digest(candidate):
        raise ValueError(f"not a sha256 digest: {text!r} (expected sha256:<64 hex digits>)")
    return Digest(candidate)


def digest_hex(digest: Digest) -> str:
    """The hex part of ``digest`` (a blob's file name under ``sha256/``)."""
    return digest.removeprefix("sha256:")


def digest_bytes(data: bytes) -> Digest:
    """The digest of ``data``."""
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def digest_file(path: Path) -> Digest:
    """The digest of the file at ``path``, read in 1 MiB chunks."""
    hasher = Hasher()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.digest()


class Hasher:
    """A digest computed piece by piece, for bytes that stream past (downloads, copies).

    It counts the bytes too, since a check against a lock compares both.
    """

    __slots__ = ("_hash", "size")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0
        """Bytes seen so far."""

    def update(self, data: bytes) -> None:
        """Add ``data`` to what has been seen."""
        self._hash.update(data)
        self.size += len(data)

    def digest(self) -> Digest:
        """The digest of everything seen so far (more may be added after)."""
        return Digest("sha256:" + self._hash.hexdigest())
