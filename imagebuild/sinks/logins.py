"""Registry logins: who we are to each registry.

Logins come from an explicit ``--username``/``--password-stdin`` or from Docker's
``config.json``; docker-py decodes its ``auths`` entries and runs its credential helpers.
``sinks.auth`` sends them as its challenges ask.
"""

from __future__ import annotations

import binascii
import json
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# docker-py (docker.auth, docker.credentials, docker.errors) is imported where a login is
# read: most builds have none to read, and importing it costs a tenth of a second.
from imagebuild.errors import RegistryError
from imagebuild.image.name import DOCKER_HUB, normalize_registry


@dataclass(frozen=True, kw_only=True, slots=True)
class Credentials:
    """A login for one registry."""

    username: str
    """User name (``<token>`` when ``password`` is an identity token, as Docker writes it)."""
    password: str = field(repr=False)
    """Password or personal access token."""
    identity_token: str | None = field(default=None, repr=False)
    """An OAuth2 refresh token (``identitytoken`` in config.json), exchanged for access tokens."""


def _normalize_auth_key(key: str) -> str:
    """Docker's config keys may be hosts or URLs (``https://index.docker.io/v1/``)."""
    import docker.auth

    host = docker.auth.convert_to_hostname(re.sub(r"^[a-z]+://", "", key.strip()))
    return normalize_registry(host)


def _helper_server_url(registry: str) -> str:
    import docker.auth

    return str(docker.auth.INDEX_URL) if registry == DOCKER_HUB else registry


def _ask_credential_helper(suffix: str, server_url: str) -> Credentials | None:
    """Ask ``docker-credential-<suffix> get`` (docker-py runs it); ``None`` when it has nothing.

    A missing or failing helper falls back to anonymous access, which then fails with an
    "unauthorized" error naming the fix; docker-py's own resolver would raise instead.
    """
    import docker.auth
    import docker.credentials

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # docker-py warns when the helper is not installed
        store = docker.credentials.Store(suffix)
    try:
        reply = store.get(server_url)
        username, secret = str(reply["Username"]), str(reply["Secret"])
    except (docker.credentials.StoreError, ValueError, KeyError, TypeError):
        return None
    if username == docker.auth.TOKEN_USERNAME:
        return Credentials(username=username, password="", identity_token=secret)
    return Credentials(username=username, password=secret)


@dataclass(frozen=True, kw_only=True, slots=True)
class CredentialStore:
    """Registry logins: explicit ones and those from Docker's ``config.json``.

    Lookup follows docker-py: ``credHelpers[host]``, then ``credsStore``, then ``auths``. The
    CLI decides where config.json is (``$DOCKER_CONFIG`` or ``~/.docker``); this class never
    reads the environment. The lookup is ours, not docker-py's ``AuthConfig``: that one raises
    when a helper fails (we go anonymous), folds fewer Docker Hub aliases, and reads a broken
    config.json silently as a legacy file (we say which file is broken).
    """

    auths: tuple[tuple[str, Credentials], ...] = ()
    """Logins by normalised registry host (``docker.io``, ``ghcr.io``, ``127.0.0.1:5055``)."""
    cred_helpers: tuple[tuple[str, str], ...] = ()
    """Per-registry credential helper suffixes (``credHelpers``)."""
    creds_store: str | None = None
    """The default credential helper suffix (``credsStore``)."""
    helper: Callable[[str, str], Credentials | None] = field(
        default=_ask_credential_helper, repr=False, compare=False
    )
    """Runs a helper: ``(suffix, server_url) -> Credentials | None`` (tests replace it)."""

    @classmethod
    def from_login(cls, registry: str, username: str, password: str) -> CredentialStore:
        """A store holding one explicit login (e.g. ``--username`` / ``--password-stdin``)."""
        creds = Credentials(username=username, password=password)
        return cls(auths=((_normalize_auth_key(registry), creds),))

    @classmethod
    def from_docker_config(cls, path: Path | None) -> CredentialStore:
        """Read a Docker ``config.json``; a missing file (or ``None``) gives an empty store."""
        if path is None:
            return cls()
        raw = _read_docker_config(path)
        auths: dict[str, Credentials] = {}
        raw_auths = raw.get("auths")
        for key, entry in (raw_auths if isinstance(raw_auths, dict) else {}).items():
            if not isinstance(entry, dict):
                continue
            creds = _decode_auth_entry(entry, path=path, key=str(key))
            if creds is not None:
                auths.setdefault(_normalize_auth_key(str(key)), creds)
        raw_helpers = raw.get("credHelpers")
        helpers = {
            _normalize_auth_key(str(k)): str(v)
            for k, v in (raw_helpers if isinstance(raw_helpers, dict) else {}).items()
            if isinstance(v, str) and v
        }
        store = raw.get("credsStore")
        return cls(
            auths=tuple(sorted(auths.items())),
            cred_helpers=tuple(sorted(helpers.items())),
            creds_store=store if isinstance(store, str) and store else None,
        )

    def get(self, registry: str) -> Credentials | None:
        """The login for ``registry`` (a normalised host), or ``None`` to go anonymous."""
        registry = normalize_registry(registry)
        helper = dict(self.cred_helpers).get(registry) or self.creds_store
        if helper:
            found = self.helper(helper, _helper_server_url(registry))
            if found is not None:
                return found
        return dict(self.auths).get(registry)


def _read_docker_config(path: Path) -> dict[str, object]:
    """The JSON object in ``path``; empty when there is no file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RegistryError(
            f"Docker config {path}: cannot read: {exc}",
            hint="fix or remove the file, or point DOCKER_CONFIG elsewhere",
        ) from None
    if not isinstance(raw, dict):
        raise RegistryError(f"Docker config {path}: expected a JSON object")
    return raw


def _decode_auth_entry(entry: Mapping[str, object], *, path: Path, key: str) -> Credentials | None:
    """One ``auths`` entry as docker-py decodes it (``auth`` is base64 of ``user:password``)."""
    import docker.auth
    import docker.errors

    try:
        parsed = docker.auth.parse_auth({key: dict(entry)}, raise_on_error=True).get(key) or {}
    except (ValueError, binascii.Error, UnicodeError, docker.errors.InvalidConfigFile):
        raise RegistryError(
            f"Docker config {path}: auths[{key!r}].auth is not base64 of user:password",
            hint=f"run docker login {key} again",
        ) from None
    identity = parsed.get("IdentityToken")
    username = parsed.get("username", entry.get("username"))
    password = parsed.get("password", entry.get("password"))
    if isinstance(identity, str) and identity:
        name = entry.get("username")
        return Credentials(
            username=name if isinstance(name, str) else docker.auth.TOKEN_USERNAME,
            password="",
            identity_token=identity,
        )
    if isinstance(username, str) and username and isinstance(password, str):
        return Credentials(username=username, password=password)
    return None
