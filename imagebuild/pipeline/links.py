"""No image ships an extension module that cannot load: the ELF link check of a build.

Before the image is assembled, every ELF file of the wheels going into it (extension
modules, bundled libraries, programs) is read, and what each needs (libraries and their
symbol versions) is looked up among the base's libraries, the system packages' and the
ones wheels bundle. A library nothing provides refuses the build in one line naming the
wheel, the file, the library and, on a base imgbuild builds from Debian packages, the
package that ships it. Wheels' and bases' facts are cached, so a warm build reads no ELF.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from imagebuild.cache import CacheLayout, write_atomic, write_json
from imagebuild.debian.linkcheck import (
    Missing,
    WheelElf,
    base_record,
    check_links,
    importers,
    index_base,
    index_wheels,
    scan_record,
    scan_wheel,
    usable_record,
)
from imagebuild.debian.linklines import refusal_line
from imagebuild.digest import digest_hex
from imagebuild.errors import DebianError
from imagebuild.image.model import BaseImage
from imagebuild.image.store import LayerFiles
from imagebuild.install.imports import guarded_modules, module_of
from imagebuild.install.plan import PlannedWheel
from imagebuild.pipeline.layers import RemoteLayers
from imagebuild.target.base import find_entry, load_catalog

if TYPE_CHECKING:
    from imagebuild.debian.base import BaseRecipe


@dataclasses.dataclass(frozen=True, slots=True)
class LinkRecords:
    """The records a link check reads, and which of them it must work out itself."""

    records: tuple[Path, ...]
    """The base's library index, then each wheel's scan (``debian.linkcheck``)."""
    made: frozenset[Path]
    """Those on neither disk nor registry: worked out from the base and the wheels."""
    fetched: frozenset[Path]
    """Those the registry cache just gave (not kept there again)."""
    bundled: bool = False
    """Whether they came in one bundle (``_bundle_key``): then it is not kept again."""


def gather_link_records(
    wheels: Sequence[PlannedWheel],
    base: BaseImage,
    *,
    cache: CacheLayout,
    fetch: Callable[[Sequence[PlannedWheel]], None] | None = None,
    remote: RemoteLayers | None = None,
) -> LinkRecords:
    """The network half of a link check: its records and the wheels they need.

    Records come from the registry cache when the local one lacks them; the wheels no
    record describes are ``fetch``ed, so the check itself only reads and compares.
    """
    base_index = base_record(cache.elf, [d.digest for d in base.layers])
    scans = {wheel.sha256: scan_record(cache.elf, wheel.sha256) for wheel in wheels if wheel.sha256}
    records = (base_index, *scans.values())
    absent = [record for record in records if not _usable(record)]
    bundled = _from_bundle(records, absent, remote)
    made, fetched = _missing_records([r for r in absent if r not in bundled], remote)
    if fetch is not None:
        fetch([w for w in wheels if w.sha256 is None or scans[w.sha256] in made])
    return LinkRecords(
        records=records,
        made=frozenset(made),
        fetched=frozenset(fetched | bundled),
        bundled=bool(bundled),
    )


def check_image_links(
    wheels: Sequence[PlannedWheel],
    base: BaseImage,
    *,
    arch: str,
    store: LayerFiles,
    cache: CacheLayout,
    http: httpx.Client,
    recipe: BaseRecipe | None,
    fetch: Callable[[Sequence[PlannedWheel]], None] | None = None,
    remote: RemoteLayers | None = None,
    gathered: LinkRecords | None = None,
) -> tuple[Missing, ...]:
    """Refuse the image if an ELF file of ``wheels`` needs a library it will not have.

    What only plugins lack (``Missing.on_demand``) does not refuse it: that is returned.

    ``recipe`` is the built base's (None for a pulled base, whose os-release is read then):
    it names the Debian release whose Contents index says which package to add. The
    wheels' scans and the base's index are records: in the local cache, else in the
    registry cache (``remote``), else worked out (the wheels ``fetch``ed first) and kept
    in both, so a CI runner with an empty cache reads no ELF file the registry describes.
    ``gathered`` is ``gather_link_records``' answer when the caller got it earlier.
    """
    if gathered is None:
        gathered = gather_link_records(wheels, base, cache=cache, fetch=fetch, remote=remote)
    layers = [d.digest for d in base.layers]
    # The base is read (when no record has its index) while the wheels are.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgbuild-base-index") as pool:
        indexing = pool.submit(index_base, layers, blobs=store.path, cache=cache.elf)
        scanned = [
            (_label(wheel), scan_wheel(wheel.path, cache=cache.elf, sha256=wheel.sha256))
            for wheel in wheels
        ]
        index = indexing.result().merged(index_wheels(scanned))
    # Kept whether worked out now or read from the local cache (a runner seeding the
    # registry has them on disk); not those the registry just gave.
    _keep_records(gathered, remote)
    found = check_links(scanned, index, arch=arch)
    if any(not m.on_demand for m in found):
        optional = _optional_modules(scanned, found, wheels, arch=arch, cache=cache, fetch=fetch)
        if optional:
            found = check_links(scanned, index, arch=arch, optional=optional)
    missing = [m for m in found if not m.on_demand]
    if not missing:
        return found
    recipe = recipe or _pulled_debian(base, store)
    providers = _providers(missing, arch=arch, http=http, cache=cache.debian, recipe=recipe)
    raise DebianError(refusal_line(missing, providers))


def _label(wheel: PlannedWheel) -> str:
    """How the check names a wheel in what it finds (``greenlet 3.1.1``)."""
    return f"{wheel.name} {wheel.version}"


def _optional_modules(
    scanned: Sequence[tuple[str, Sequence[WheelElf]]],
    found: Sequence[Missing],
    wheels: Sequence[PlannedWheel],
    *,
    arch: str,
    cache: CacheLayout,
    fetch: Callable[[Sequence[PlannedWheel]], None] | None,
) -> frozenset[tuple[str, str]]:
    """The extension modules loading what ``found`` lacks that their packages can do without.

    Asked only when something is missing, of only the modules that load it: reading a
    wheel's Python files costs up to seconds (``install.imports``). The answers are kept.
    """
    by_label = {_label(wheel): wheel for wheel in wheels}
    asked: dict[str, dict[str, str]] = {}
    needed = [m for m in found if not m.on_demand]
    for label, member in sorted(importers(scanned, needed, arch=arch)):
        if label in by_label:
            asked.setdefault(label, {})[module_of(member)] = member
    if fetch is not None and asked:
        fetch([by_label[label] for label in sorted(asked)])
    optional: set[tuple[str, str]] = set()
    for label, members in sorted(asked.items()):
        guarded = _guarded(by_label[label], sorted(members), cache.elf)
        optional.update((label, members[module]) for module in guarded)
    return frozenset(optional)


_IMPORTS_FORMAT = 1


def _guarded(wheel: PlannedWheel, modules: Sequence[str], cache: Path) -> frozenset[str]:
    """Those of ``modules`` that ``wheel`` imports only under a guard, kept by its digest.

    A wheel that cannot be read guards none: its modules' needs refuse the image, as before.
    """
    record = cache / f"{digest_hex(wheel.sha256)}.imports.json" if wheel.sha256 else None
    known: dict[str, bool] = {}
    if record is not None:
        try:
            held = json.loads(record.read_bytes())
        except (OSError, ValueError):
            held = None
        if isinstance(held, dict) and held.get("format") == _IMPORTS_FORMAT:
            known = {k: v for k, v in held.get("modules", {}).items() if isinstance(v, bool)}
    todo = [module for module in modules if module not in known]
    if todo:
        try:
            guarded = guarded_modules(wheel.path, todo)
        except (OSError, zipfile.BadZipFile):
            return frozenset(module for module in modules if known.get(module))
        known.update({module: module in guarded for module in todo})
        if record is not None:
            write_json(record, {"format": _IMPORTS_FORMAT, "modules": known}, durable=False)
    return frozenset(module for module in modules if known[module])


def _missing_records(
    absent: Sequence[Path], remote: RemoteLayers | None
) -> tuple[set[Path], set[Path]]:
    """Of the records ``absent`` here: those on neither disk nor registry, and those given.

    Those the registry gave are on disk now.
    """
    if remote is None or not absent:
        return set(absent), set()
    finder = remote
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="imgbuild-records") as pool:
        found = list(pool.map(lambda r: finder.find_record(_remote_key(r)), absent))
    made, fetched = set(), set()
    for record, data in zip(absent, found, strict=True):
        if data is not None and usable_record(data):
            write_atomic(record, data, durable=False)  # read as a miss unless whole
            fetched.add(record)
        else:
            made.add(record)
    return made, fetched


def _keep_records(gathered: LinkRecords, remote: RemoteLayers | None) -> None:
    """Keep a check's records in the registry cache (``--cache-to``), for the next runner.

    Each is read once: kept alone unless the registry just gave it, and all together as a
    bundle unless they came as one (``_keep_bundle``).
    """
    if remote is None or not remote.keeps:  # --cache-from alone: nothing to read them for
        return
    keeper = remote
    usable = {}
    for record in gathered.records:
        try:
            data = record.read_bytes()
        except OSError:
            continue
        if usable_record(data):
            usable[record] = data
    alone = sorted(record for record in usable if record not in gathered.fetched)
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="imgbuild-records") as pool:
        list(pool.map(lambda r: keeper.keep_record(_remote_key(r), usable[r]), alone))
    if not gathered.bundled and len(usable) == len(gathered.records):
        _keep_bundle(gathered.records, remote, usable)


_BUNDLE_FORMAT = 1
_BUNDLE_LIMIT = 8 << 20
"""The largest bundle kept (a registry's record is read into memory whole)."""


def _bundle_key(records: Sequence[Path]) -> str:
    """The registry cache's name for all of one check's records at once.

    A CI runner asked for each of a check's records alone: a FastAPI build's 16 took 22
    requests (a small one costs the registry 2.3 ms of CPU here, the client 0.9 ms), a
    173-package lock's 170 many more. The records' own names say what they were worked
    out from, so the same wheels on the same base name the same bundle.
    """
    names = "\n".join(record.name for record in records)
    return hashlib.sha256(f"imgbuild elf bundle {_BUNDLE_FORMAT}\n{names}".encode()).hexdigest()


def _from_bundle(
    records: Sequence[Path], absent: Sequence[Path], remote: RemoteLayers | None
) -> set[Path]:
    """The records ``absent`` here that the bundle of ``records`` holds, written here."""
    if remote is None or not absent:
        return set()
    data = remote.find_record(_bundle_key(records))
    try:
        held = json.loads(data) if data is not None else None
    except ValueError:
        return set()
    if not isinstance(held, dict) or held.get("format") != _BUNDLE_FORMAT:
        return set()
    texts = held.get("records")
    written = set()
    for record in absent:
        text = texts.get(record.name) if isinstance(texts, dict) else None
        if isinstance(text, str) and usable_record(text.encode()):
            write_atomic(record, text.encode(), durable=False)  # read as a miss unless whole
            written.add(record)
    return written


def _keep_bundle(
    records: Sequence[Path],
    remote: RemoteLayers,
    known: Mapping[Path, bytes] | None = None,
) -> None:
    """Keep all of ``records`` as one bundle (``--cache-to``), when each is usable.

    ``known``: their bytes, read and found usable already (else they are read here). Not
    for one record alone (the project's own check), nor past ``_BUNDLE_LIMIT``: the records
    are then asked for one by one.
    """
    if len(records) < 2:
        return
    texts = {}
    for record in records:
        try:
            data = known[record] if known is not None else record.read_bytes()
        except OSError:
            return
        if known is None and not usable_record(data):
            return
        texts[record.name] = data.decode()
    bundle = json.dumps({"format": _BUNDLE_FORMAT, "records": texts}, sort_keys=True).encode()
    if len(bundle) <= _BUNDLE_LIMIT:
        remote.keep_record(_bundle_key(records), bundle)


def _usable(record: Path) -> bool:
    try:
        return usable_record(record.read_bytes())
    except OSError:
        return False


def _remote_key(record: Path) -> str:
    """The registry cache's name for a record of the ELF bucket (its file name is a digest)."""
    return hashlib.sha256(f"imgbuild elf {record.name}".encode()).hexdigest()


def _pulled_debian(base: BaseImage, store: LayerFiles) -> BaseRecipe | None:
    """The debian recipe at a pulled base's release, if the base is Debian."""
    # Imported when a library is missing only: the Debian modules cost every build 15 ms.
    from imagebuild.debian.base import BaseRecipe
    from imagebuild.debian.release import read_release

    release = read_release([store.path(d.digest) for d in base.layers])
    entry = find_entry(load_catalog(), "debian", None)
    if release.id != "debian" or not release.codename or entry.recipe is None:
        return None
    return BaseRecipe(
        flavor=entry.flavor,
        reference=base.reference,
        interpreter=entry.interpreter,
        user=entry.user,
        recipe=dataclasses.replace(entry.recipe, suite=release.codename),
    )


def _providers(
    missing: Sequence[Missing],
    *,
    arch: str,
    http: httpx.Client,
    cache: Path,
    recipe: BaseRecipe | None,
) -> dict[str, str]:
    """The Debian package shipping each missing library, when the base's release is known."""
    from imagebuild.debian.base import fetch_releases
    from imagebuild.debian.contents import find_providers

    names = {m.library for m in missing if m.version is None}
    if recipe is None or not names:
        return {}
    releases = fetch_releases(http, recipe.recipe, cache)
    return find_providers(http, releases, arch=arch, filenames=names, cache=cache)
