"""A built base from its recipe: packages resolved (or taken from the lock), then assembled.

``resolve_platform`` reads the suite, its ``-updates`` and ``-security`` suites (signed
Releases, hash-checked Packages indexes) and resolves the recipe's packages and the
project's system packages into two sets of locked .debs; ``assemble_base`` fetches them
(sha256-checked, cached) and makes the image: one layer of base packages and generated files,
one of system packages when there are any. An assembled base is recorded in the cache by
what went into it, so a warm build reads two JSON files and no .deb.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import httpx

from imagebuild.cache import write_json
from imagebuild.debian.archive import Release, fetch_deb, fetch_packages, fetch_release
from imagebuild.debian.assemble import RootfsSpec, assemble_layer
from imagebuild.debian.baselock import BaseInputs, PlatformDebs
from imagebuild.debian.closure import resolve_closure, to_locked
from imagebuild.debian.model import ArchiveSource, LockedDeb
from imagebuild.digest import Digest, parse_digest
from imagebuild.image.descriptor import Descriptor, json_object
from imagebuild.image.model import BaseImage, ImageConfig, Layer
from imagebuild.image.mutate import EPOCH as EPOCH_DATE
from imagebuild.image.mutate import build_image
from imagebuild.image.store import BlobStore
from imagebuild.report import Reporter
from imagebuild.target.recipe import DebianRecipe

ASSEMBLY_VERSION = 2
RESOLUTION_VERSION = 1
"""Bumped when the closure rules change what a recorded resolution would be."""
"""Bumped when assembly changes what a set of .debs becomes (invalidates cached bases)."""
EPOCH = 0
"""Every built base's file times and config date: a base depends on its packages only."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BaseRecipe:
    """One catalog entry's recipe with what the image config needs beside it."""

    flavor: str
    reference: str
    """The entry's reference (``imgbuild.invalid/<flavor>:<python>-<suite>``)."""
    interpreter: PurePosixPath
    user: str
    recipe: DebianRecipe

    def inputs(self, system_packages: Sequence[str]) -> BaseInputs:
        """What a lock of this base records as its inputs."""
        return BaseInputs(
            flavor=self.flavor,
            suite=self.recipe.suite,
            packages=tuple(sorted(self.recipe.packages)),
            system_packages=tuple(sorted(system_packages)),
            exclude=tuple(sorted(self.recipe.exclude)),
        )


def archive_sources(recipe: DebianRecipe) -> tuple[ArchiveSource, ...]:
    """The suites a base reads: the release, its updates and its security updates."""
    return (
        ArchiveSource(mirror=recipe.mirror, suite=recipe.suite),
        ArchiveSource(mirror=recipe.mirror, suite=f"{recipe.suite}-updates"),
        ArchiveSource(mirror=recipe.security_mirror, suite=f"{recipe.suite}-security"),
    )


def fetch_releases(http: httpx.Client, recipe: DebianRecipe, cache: Path) -> tuple[Release, ...]:
    """The verified Release of each suite the recipe reads."""
    keyring = Path(recipe.keyring)
    return tuple(
        fetch_release(http, source, keyring=keyring, cache=cache)
        for source in archive_sources(recipe)
    )


def resolve_platform(
    http: httpx.Client,
    recipe: DebianRecipe,
    *,
    arch: str,
    system_packages: Sequence[str],
    cache: Path,
    releases: Sequence[Release] | None = None,
) -> PlatformDebs:
    """The packages of the base layer and of the system-packages layer on ``arch``.

    System packages are resolved together with the base's, so an alternative the base
    already chose is kept, and the system layer holds only what the base lacks.
    """
    releases = releases if releases is not None else fetch_releases(http, recipe, cache)
    record = cache / "resolved" / f"{_resolution_key(releases, recipe, arch, system_packages)}.json"
    kept = _kept_resolution(record)
    if kept is not None:
        return kept
    indexes = [
        fetch_packages(http, release, component="main", arch=arch, cache=cache)
        for release in releases
    ]
    base = resolve_closure(indexes, recipe.packages, arch=arch, exclude=recipe.exclude)
    system: tuple[LockedDeb, ...] = ()
    if system_packages:
        wanted = (*recipe.packages, *system_packages)
        full = resolve_closure(indexes, wanted, arch=arch, exclude=recipe.exclude)
        have = {pkg.name for pkg in base}
        system = tuple(to_locked(pkg) for pkg in full if pkg.name not in have)
    debs = PlatformDebs(base=tuple(to_locked(pkg) for pkg in base), system=system)
    write_json(record, {"base": _rows(debs.base), "system": _rows(debs.system)})
    return debs


def _resolution_key(
    releases: Sequence[Release], recipe: DebianRecipe, arch: str, system: Sequence[str]
) -> str:
    """What a resolution depends on: the signed Releases (the archive as it was) and the ask.

    A warm build whose archive has not moved reads one small record instead of three parsed
    Packages indexes and two closures.
    """
    material = {
        "version": RESOLUTION_VERSION,
        "releases": [release.inrelease for release in releases],
        "packages": list(recipe.packages),
        "exclude": sorted(recipe.exclude),
        "system": sorted(system),
        "arch": arch,
    }
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _rows(debs: Sequence[LockedDeb]) -> list[list[object]]:
    return [[d.name, d.version, d.architecture, d.url, d.sha256, d.size] for d in debs]


