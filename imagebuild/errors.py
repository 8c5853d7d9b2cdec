"""The imgbuild exception tree.

Every failure a user can cause or fix is an ``ImagebuildError``; ``cli.py`` prints its
message (and hint) on one line of stderr and exits 1. Anything else escaping is a bug.

    ImagebuildError
    ├── ProjectError        pyproject.toml / [tool.imgbuild] is missing or invalid
    ├── TargetError         base image facts, wheel tags, no compatible wheel
    ├── PackageIndexError   the package index did not answer as expected
    ├── ResolutionError     requirements cannot be satisfied
    ├── LockError           lock file unreadable, stale (--locked) or unusable
    ├── FetchError          download failed or a hash did not match
    ├── BuildError          the project's PEP 517 backend failed
    ├── LayerError          installing wheels or compiling bytecode failed
    ├── ImageError          OCI config/manifest/layout problems
    ├── DebianError         a Debian-built base: archive, signature, closure, .deb, library
    ├── RegistryError       registry protocol, auth or transport failure
    └── DockerError         the Docker engine refused or failed
"""

from __future__ import annotations


class ImagebuildError(Exception):
    """A failure the user can act on: ``message`` says what and where, ``hint`` how to fix."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}; {self.hint}"
        return self.message


class ProjectError(ImagebuildError):
    """pyproject.toml or ``[tool.imgbuild]`` is missing or invalid."""


class TargetError(ImagebuildError):
    """The target platform cannot be determined or no wheel fits it."""


class PackageIndexError(ImagebuildError):
    """The package index failed or answered something unusable."""


class ResolutionError(ImagebuildError):
    """The requirements cannot be satisfied together."""


class LockError(ImagebuildError):
    """A lock file is unreadable, stale or unusable for this build."""


class FetchError(ImagebuildError):
    """A download failed or did not match its recorded hash."""


class BuildError(ImagebuildError):
    """The project's own PEP 517 build failed."""


class LayerError(ImagebuildError):
    """Installing wheels into a layer or compiling bytecode failed."""


class ImageError(ImagebuildError):
    """An OCI image, layout or archive is invalid or cannot be written."""


class DebianError(ImagebuildError):
    """A base built from Debian packages: the archive, a package's closure, a .deb, a library."""


class RegistryError(ImagebuildError):
    """A registry refused a request, failed authentication or was unreachable."""


class DockerError(ImagebuildError):
    """The Docker engine refused or failed an operation."""
