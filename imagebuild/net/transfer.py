"""Small HTTP helpers the index, sdist and fetch stages share.

Streaming a body to a file with its sha256, and messages that never show credentials.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

CHUNK = 1 << 16
"""Read size for streamed downloads."""
NETWORK_HINT = "check the network and the index URL"
"""The hint for failures the user can only retry or reconfigure."""


def write_stream(response: httpx.Response, dest: Path) -> str:
    """Write a streamed response's body to ``dest``; return its sha256 hex.

    ``iter_bytes`` undoes transfer Content-Encoding, so the file's own bytes are hashed.
    """
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for chunk in response.iter_bytes(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def redact(url: str) -> str:
    """``url`` with any user/password replaced by ``***`` (for messages and caches)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def strip_credentials(url: str) -> str:
    """``url`` without user and password (what a lock file may record, as uv does)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def one_line(exc: BaseException | str) -> str:
    """An exception's text with all whitespace folded, for one-line messages."""
    return " ".join(str(exc).split())