def _kept_resolution(record: Path) -> PlatformDebs | None:
    """A resolution recorded by ``resolve_platform``, or None (absent or unreadable)."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        base, system = (
            tuple(
                LockedDeb(
                    name=n, version=v, architecture=a, url=u, sha256=parse_digest(h), size=int(z)
                )
                for n, v, a, u, h, z in data[group]
            )
            for group in ("base", "system")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return PlatformDebs(base=base, system=system)


def assemble_base(
    http: httpx.Client,
    base: BaseRecipe,
    debs: PlatformDebs,
    *,
    arch: str,
    cache: Path,
    store: BlobStore,
    reporter: Reporter,
) -> BaseImage:
    """The base image of ``debs`` on ``arch``: from the cache's record, or assembled now."""
    key = _assembly_key(base, debs, arch)
    record = cache / "bases" / f"{key}.json"
    cached = _from_record(record, base, store)
    if cached is not None:
        return cached
    count = len(debs.base) + len(debs.system)
    where = f"{base.flavor} ({base.recipe.suite}, {arch})"
    reporter.step(f"base: assembling {where} from {count} .deb{'s' if count != 1 else ''}")
    paths = fetch_deb_files(http, [*debs.base, *debs.system], base.recipe, cache)
    base_paths = [(deb, paths[deb.sha256]) for deb in debs.base]
    layers = [
        assemble_layer(
            base_paths,
            spec=_rootfs_spec(base, arch),
            store=store,
            mtime=EPOCH,
            created_by=f"imgbuild: {base.flavor} base, Debian {base.recipe.suite} "
            f"({len(debs.base)} packages)",
        ).layer
    ]
    if debs.system:
        layers.append(
            assemble_layer(
                [(deb, paths[deb.sha256]) for deb in debs.system],
                spec=None,
                below=[path for _, path in base_paths],
                store=store,
                mtime=EPOCH,
                created_by="imgbuild: system packages "
                + " ".join(sorted(d.name for d in debs.system)),
            ).layer
        )
    image = _image_of(base, layers, arch, store)
    write_json(
        record,
        {
            "manifest": image.manifest_digest,
            "layers": [d.to_json() for d in image.layers],
            "diff_ids": list(image.diff_ids),
        },
    )
    return image


def _image_of(base: BaseRecipe, layers: Sequence[Layer], arch: str, store: BlobStore) -> BaseImage:
    config = ImageConfig(
        cmd=(str(base.interpreter),),
        env=base.recipe.env,
        user=base.user,
    )
    image = build_image(
        None, layers, config=config, created=EPOCH_DATE, store=store, platform=("linux", arch)
    )
    return BaseImage(
        reference=base.reference,
        manifest_digest=image.digest,
        config=json_object(store.read_bytes(image.config.digest)),
        layers=tuple(layer.descriptor for layer in layers),
        diff_ids=tuple(layer.diff_id for layer in layers),
    )


def _from_record(record: Path, base: BaseRecipe, store: BlobStore) -> BaseImage | None:
    """The base a cache record names, if every blob of it is still in ``store``."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        if not store.has(Digest(data["manifest"])):
            return None  # assembled into another cache's store (a shared Debian cache)
        manifest = json_object(store.read_bytes(Digest(data["manifest"])))
        config_desc = Descriptor.from_json(manifest["config"])
        layers = tuple(Descriptor.from_json(d) for d in data["layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(store.has(d.digest) for d in (config_desc, *layers)):
        return None
    return BaseImage(
        reference=base.reference,
        manifest_digest=Digest(data["manifest"]),
        config=json_object(store.read_bytes(config_desc.digest)),
        layers=layers,
        diff_ids=tuple(Digest(d) for d in data["diff_ids"]),
    )


def fetch_deb_files(
    http: httpx.Client, debs: Sequence[LockedDeb], recipe: DebianRecipe, cache: Path
) -> dict[Digest, Path]:
    """Every .deb, four at a time (sha256-checked, cached), from the configured mirrors.

    The security archive's pool is ``pool/updates/``; everything else is the main archive's.
    """

    def fetch(deb: LockedDeb) -> Path:
        security = deb.pool_path.startswith("pool/updates/")
        mirror = recipe.security_mirror if security else recipe.mirror
        return fetch_deb(http, deb, cache=cache, mirror=mirror)

    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="imgbuild-deb") as pool:
        paths = list(pool.map(fetch, debs))
    return {deb.sha256: path for deb, path in zip(debs, paths, strict=True)}


def _rootfs_spec(base: BaseRecipe, arch: str) -> RootfsSpec:
    recipe = base.recipe
    return RootfsSpec(
        arch=arch,
        accounts=recipe.accounts,
        groups=recipe.groups,
        symlinks=recipe.symlinks,
    )


def _assembly_key(base: BaseRecipe, debs: PlatformDebs, arch: str) -> str:
    """What an assembled base depends on: the .debs, the generated files, the config."""
    recipe = base.recipe
    material = {
        "version": ASSEMBLY_VERSION,
        "arch": arch,
        "reference": base.reference,
        "interpreter": str(base.interpreter),
        "user": base.user,
        "accounts": [[a.name, a.uid, a.gid, a.home, a.shell] for a in recipe.accounts],
        "groups": [[g.name, g.gid] for g in recipe.groups],
        "symlinks": [list(link) for link in recipe.symlinks],
        "env": [list(pair) for pair in recipe.env],
        "base": [d.sha256 for d in debs.base],
        "system": [d.sha256 for d in debs.system],
    }
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
