"""``imgbuild inspect``: the layer table of an existing image, in a registry or a layout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from imagebuild.errors import ProjectError
from imagebuild.image.listing import ImageListing, build_listing, read_layout_listing
from imagebuild.image.name import ImageReference

if TYPE_CHECKING:
    from imagebuild.sinks.remote import RegistryClient


def read_listing(target: str, platform: str, registry: RegistryClient) -> ImageListing:
    """The listing of ``target``: ``oci:DIR``, ``oci-archive:FILE`` or an image reference."""
    os_name, sep, arch = platform.partition("/")
    if not sep or not os_name or not arch:
        raise ProjectError(
            f"--platform {platform!r}: not os/arch", hint="use e.g. linux/amd64 or linux/arm64"
        )
    for prefix, archive in (("oci:", False), ("oci-archive:", True)):
        if target.startswith(prefix):
            path = target.removeprefix(prefix)
            if not path:
                raise ProjectError(f"{target!r}: needs a path", hint=f"write {prefix}PATH")
            return read_layout_listing(
                Path(path), archive=archive, platform=platform, source=target
            )
    ref = ImageReference.parse(target)
    digest, manifest, config = registry.fetch_image_json(ref, platform=(os_name, arch))
    return build_listing(manifest, config, source=str(ref), digest=digest)
