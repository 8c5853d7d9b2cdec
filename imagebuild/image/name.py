"""Image names: references (``registry/repository[:tag][@digest]``) and registry mirrors.

Pointing tests (or an air-gapped build) at a local registry: ``ImageReference.with_mirrors``
rewrites the registry host and keeps the repository path, so with the mirror map
``parse_mirrors("docker.io=127.0.0.1:5055")`` the base ``python:3.11-slim`` is pulled from
``127.0.0.1:5055/library/python:3.11-slim``. Loopback hosts are spoken to over plain HTTP,
everything else over HTTPS (``registry_url``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from imagebuild.digest import Digest, parse_digest
from imagebuild.errors import RegistryError

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_DOCKER_HUB_API = "registry-1.docker.io"

# distribution/reference grammar, reduced to what we accept.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_HOST_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?$"
)


def normalize_registry(host: str) -> str:
    """``host`` lowercased, with Docker Hub's aliases as ``docker.io``."""
    host = host.lower()
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def _split_name(name: str, original: str) -> tuple[str, str]:
    """``(registry, repository)`` of a name without tag or digest, normalised and checked."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repository = normalize_registry(first), rest
        if not _HOST_RE.match(first):
            raise RegistryError(f"image reference {original!r}: invalid registry {first!r}")
    else:
        registry, repository = DOCKER_HUB, name
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if repository != repository.lower() and _REPOSITORY_RE.match(repository.lower()):
        raise RegistryError(f"image reference {original!r}: repository name must be lowercase")
    if not _REPOSITORY_RE.match(repository) or len(repository) > 255:
        raise RegistryError(
            f"image reference {original!r}: invalid repository name {repository!r}",
            hint="use lowercase letters, digits and separators (. _ __ -), e.g. org/app",
        )
    return registry, repository


def _pinned_digest(digest: str, original: str) -> Digest:
    """The text after ``@`` as a digest; only sha256 is supported."""
    if not digest:
        raise RegistryError(f"image reference {original!r}: empty digest after '@'")
    algorithm, sep, value = digest.partition(":")
    if not sep or not algorithm or not value:
        raise RegistryError(f"image reference {original!r}: invalid digest {digest!r}")
    try:
        return parse_digest(digest)
    except ValueError:
        raise RegistryError(
            f"image reference {original!r}: only sha256:<64 hex> digests are supported"
        ) from None


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageReference:
    """A fully qualified image reference: ``registry/repository[:tag][@digest]``."""

    registry: str
    """Registry host, with a port when it has one: ``docker.io``, ``ghcr.io``,
    ``127.0.0.1:5055``."""
    repository: str
    """Repository path, e.g. ``library/python`` (Docker Hub official images live under
    ``library/``)."""
    tag: str | None = None
    """The tag; ``latest`` when the text named neither a tag nor a digest."""
    digest: Digest | None = None
    """A pinned manifest digest (``@sha256:...``); it wins over the tag when pulling."""

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Parse ``text`` with Docker's normalisation.

        No registry means ``docker.io``; a one-component name on Docker Hub gets ``library/``;
        no tag and no digest means ``:latest``. The first path component is a registry when it
        contains ``.`` or ``:`` or is ``localhost``. Raises ``RegistryError`` when invalid.
        """
        original = text
        text = text.strip()
        if not text:
            raise RegistryError("empty image reference", hint="use e.g. python:3.11-slim")
        name, at, digest = text.partition("@")
        tag: str | None = None
        slash = name.rfind("/")
        colon = name.rfind(":")
        if colon > slash:
            name, tag = name[:colon], name[colon + 1 :]
        registry, repository = _split_name(name, original)
        if tag is not None and not _TAG_RE.match(tag):
            raise RegistryError(f"image reference {original!r}: invalid tag {tag!r}")
        pinned = _pinned_digest(digest, original) if at else None
        if tag is None and pinned is None:
            tag = "latest"
        return cls(registry=registry, repository=repository, tag=tag, digest=pinned)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when pinned, else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or "latest"

    def with_tag(self, tag: str) -> ImageReference:
        """The same repository at ``tag`` (dropping any digest)."""
        if not _TAG_RE.match(tag):
            raise RegistryError(f"invalid tag {tag!r} for {self.name}")
        return ImageReference(registry=self.registry, repository=self.repository, tag=tag)

    def with_digest(self, digest: Digest) -> ImageReference:
        """The same repository and tag, pinned to ``digest``."""
        return ImageReference(
            registry=self.registry, repository=self.repository, tag=self.tag, digest=digest
        )

    def with_mirrors(self, mirrors: Mapping[str, str]) -> ImageReference:
        """Rewrite the registry host through ``mirrors`` (``{"docker.io": "127.0.0.1:5055"}``).

        The repository path, tag and digest are kept, so ``python:3.11-slim`` becomes
        ``127.0.0.1:5055/library/python:3.11-slim``. Hosts not in the map are unchanged.
        """
        for source, target in mirrors.items():
            if normalize_registry(source) == self.registry:
                return ImageReference(
                    registry=normalize_registry(target),
                    repository=self.repository,
                    tag=self.tag,
                    digest=self.digest,
                )
        return self


def parse_mirrors(text: str) -> dict[str, str]:
    """Parse ``"docker.io=127.0.0.1:5055,gcr.io=127.0.0.1:5055"`` into a host → host map.

    Empty text gives an empty map. Hosts are normalised (``index.docker.io`` → ``docker.io``).
    """
    mirrors: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        source, sep, target = item.partition("=")
        source, target = source.strip(), target.strip()
        if not sep or not source or not target:
            raise RegistryError(
                f"registry mirror {item!r} is not of the form host=mirror",
                hint="write e.g. docker.io=127.0.0.1:5055,gcr.io=127.0.0.1:5055",
            )
        for host in (source, target):
            if not _HOST_RE.match(host):
                raise RegistryError(f"registry mirror {item!r}: {host!r} is not a host[:port]")
        mirrors[normalize_registry(source)] = normalize_registry(target)
    return mirrors


def _is_loopback(host: str) -> bool:
    if host.startswith("["):
        bare = host[1 : host.find("]")]
    else:
        bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def registry_url(registry: str) -> str:
    """The distribution API's base URL for ``registry``: HTTP for loopback hosts, else HTTPS."""
    host = _DOCKER_HUB_API if registry == DOCKER_HUB else registry
    scheme = "http" if _is_loopback(host) else "https"
    return f"{scheme}://{host}"
