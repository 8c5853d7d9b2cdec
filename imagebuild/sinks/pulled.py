"""What a pulled index, manifest and config must say, checked for ``sinks.remote``.

Each check raises a ``RegistryError`` of one line naming the image and what is wrong in it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from imagebuild.digest import Digest
from imagebuild.errors import ImageError, RegistryError
from imagebuild.image.descriptor import Descriptor, checked_digest, json_object
from imagebuild.sinks.auth import Op


def platform_text(platform: object) -> str:
    """``os/architecture[/variant]`` of an index entry's platform, or ``unknown``."""
    if not isinstance(platform, dict):
        return "unknown"
    parts = [str(platform.get("os", "?")), str(platform.get("architecture", "?"))]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


def json_object_of(data: bytes, op: Op, what: str) -> dict[str, object]:
    """``data`` as a JSON object; else a ``RegistryError`` naming ``what``."""
    try:
        return json_object(data)
    except ValueError as exc:
        raise RegistryError(f"{op.verb} {op.ref}: {what} {exc}") from None


def descriptor_of(obj: object, op: Op, where: str) -> Descriptor:
    """``obj`` as a descriptor; else a ``RegistryError`` naming ``where``."""
    try:
        return Descriptor.from_json(obj, where=where)
    except ImageError as exc:
        raise RegistryError(f"{op.verb} {op.ref}: {exc.message}") from None


def select_platform(op: Op, index: Mapping[str, object], platform: Sequence[str]) -> Descriptor:
    """The entry of ``index`` for ``platform`` (os, architecture[, variant]).

    Entries for ``unknown/...`` (attestations) are passed over; none that fits names the
    platforms there are.
    """
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise RegistryError(f"pulling {op.ref}: image index has no manifests list")
    os_name, arch = platform[0], platform[1]
    variant = platform[2] if len(platform) > 2 else None
    available: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        plat = entry.get("platform")
        text = platform_text(plat)
        if text.startswith("unknown/"):  # attestation manifests
            continue
        available.append(text)
        if not isinstance(plat, dict):
            continue
        if plat.get("os") != os_name or plat.get("architecture") != arch:
            continue
        if variant is not None and plat.get("variant") not in (None, variant):
            continue
        return descriptor_of(entry, op, f"index manifests[{i}]")
    wanted = "/".join(platform)
    raise RegistryError(
        f"pulling {op.ref}: no image for {wanted}; available: {', '.join(available) or 'none'}",
        hint="pick one of the available platforms with --platform",
    )


def checked_config(
    op: Op, config: Mapping[str, object], platform: Sequence[str], layers: int
) -> tuple[Digest, ...]:
    """The pulled config's diff_ids, after checking its platform and its layer count."""
    ref = op.ref
    wanted = "/".join(platform[:2])
    found = f"{config.get('os')}/{config.get('architecture')}"
    if found != wanted:
        raise RegistryError(
            f"pulling {ref}: image is for {found}, not {wanted}",
            hint=f"use a base image published for {wanted} or build for {found}",
        )
    rootfs = config.get("rootfs")
    raw_diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(raw_diff_ids, list) or len(raw_diff_ids) != layers:
        raise RegistryError(
            f"pulling {ref}: config rootfs.diff_ids does not list one entry per layer"
        )
    try:
        return tuple(checked_digest(str(d)) for d in raw_diff_ids)
    except ImageError as exc:
        raise RegistryError(f"pulling {ref}: config rootfs.diff_ids: {exc.message}") from None
