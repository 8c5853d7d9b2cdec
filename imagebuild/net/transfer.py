"""Transfers the index, sdist and fetch stages share: one GET with its retries, to a file.

``fetch_retrying`` is the one place a download is retried when its body breaks off part-way;
``write_stream`` streams a body to a file with its digest; messages never show credentials
(``redact``, ``redact_text``) and say plainly which limit a slow server ran into
(``failure_text``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

from imagebuild.cache import atomic_writer
from imagebuild.digest import Hasher, digest_hex
from imagebuild.net.http import (
    RETRY_ERRORS,
    Deadline,
    TransferDeadlineExceeded,
    attempts,
    client_policy,
    note_attempts,
    with_deadline,
)

CHUNK = 1 << 16
"""Read size for files read in pieces (a response body is taken as it arrives: ``body``)."""
NETWORK_HINT = "check the network and the index URL"
"""The hint for failures the user can only retry or reconfigure."""

_T = TypeVar("_T")
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")


def fetch_retrying(
    http: httpx.Client,
    url: str,
    consume: Callable[[httpx.Response], _T],
    *,
    headers: Mapping[str, str] | None = None,
    size: int | None = None,
) -> _T:
    """GET ``url`` and return ``consume(response)``; a body that breaks off is fetched again.

    ``consume`` gets the streamed response, checks its status and reads its body; when
    reading fails with a transport error (reset, truncated body, read timeout) the request
    is sent again, on the same bound of attempts the client's retry transport counts (a
    retry after the headers and one before them both spend one) and with the same backoff.
    ``consume`` must leave nothing behind when it raises: write through
    ``cache.atomic_writer``, never to the final path.

    The whole transfer, every attempt and wait included, ends by one deadline:
    ``Timeouts.budget(size)`` of the client's timeouts, ``size`` being what the lock or
    index says the file weighs (None: unknown). The last transport error propagates, with
    ``attempts(exc)`` telling how many attempts were made; ``TransferDeadlineExceeded`` when
    the deadline ended it.
    """
    policy, timeouts = client_policy(http)
    deadline = Deadline(timeouts.budget(size))
    first = 1
    while True:
        extensions = with_deadline(None, deadline, first_attempt=first)
        with http.stream(
            "GET", url, headers=headers, follow_redirects=True, extensions=extensions
        ) as response:
            used = attempts(response)
            try:
                return consume(response)
            except RETRY_ERRORS as exc:
                wait = policy.delay(used, None)
                if (
                    used >= policy.attempts
                    or isinstance(exc, TransferDeadlineExceeded)
                    or not deadline.allows(wait)
                ):
                    note_attempts(exc, used)
                    raise
        policy.sleep(wait)
        first = used + 1


def body(response: httpx.Response) -> Iterator[bytes]:
    """``response``'s body, decoded (Content-Encoding undone), in the pieces it arrives in.

    Not cut to a fixed size: httpx would gather the pieces into a buffer and slice it, two
    copies of every byte and a buffer of that size per download (a FastAPI CI run pulling
    38 MB of layers, four at a time, peaked 17 MiB higher that way).
    """
    return response.iter_bytes()


def write_stream(response: httpx.Response, dest: Path) -> str:
    """Write a streamed response's body to ``dest``; return its sha256 hex.

    ``dest`` appears only whole (``atomic_writer``): a body that breaks off leaves no file.
    ``iter_bytes`` undoes transfer Content-Encoding, so the file's own bytes are hashed.
    """
    hasher = Hasher()
    with atomic_writer(dest) as out:
        for chunk in body(response):
            hasher.update(chunk)
            out.write(chunk)
    return digest_hex(hasher.digest())


def failure_text(exc: BaseException) -> str:
    """A transport failure in words: which limit a timeout hit, else the error's own text."""
    if isinstance(exc, TransferDeadlineExceeded):
        return one_line(exc)
    limits = _timeouts_of(exc)
    if isinstance(exc, httpx.ReadTimeout) and "read" in limits:
        return f"the server sent nothing for {limits['read']:g} s (read timeout)"
    if isinstance(exc, httpx.ConnectTimeout) and "connect" in limits:
        return f"no connection within {limits['connect']:g} s (connect timeout)"
    return redact_text(one_line(exc))


def _timeouts_of(exc: BaseException) -> dict[str, float]:
    if not isinstance(exc, httpx.RequestError):
        return {}
    try:
        request = exc.request
    except RuntimeError:  # raised without a request
        return {}
    timeouts = request.extensions.get("timeout") or {}
    return {k: v for k, v in timeouts.items() if isinstance(v, int | float)}


def redact(url: str) -> str:
    """``url`` with any user/password replaced by ``***`` (for messages and caches)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def redact_text(text: str) -> str:
    """``text`` with the user/password of every URL in it replaced by ``***``.

    For messages that quote a foreign error, which may hold a URL of its own.
    """
    return _USERINFO.sub(r"\g<scheme>***@", text)


def strip_credentials(url: str) -> str:
    """``url`` without user and password (what a lock file may record, as uv does)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def one_line(exc: BaseException | str) -> str:
    """An exception's text with all whitespace folded, for one-line messages."""
    return " ".join(str(exc).split())
