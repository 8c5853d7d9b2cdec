"""Credentials for private package indexes, found where uv users keep them.

A lock file never records credentials (see ``transfer.strip_credentials``), so a build
must find them again for every request to an index: its pages, its metadata files, its
wheels and sdists. They are looked up per realm (scheme, host and port), as uv does, in
this order:

1. user and password in a configured index URL (``--index-url``, ``[tool.imgbuild]``,
   ``[[tool.uv.index]] url``), or in the request's own URL;
2. ``UV_INDEX_<NAME>_USERNAME`` / ``UV_INDEX_<NAME>_PASSWORD`` for a ``[[tool.uv.index]]``
   with that ``name`` (upper-cased, other characters than letters and digits as ``_``);
3. ``~/.netrc`` (or the file ``NETRC`` names), by host.

They go out as HTTP Basic auth, only to a realm that is one of the configured indexes',
or listed in netrc; httpx drops them when a redirect leaves the origin (a CDN).
"""

from __future__ import annotations

import netrc
import os
import re
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

Realm = tuple[str, str, int]

AUTH_HINT = (
    "give the index's credentials: in its URL, as UV_INDEX_<NAME>_USERNAME and "
    "UV_INDEX_<NAME>_PASSWORD for a named [[tool.uv.index]], or in ~/.netrc"
)

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, kw_only=True, slots=True)
class IndexEntry:
    """A configured index: its URL and, for ``[[tool.uv.index]]``, its name."""

    url: str
    name: str | None = None


def realm(url: str | httpx.URL) -> Realm | None:
    """``(scheme, host, port)`` of an http(s) URL, else None."""
    parts = urlsplit(str(url))
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        return None
    return (scheme, parts.hostname.lower(), port)


def env_name(index: str) -> str:
    """``my-index`` -> ``MY_INDEX``, the name uv reads credentials under."""
    return re.sub(r"[^A-Z0-9]", "_", index.upper())


class IndexCredentials(httpx.Auth):
    """An httpx auth flow that adds Basic credentials for known index realms.

    A request that already carries an ``Authorization`` header (a registry's Bearer token)
    is left alone.
    """

    def __init__(
        self,
        entries: Iterable[IndexEntry],
        *,
        environ: Mapping[str, str] | None = None,
        netrc_path: Path | None = None,
    ) -> None:
        environ = os.environ if environ is None else environ
        self._realms: dict[Realm, tuple[str, str]] = {}
        for entry in entries:
            where = realm(entry.url)
            if where is None or where in self._realms:
                continue
            found = _from_url(entry.url)
            if found is None and entry.name:
                key = f"UV_INDEX_{env_name(entry.name)}"
                user, password = environ.get(f"{key}_USERNAME"), environ.get(f"{key}_PASSWORD")
                if user is not None or password is not None:
                    found = (user or "", password or "")
            if found is not None:
                self._realms[where] = found
        self._netrc = _read_netrc(netrc_path, environ)

    def credentials(self, url: str | httpx.URL) -> tuple[str, str] | None:
        """The user and password a request to ``url`` would carry, if any."""
        own = _from_url(str(url))
        if own is not None:
            return own
        where = realm(url)
        if where is None:
            return None
        known = self._realms.get(where)
        if known is not None:
            return known
        if self._netrc is not None:
            entry = self._netrc.authenticators(where[1])
            if entry is not None:
                return (entry[0] or "", entry[2] or "")
        return None

    def authenticated(self, url: str) -> str:
        """``url`` with its credentials in it, for a tool run as another process.

        Only the installer of build environments gets these (``build.pep517``): it cannot
        share this auth flow. Nothing inside the program carries such a URL.
        """
        found = self.credentials(url)
        if found is None or _from_url(url) is not None:
            return url
        parts = urlsplit(url)
        userinfo = f"{quote(found[0], safe='')}:{quote(found[1], safe='')}"
        return urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Add Basic credentials to ``request`` when its realm has some (httpx calls this)."""
        if "Authorization" not in request.headers:
            found = self.credentials(request.url)
            if found is not None:
                request.headers["Authorization"] = httpx.BasicAuth(*found)._auth_header
        yield request


def _from_url(url: str) -> tuple[str, str] | None:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return None
    return (unquote(parts.username or ""), unquote(parts.password or ""))


def _read_netrc(path: Path | None, environ: Mapping[str, str]) -> netrc.netrc | None:
    if path is None:
        named = environ.get("NETRC")
        path = Path(named) if named else Path.home() / ".netrc"
    if not path.is_file():
        return None
    try:
        return netrc.netrc(str(path))
    except (netrc.NetrcParseError, OSError):
        return None  # httpx would not use it either; the 401 then says what to do
