"""Which platforms a base given by reference is published for, and the lock's share of them.

A lock covers the platforms asked for (``[tool.imgbuild] platforms``, by default
linux/amd64 and linux/arm64), but only those the base is published for: most private
bases, and many public ones, exist for one CPU. An image index lists its platforms; a
single image's manifest is for one platform, learnt by pulling it for each asked one.
A narrower lock is said, as a warning; none in common is an error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from imagebuild.errors import ProjectError, RegistryError
from imagebuild.image.name import ImageReference

if TYPE_CHECKING:
    from imagebuild.image.model import BaseImage
    from imagebuild.image.store import BlobStore
    from imagebuild.pipeline.ports import Registry
    from imagebuild.report import Reporter


def index_platforms(body: bytes) -> tuple[str, ...] | None:
    """The ``os/architecture`` entries of an image index; None for anything else.

    Attestation entries (``unknown/unknown``) are no platform.
    """
    try:
        data = json.loads(body)
    except ValueError:
        return None
    manifests = data.get("manifests") if isinstance(data, dict) else None
    if not isinstance(manifests, list) or not manifests:
        return None
    found = set()
    for entry in manifests:
        platform = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(platform, dict):
            continue
        os_name, arch = platform.get("os"), platform.get("architecture")
        if isinstance(os_name, str) and isinstance(arch, str) and "unknown" not in (os_name, arch):
            found.add(f"{os_name}/{arch}")
    return tuple(sorted(found))


def pull_published(
    registry: Registry,
    ref: ImageReference,
    *,
    body: bytes,
    archs: Sequence[str],
    store: BlobStore,
    reporter: Reporter | None,
) -> dict[str, BaseImage]:
    """The base pulled for each of ``archs`` it is published for (at least one).

    ``body`` is the manifest (or index) ``ref`` names, already fetched.
    """
    published = index_platforms(body)
    pulled: dict[str, BaseImage] = {}
    if published is not None:
        for arch in archs:
            if f"linux/{arch}" in published:
                pulled[arch] = registry.pull_image(ref, platform=("linux", arch), store=store)
        shown = ", ".join(published) or "no platform"
    else:
        # One image, for one platform: the asked ones it is not for fail to pull.
        failures: list[RegistryError] = []
        for arch in archs:
            try:
                pulled[arch] = registry.pull_image(ref, platform=("linux", arch), store=store)
            except RegistryError as exc:
                failures.append(exc)
        if not pulled:
            raise failures[0]
        shown = ", ".join(f"linux/{arch}" for arch in pulled)
    asked = ", ".join(f"linux/{arch}" for arch in archs)
    if not pulled:
        raise ProjectError(
            f"base {ref} is published for {shown}, none of the lock's platforms ({asked})",
            hint="set [tool.imgbuild] platforms to a platform the base has, or use another base",
        )
    if len(pulled) < len(archs) and reporter is not None:
        covered = ", ".join(f"linux/{arch}" for arch in pulled)
        reporter.warn(
            f"base {ref} is published for {shown} only: the lock covers {covered}, not {asked}"
        )
    return pulled
