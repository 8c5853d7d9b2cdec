"""The base image as the pipeline sees it: pinned, pulled, inspected once, made a target.

A base's facts (interpreter, libc, shell) are read off its layers once per manifest digest
and kept as a JSON record in the cache; a lock's targets come from the catalog entry, or
from pulling a base given by reference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from imagebuild.cache import CacheLayout, write_json
from imagebuild.digest import Digest, digest_hex
from imagebuild.errors import ProjectError
from imagebuild.image.name import ImageReference
from imagebuild.lock.inputs import project_inputs
from imagebuild.lock.model import LockInputs
from imagebuild.project.settings import ImageSettings
from imagebuild.project.spec import ProjectSpec
from imagebuild.target.base import BaseFacts, CatalogEntry, inspect_layers
from imagebuild.target.choose import base_reference
from imagebuild.target.platform import TargetPlatform

if TYPE_CHECKING:
    from imagebuild.image.model import BaseImage
    from imagebuild.image.store import BlobStore, LayerFiles
    from imagebuild.pipeline.ports import Registry
    from imagebuild.report import Reporter


def pinned_reference(reference: str, pinned: Mapping[str, Digest]) -> ImageReference:
    """``reference`` at the digest a lock recorded for it, if any."""
    ref = ImageReference.parse(reference)
    digest = pinned.get(reference)
    return ref.with_digest(digest) if digest and ref.digest is None else ref


def target_of(arch: str, facts: BaseFacts | CatalogEntry) -> TargetPlatform:
    """The target platform a base's facts (or its catalog entry) define on ``arch``."""
    return TargetPlatform.from_oci(
        architecture=arch,
        python_version=facts.python_version,
        libc="musl" if facts.libc == "musl" else "glibc",
        libc_version=facts.libc_version,
    )


def base_facts(
    base: BaseImage, store: LayerFiles, cache: Path, arch: str, entry: CatalogEntry | None
) -> BaseFacts:
    """Inspect the base once per manifest digest; the answer is cached as JSON."""
    known = known_facts(base, cache)
    if known is not None:
        return known
    facts = inspect_layers([store.path(d.digest) for d in base.layers], arch=arch, expected=entry)
    write_json(_facts_record(base, cache), facts_json(facts))
    return facts


def known_facts(base: BaseImage, cache: Path) -> BaseFacts | None:
    """The base's facts as the cache keeps them, or None (unknown, or not ours to read)."""
    try:
        data = json.loads(_facts_record(base, cache).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not kept, or damaged: read off the layers again
    return facts_from_json(data)


def remember_facts(base: BaseImage, cache: Path, data: object) -> BaseFacts | None:
    """Keep ``data`` (``facts_json``'s, from elsewhere) as the base's facts, if it reads so."""
    facts = facts_from_json(data)
    if facts is not None:
        write_json(_facts_record(base, cache), facts_json(facts))
    return facts


def facts_json(facts: BaseFacts) -> dict[str, object]:
    """``facts`` as the cache's JSON record holds them."""
    return {
        "interpreter": str(facts.interpreter),
        "python_version": list(facts.python_version),
        "libc": facts.libc,
        "libc_version": list(facts.libc_version),
        "shell": facts.shell,
        "arch": facts.arch,
    }


def facts_from_json(data: object) -> BaseFacts | None:
    """The facts a JSON record holds; None when it does not read as ``facts_json``'s."""
    if not isinstance(data, dict):
        return None
    try:
        facts = BaseFacts(
            interpreter=PurePosixPath(data["interpreter"]),
            python_version=(int(data["python_version"][0]), int(data["python_version"][1])),
            libc=data["libc"],
            libc_version=(int(data["libc_version"][0]), int(data["libc_version"][1])),
            shell=bool(data["shell"]),
            arch=str(data["arch"]),
        )
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return facts if facts_json(facts) == data else None


def _facts_record(base: BaseImage, cache: Path) -> Path:
    return CacheLayout(cache).bases / f"{digest_hex(base.manifest_digest)}.json"


def lock_targets(
    settings: ImageSettings,
    project: ProjectSpec,
    *,
    registry: Registry | None,
    store: BlobStore | None,
    cache: Path,
    mirrors: Mapping[str, str],
    pinned: Mapping[str, Digest] | None = None,
    reporter: Reporter | None = None,
) -> tuple[tuple[TargetPlatform, ...], dict[str, str]]:
    """The targets a lock covers, and the base digests seen (reference -> digest).

    A base given by reference is pulled to learn them: at the digest in ``pinned`` (what
    the lock recorded) when there is one, else at its tag; only the asked platforms it
    is published for are covered (``reporter`` hears when that is fewer).
    """
    entry, reference = base_reference(settings, project)
    archs = [p.partition("/")[2] for p in settings.platforms]
    if entry is not None:
        return tuple(target_of(arch, entry) for arch in archs), {}
    if registry is None or store is None:
        raise ProjectError(f"base {reference!r} must be pulled to learn its Python and libc")
    ref = pinned_reference(reference, pinned or {}).with_mirrors(mirrors)
    # The digest of what the tag names (an index, for a multi-platform base), once.
    body, _, digest = registry.fetch_manifest(ref)
    digests: dict[str, str] = {reference: ref.digest or digest}
    from imagebuild.pipeline.published import pull_published  # (a base given by reference)

    # Only the platforms the base is published for (a one-platform base: a one-platform lock).
    pulled = pull_published(registry, ref, body=body, archs=archs, store=store, reporter=reporter)
    found = [
        target_of(arch, base_facts(base, store, cache, arch, None)) for arch, base in pulled.items()
    ]
    return tuple(found), digests


def lock_inputs(
    settings: ImageSettings,
    project: ProjectSpec,
    *,
    indexes: Sequence[str],
    local: Sequence[ProjectSpec],
    registry: Registry,
    store: BlobStore,
    cache: Path,
    mirrors: Mapping[str, str],
    pinned: Mapping[str, Digest],
    reporter: Reporter | None = None,
) -> tuple[LockInputs, tuple[TargetPlatform, ...], dict[str, str]]:
    """What a lock of ``project`` records as its inputs, its targets, and base digests seen.

    ``imgbuild lock`` records them and ``build --locked`` compares them; a base given by
    reference is pulled (at its pinned digest) to learn the targets.
    """
    targets, digests = lock_targets(
        settings,
        project,
        registry=registry,
        store=store,
        cache=cache,
        mirrors=mirrors,
        pinned=pinned,
        reporter=reporter,
    )
    inputs = project_inputs(
        project,
        indexes=indexes,
        prereleases=settings.prereleases,
        targets=targets,
        local=local,
    )
    return inputs, targets, digests
