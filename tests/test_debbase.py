"""Built bases in a build: which packages (the lock's, or resolved with a word), assembled once
and cached by what went into them; the lock's base table kept or re-resolved; the ELF link
check's one line. No network: the archive's ports are recorded fakes where only a branch is
at stake, and real .debs, layers and ELF files where an outcome is."""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import tarfile
import threading
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import markupsafe._speedups
import pytest

import imagebuild.pipeline.debbase as debbase
from imagebuild.cache import CacheLayout
from imagebuild.debian.base import (
    BaseRecipe,
    _assembly_key,
    _from_record,
    archive_sources,
    assemble_base,
)
from imagebuild.debian.baselock import BaseLock, PlatformDebs, render_base_lock
from imagebuild.debian.elf import read_elf
from imagebuild.debian.linkcheck import ARCH_MACHINES
from imagebuild.debian.model import ArchiveSource, ElfInfo, LockedDeb
from imagebuild.digest import digest_bytes, digest_file, digest_hex
from imagebuild.errors import DebianError, LockError
from imagebuild.image.descriptor import OCI_LAYER_GZIP
from imagebuild.image.model import BaseImage
from imagebuild.image.store import BlobStore
from imagebuild.install.plan import PlannedWheel
from imagebuild.lock.model import Lock, LockInputs, RecordedLock
from imagebuild.pipeline.debbase import (
    BuiltBases,
    base_lock_problem,
    base_lock_table,
    base_recipe,
)
from imagebuild.pipeline.links import check_image_links
from imagebuild.pipeline.requests import LockMode
from imagebuild.project.settings import ImageSettings, parse_settings
from imagebuild.project.spec import ProjectSpec, parse_project
from imagebuild.target.base import find_entry, load_catalog
from imagebuild.target.recipe import Account
from tests.debian.test_assemble import base_files

ENTRY = find_entry(load_catalog(), "debian", (3, 11))
BASE = base_recipe(ENTRY, ImageSettings())


class Recorder:
    """A ``Reporter`` that keeps what it is told."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.warnings: list[str] = []

    def step(self, message: str) -> None:
        self.steps.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def progress(self, task: str, done: int, total: int | None, unit: str = "") -> None:
        pass


@pytest.fixture
def offline() -> Iterator[httpx.Client]:
    """A client that fails the test on any request: these paths must not touch the network."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"unexpected request to {request.url}")

    with httpx.Client(transport=httpx.MockTransport(refuse)) as client:
        yield client


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CacheLayout:
    monkeypatch.delenv("IMGBUILD_DEBIAN_CACHE", raising=False)  # this test's cache only
    return CacheLayout(tmp_path / "cache")


def locked_deb(name: str, arch: str = "amd64") -> LockedDeb:
    digest = digest_bytes(name.encode())
    return LockedDeb(
        name=name,
        version="1.0-1",
        architecture=arch,
        url=f"http://deb.debian.org/debian/pool/main/{name[0]}/{name}/{name}_1.0-1_{arch}.deb",
        sha256=digest,
        size=100,
    )


RESOLVED = PlatformDebs(base=(locked_deb("resolved"),))
LOCKED = {arch: PlatformDebs(base=(locked_deb("locked", arch),)) for arch in ("amd64", "arm64")}


def make_lock(
    tmp_path: Path, *, kind: str = "pylock", system: Sequence[str] = (), archs: Sequence[str] = ()
) -> Lock:
    """A lock as the loader hands it over; ``archs`` are locked for ``system`` (none: no table)."""
    table = None
    if archs:
        inputs = BASE.inputs(system)
        table = render_base_lock(BaseLock(inputs=inputs, platforms={a: LOCKED[a] for a in archs}))
    recorded = RecordedLock(
        inputs=LockInputs(
            requires_python=None, requirements=(), indexes=(), prereleases=False, targets=()
        ),
        pins={},
        debian=table,
    )
    if kind == "uv":
        return Lock(kind="uv", path=tmp_path / "uv.lock")
    return Lock(kind="pylock", path=tmp_path / "pylock.toml", recorded=recorded)


class Resolver:
    """``resolve_platform`` as the pipeline calls it, recording each call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, http: httpx.Client, recipe: object, **kwargs: Any) -> PlatformDebs:
        self.calls.append({"recipe": recipe, **kwargs})
        return RESOLVED


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Resolver:
    fake = Resolver()
    monkeypatch.setattr(debbase, "resolve_platform", fake)
    return fake


def built(
    lock: Lock,
    mode: LockMode,
    reporter: Recorder,
    cache: CacheLayout,
    http: httpx.Client,
    system: Sequence[str] = (),
    base: BaseRecipe = BASE,
) -> BuiltBases:
    return BuiltBases(
        base,
        settings=ImageSettings(system_packages=tuple(system)),
        lock=lock,
        lock_mode=mode,
        http=http,
        cache=cache,
        store=BlobStore(cache.blobs),
        reporter=reporter,
    )


# -- BuiltBases._packages ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["locked", "frozen", "check-if-present"])
def test_packages_that_fit_come_from_the_lock(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client, resolver: Resolver, mode: LockMode
) -> None:
    reporter = Recorder()
    bases = built(make_lock(tmp_path, archs=["amd64", "arm64"]), mode, reporter, cache, offline)
    assert bases._packages("arm64") == LOCKED["arm64"]
    assert (resolver.calls, reporter.steps, reporter.warnings) == ([], [], [])


def test_a_stale_lock_warns_and_resolves(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client, resolver: Resolver
) -> None:
    reporter = Recorder()
    lock = make_lock(tmp_path, archs=["amd64"])
    bases = built(lock, "check-if-present", reporter, cache, offline, system=["libgomp1"])
    assert bases._packages("amd64") == RESOLVED
    assert reporter.warnings == [
        "pylock.toml: the built base's packages are stale "
        "(its base system-packages were none, are now libgomp1)"
    ]
    [call] = resolver.calls
    assert call["arch"] == "amd64" and call["system_packages"] == ("libgomp1",)
    assert call["recipe"] == BASE.recipe and call["cache"] == cache.debian
    assert reporter.steps == [
        "base: resolving debian (bookworm, amd64) from http://deb.debian.org/debian"
    ]


@pytest.mark.parametrize(
    ("system", "arch", "why"),
    [
        (["libgomp1"], "amd64", "its base system-packages were none, are now libgomp1"),
        ([], "arm64", "it has no base packages for arm64"),
    ],
)
def test_a_stale_lock_under_locked_is_refused(
    tmp_path: Path,
    cache: CacheLayout,
    offline: httpx.Client,
    resolver: Resolver,
    system: list[str],
    arch: str,
    why: str,
) -> None:
    reporter = Recorder()
    bases = built(make_lock(tmp_path, archs=["amd64"]), "locked", reporter, cache, offline, system)
    with pytest.raises(LockError) as exc:
        bases._packages(arch)
    assert exc.value.message == f"pylock.toml: the built base's packages are stale: {why}"
    assert exc.value.hint == "run 'imgbuild lock' (or drop --locked)"
    assert resolver.calls == [] and reporter.warnings == []


def test_a_pylock_without_base_packages_under_locked_is_refused(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client, resolver: Resolver
) -> None:
    bases = built(make_lock(tmp_path), "locked", Recorder(), cache, offline)
    with pytest.raises(LockError) as exc:
        bases._packages("amd64")
    assert exc.value.message == "pylock.toml: no base packages are locked for base 'debian'"
    assert resolver.calls == []


def test_a_pylock_without_base_packages_resolves_them(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client, resolver: Resolver
) -> None:
    reporter = Recorder()
    bases = built(make_lock(tmp_path), "check-if-present", reporter, cache, offline)
    assert bases._packages("amd64") == RESOLVED
    assert reporter.steps == [
        "base: resolving debian (bookworm, amd64) from http://deb.debian.org/debian"
    ]
    assert reporter.warnings == []


@pytest.mark.parametrize("mode", ["locked", "check-if-present"])
def test_a_uv_lock_resolves_the_base_and_says_it_cannot_record_it(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client, resolver: Resolver, mode: LockMode
) -> None:
    reporter = Recorder()
    mirrored = replace(BASE, recipe=BASE.recipe.with_mirrors("file:///srv/debian", None))
    bases = built(make_lock(tmp_path, kind="uv"), mode, reporter, cache, offline, base=mirrored)
    assert bases._packages("arm64") == RESOLVED
    assert reporter.steps == [
        "base: resolving debian (bookworm, arm64) from file:///srv/debian "
        "(uv.lock cannot record it; 'imgbuild lock' writes a pylock.toml that does)"
    ]
    assert resolver.calls[0]["arch"] == "arm64"


# -- BuiltBases.get and assemble_base: real assembly, cached by what went into it ------------


def cached_base_files(tmp_path: Path, cache: CacheLayout) -> LockedDeb:
    """A small real base-files .deb, already in the Debian cache (no fetch needed)."""
    deb, path = base_files(tmp_path)
    dest = cache.debian / "debs" / f"{digest_hex(deb.sha256)}.deb"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, dest)
    return deb


def test_get_assembles_each_architecture_once(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client, resolver: Resolver
) -> None:
    deb = cached_base_files(tmp_path, cache)
    lock = make_lock(tmp_path)
    assert lock.recorded is not None
    table = render_base_lock(
        BaseLock(inputs=BASE.inputs(()), platforms={"amd64": PlatformDebs(base=(deb,))})
    )
    lock = replace(lock, recorded=replace(lock.recorded, debian=table))
    reporter = Recorder()
    bases = built(lock, "locked", reporter, cache, offline)
    images: list[BaseImage] = []
    threads = [threading.Thread(target=lambda: images.append(bases.get("amd64"))) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(images) == 2 and images[0] is images[1]
    assert reporter.steps == ["base: assembling debian (bookworm, amd64) from 1 .deb"]
    assert resolver.calls == []
    image = images[0]
    assert image.reference == "imgbuild.invalid/debian:3.11-bookworm"
    assert image.config["architecture"] == "amd64"
    assert image.config["config"] == {
        "Cmd": ["/usr/bin/python3.11"],
        "Env": [f"{k}={v}" for k, v in BASE.recipe.env],
        "User": "65532",
    }
    with tarfile.open(BlobStore(cache.blobs).path(image.layers[0].digest)) as tar:
        names = tar.getnames()
    assert "etc/passwd" in names and "var/lib/dpkg/status.d/base-files" in names


def test_an_assembled_base_is_read_back_from_its_record(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client
) -> None:
    deb = cached_base_files(tmp_path, cache)
    debs = PlatformDebs(base=(deb,))
    store = BlobStore(cache.blobs)
    first = Recorder()
    image = assemble_base(
        offline, BASE, debs, arch="amd64", cache=cache.debian, store=store, reporter=first
    )
    (cache.debian / "debs" / f"{digest_hex(deb.sha256)}.deb").unlink()  # a warm build reads none
    again = Recorder()
    assert (
        assemble_base(
            offline, BASE, debs, arch="amd64", cache=cache.debian, store=store, reporter=again
        )
        == image
    )
    assert len(first.steps) == 1 and again.steps == []
    record = cache.debian / "bases" / f"{_assembly_key(BASE, debs, 'amd64')}.json"
    assert _from_record(record, BASE, store) == image
    # Another store (a shared Debian cache) lacks the blobs: the record is no answer there.
    assert _from_record(record, BASE, BlobStore(tmp_path / "other")) is None
    config = json.loads(store.read_bytes(image.manifest_digest))["config"]["digest"]
    for victim in (image.layers[0].digest, config, image.manifest_digest):
        saved = store.read_bytes(victim)
        store.path(victim).unlink()
        assert _from_record(record, BASE, store) is None
        store.path(victim).write_bytes(saved)
    assert _from_record(record, BASE, store) == image
    record.write_text("{not json", encoding="utf-8")
    assert _from_record(record, BASE, store) is None
    assert _from_record(tmp_path / "absent.json", BASE, store) is None


# -- the assembly key and the archive's suites -------------------------------------------------


def test_the_assembly_key_changes_with_every_input() -> None:
    debs = PlatformDebs(base=(locked_deb("base-files"),), system=(locked_deb("libgomp1"),))
    key = _assembly_key(BASE, debs, "amd64")
    recipe = BASE.recipe
    nonroot = recipe.accounts[-1]
    changed = [
        (BASE, debs, "arm64"),
        (replace(BASE, reference="imgbuild.invalid/debian:3.11-other"), debs, "amd64"),
        (replace(BASE, interpreter=PurePosixPath("/usr/bin/python3")), debs, "amd64"),
        (replace(BASE, user="0"), debs, "amd64"),
        (BASE, replace(debs, base=(locked_deb("base-files2"),)), "amd64"),
        (BASE, replace(debs, system=()), "amd64"),
        (BASE, PlatformDebs(base=debs.system, system=debs.base), "amd64"),
    ]
    recipes = [
        replace(recipe, accounts=(*recipe.accounts[:-1], replace(nonroot, shell="/bin/sh"))),
        replace(recipe, accounts=(*recipe.accounts, Account(name="x", uid=1, gid=1, home="/"))),
        replace(recipe, groups=recipe.groups[:-1]),
        replace(recipe, symlinks=(*recipe.symlinks, ("usr/bin/py", "python3.11"))),
        replace(recipe, env=(*recipe.env, ("TZ", "UTC"))),
    ]
    changed += [(replace(BASE, recipe=r), debs, "amd64") for r in recipes]
    keys = [_assembly_key(*args) for args in changed]
    assert key not in keys and len(set(keys)) == len(keys)
    # Deterministic, and a mirror is where the bytes come from, not what they are.
    moved = replace(BASE, recipe=recipe.with_mirrors("http://snapshot.example/debian", None))
    assert _assembly_key(moved, debs, "amd64") == key == _assembly_key(BASE, debs, "amd64")
    assert re.fullmatch(r"[0-9a-f]{64}", key)


def test_archive_sources_are_the_release_its_updates_and_its_security_suite() -> None:
    recipe = BASE.recipe.with_mirrors("http://mirror.example/debian", "http://sec.example/ds")
    assert archive_sources(recipe) == (
        ArchiveSource(mirror="http://mirror.example/debian", suite="bookworm"),
        ArchiveSource(mirror="http://mirror.example/debian", suite="bookworm-updates"),
        ArchiveSource(mirror="http://sec.example/ds", suite="bookworm-security"),
    )


def test_base_inputs_are_sorted_and_follow_the_settings_mirrors() -> None:
    inputs = BASE.inputs(["zlib1g", "libgomp1"])
    assert inputs.system_packages == ("libgomp1", "zlib1g")
    assert list(inputs.packages) == sorted(ENTRY.recipe.packages)  # type: ignore[union-attr]
    assert inputs.exclude == tuple(sorted(inputs.exclude)) and inputs.suite == "bookworm"
    settings = ImageSettings(debian_mirror="file:///srv/d", debian_security_mirror="file:///srv/s")
    mirrored = base_recipe(ENTRY, settings)
    assert (mirrored.recipe.mirror, mirrored.recipe.security_mirror) == (
        "file:///srv/d",
        "file:///srv/s",
    )
    assert mirrored.inputs(()) == BASE.inputs(())  # a mirror does not make a lock stale


# -- imgbuild lock: base_lock_problem and base_lock_table ---------------------------------------


def bookworm_project(root: Path) -> ProjectSpec:
    """A project whose requires-python picks the 3.11 (bookworm) entry."""
    data = {"project": {"name": "app", "version": "1.0", "requires-python": ">=3.11,<3.12"}}
    return parse_project(data, root=root)


def recorded(lock: Lock) -> RecordedLock:
    assert lock.recorded is not None
    return lock.recorded


def test_base_lock_problem_names_what_does_not_fit(tmp_path: Path) -> None:
    project = bookworm_project(tmp_path)
    both = parse_settings({})
    amd64 = parse_settings({"platforms": ["linux/amd64"]})
    fits = recorded(make_lock(tmp_path, archs=["amd64", "arm64"]))
    assert base_lock_problem(both, project, fits, "pylock.toml") is None
    assert (
        base_lock_problem(
            amd64, project, recorded(make_lock(tmp_path, archs=["amd64"])), "pylock.toml"
        )
        is None
    )
    assert base_lock_problem(
        both, project, recorded(make_lock(tmp_path, archs=["amd64"])), "pylock.toml"
    ) == ("pylock.toml: the built base's packages are stale: it has no base packages for arm64")
    gomp = parse_settings({"system-packages": ["libgomp1"]})
    assert base_lock_problem(gomp, project, fits, "pylock.toml") == (
        "pylock.toml: the built base's packages are stale: "
        "its base system-packages were none, are now libgomp1"
    )
    trixie = parse_settings({"python": "3.13"})
    assert base_lock_problem(trixie, project, fits, "pylock.toml") == (
        "pylock.toml: the built base's packages are stale: "
        "its base suite was bookworm, is now trixie"
    )
    none = recorded(make_lock(tmp_path))
    assert base_lock_problem(both, project, none, "pylock.toml") == (
        "pylock.toml locks no packages for base 'debian'"
    )
    assert base_lock_problem(both, project, None, "pylock.toml") == (
        "pylock.toml locks no packages for base 'debian'"
    )
    # A pulled base, by flavor or by reference, has no packages to lock.
    for base in ("distroless", "python:3.11-slim"):
        assert base_lock_problem(parse_settings({"base": base}), project, None, "x") is None


class LockBase:
    """``lock_base`` as ``base_lock_table`` calls it, recording each call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, base: BaseRecipe, **kwargs: Any) -> dict[str, PlatformDebs]:
        self.calls.append({"base": base, **kwargs})
        return {arch: RESOLVED for arch in kwargs["archs"]}


@pytest.fixture
def lock_base(monkeypatch: pytest.MonkeyPatch) -> LockBase:
    fake = LockBase()
    monkeypatch.setattr(debbase, "lock_base", fake)
    return fake


def table_for(
    settings: ImageSettings,
    project: ProjectSpec,
    old: RecordedLock | None,
    upgrade: bool,
    cache: CacheLayout,
    http: httpx.Client,
    reporter: Recorder,
) -> dict[str, Any] | None:
    return base_lock_table(
        settings, project, old, upgrade=upgrade, http=http, cache=cache, reporter=reporter
    )


def test_base_lock_table_keeps_recorded_packages_that_fit(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client, lock_base: LockBase
) -> None:
    project = bookworm_project(tmp_path)
    old = recorded(make_lock(tmp_path, archs=["amd64", "arm64"]))
    reporter = Recorder()
    table = table_for(parse_settings({}), project, old, False, cache, offline, reporter)
    assert table == old.debian
    assert lock_base.calls == [] and reporter.steps == []


def test_base_lock_table_resolves_on_upgrade_or_when_stale(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client, lock_base: LockBase
) -> None:
    project = bookworm_project(tmp_path)
    old = recorded(make_lock(tmp_path, archs=["amd64", "arm64"]))
    settings = parse_settings({"debian-mirror": "http://snapshot.example/debian/"})
    reporter = Recorder()
    table = table_for(settings, project, old, True, cache, offline, reporter)
    assert reporter.steps == ["lock: base debian packages from http://snapshot.example/debian"]
    [call] = lock_base.calls
    assert call["archs"] == ["amd64", "arm64"] and call["system_packages"] == ()
    assert call["base"].recipe.mirror == "http://snapshot.example/debian"
    expected = BaseLock(inputs=BASE.inputs(()), platforms={"amd64": RESOLVED, "arm64": RESOLVED})
    assert table == render_base_lock(expected)
    # Stale (a system package added, one platform): resolved for the new inputs.
    gomp = parse_settings({"system-packages": ["libgomp1"], "platforms": ["linux/arm64"]})
    table = table_for(gomp, project, old, False, cache, offline, Recorder())
    assert lock_base.calls[-1]["archs"] == ["arm64"]
    assert lock_base.calls[-1]["system_packages"] == ("libgomp1",)
    assert table is not None and table["system-packages"] == ["libgomp1"]
    assert {row["arch"] for row in table["debs"]} == {"arm64"}
    # No record at all: resolved too.
    table_for(parse_settings({}), project, None, False, cache, offline, Recorder())
    assert len(lock_base.calls) == 3


def test_base_lock_table_is_none_for_a_pulled_base(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client, lock_base: LockBase
) -> None:
    settings = parse_settings({"base": "distroless"})
    old = recorded(make_lock(tmp_path, archs=["amd64"]))
    project = bookworm_project(tmp_path)
    assert table_for(settings, project, old, True, cache, offline, Recorder()) is None
    assert lock_base.calls == []


# -- the ELF link check of a build ---------------------------------------------------------------

SPEEDUPS = Path(markupsafe._speedups.__file__)  # a real extension module (a dependency's)
_READ = read_elf(io.BytesIO(SPEEDUPS.read_bytes()))
assert _READ is not None and _READ.needed == ("libpthread.so.0", "libc.so.6")
_INFO: ElfInfo = _READ
HOST_ARCH = next(arch for arch in ("amd64", "arm64") if ARCH_MACHINES[arch] == _INFO.machine)
TRIPLET = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}[HOST_ARCH]


def host_glibc() -> Path:
    """The C library this process runs on: a real libc.so.6 with its symbol versions."""
    maps = Path("/proc/self/maps").read_text()
    found = re.search(r"(/\S+/libc\.so\.6)$", maps, re.MULTILINE)
    assert found is not None, "tests run on a glibc system"
    return Path(found[1])


def wheel_with_speedups(tmp_path: Path) -> PlannedWheel:
    path = tmp_path / f"speedy-1.0-cp311-cp311-manylinux_2_17_{_INFO.machine}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("speedy/__init__.py", "")
        archive.write(SPEEDUPS, f"speedy/{SPEEDUPS.name}")
    return PlannedWheel(name="speedy", version="1.0", path=path)


def base_with(store: BlobStore, libraries: Sequence[Path]) -> BaseImage:
    """A base of one layer holding ``libraries`` in the multiarch directory."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name in ("usr", "usr/lib", f"usr/lib/{TRIPLET}"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for library in libraries:
            tar.add(library, f"usr/lib/{TRIPLET}/{library.name}")
    blob = store.put_bytes(gzip.compress(raw.getvalue(), mtime=0), media_type=OCI_LAYER_GZIP)
    return BaseImage(
        reference="imgbuild.invalid/test:1",
        manifest_digest=digest_bytes(b"test base"),
        config={},
        layers=(blob,),
        diff_ids=(digest_bytes(raw.getvalue()),),
    )


def test_an_extension_whose_libraries_the_base_lacks_is_refused_in_one_line(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client
) -> None:
    store = BlobStore(cache.blobs)
    wheel = wheel_with_speedups(tmp_path)
    with pytest.raises(DebianError) as exc:
        check_image_links(
            [wheel],
            base_with(store, []),
            arch=HOST_ARCH,
            store=store,
            cache=cache,
            http=offline,
            recipe=None,
        )
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(
        f"speedy 1.0: speedy/{SPEEDUPS.name} needs libc.so.6, which the image does not have; "
    )
    assert "apt-file search libc.so.6" in message
    assert message.endswith(" (also missing: libpthread.so.0)")


def test_what_only_a_plugin_lacks_is_returned_not_refused(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client
) -> None:
    store = BlobStore(cache.blobs)
    path = tmp_path / f"plugged-1.0-cp311-cp311-manylinux_2_17_{_INFO.machine}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("plugged/__init__.py", "")
        archive.write(SPEEDUPS, "plugged/plugins/libtransport.so.2")  # nothing links it
    wheel = PlannedWheel(name="plugged", version="1.0", path=path)
    lacks = check_image_links(
        [wheel], base_with(store, []), arch=HOST_ARCH, store=store, cache=cache, http=offline,
        recipe=None,
    )  # fmt: skip
    assert {(m.member, m.library, m.on_demand) for m in lacks} == {
        ("plugged/plugins/libtransport.so.2", "libc.so.6", True),
        ("plugged/plugins/libtransport.so.2", "libpthread.so.0", True),
    }


def test_a_module_its_package_imports_under_a_guard_is_a_warning_and_kept(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client
) -> None:
    # numba imports its TBB threading layer inside try/except ImportError; the base here
    # lacks what the (real) extension module links, as a slim base lacks libtbb.so.12.
    store = BlobStore(cache.blobs)
    base = base_with(store, [host_glibc()])
    guarded = "try:\n    from . import _speedups\nexcept ImportError:\n    _speedups = None\n"

    def check(init: str, folder: str) -> tuple[tuple[str, str, bool], ...]:
        path = tmp_path / folder / f"speedy-1.0-cp311-cp311-linux_{_INFO.machine}.whl"
        path.parent.mkdir()
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("speedy/__init__.py", init)
            archive.write(SPEEDUPS, f"speedy/{SPEEDUPS.name}")
        wheel = PlannedWheel(name="speedy", version="1.0", path=path, sha256=digest_file(path))
        lacks = check_image_links(
            [wheel], base, arch=HOST_ARCH, store=store, cache=cache, http=offline, recipe=None
        )
        return tuple((m.member, m.library, m.on_demand) for m in lacks)

    assert check(guarded, "guarded") == ((f"speedy/{SPEEDUPS.name}", "libpthread.so.0", True),)
    # The answer is kept by the wheel's digest.
    path = tmp_path / "guarded" / f"speedy-1.0-cp311-cp311-linux_{_INFO.machine}.whl"
    (record,) = cache.elf.glob("*.imports.json")
    assert record.name == f"{digest_hex(digest_file(path))}.imports.json"
    assert json.loads(record.read_text())["modules"] == {"speedy._speedups": True}
    # and read again: with the wheel gone bad, the checks answer from their records.
    wheel = PlannedWheel(name="speedy", version="1.0", path=path, sha256=digest_file(path))
    path.write_bytes(b"not a zip")
    again = check_image_links(
        [wheel], base, arch=HOST_ARCH, store=store, cache=cache, http=offline, recipe=None
    )
    assert [(m.library, m.on_demand) for m in again] == [("libpthread.so.0", True)]
    # Imported where the package cannot do without it: refused, as before.
    with pytest.raises(DebianError, match="needs libpthread.so.0"):
        check("from . import _speedups\n", "needed")


def test_an_extension_finds_its_libraries_in_the_base(
    tmp_path: Path, cache: CacheLayout, offline: httpx.Client
) -> None:
    store = BlobStore(cache.blobs)
    wheel = wheel_with_speedups(tmp_path)
    libc = host_glibc()
    with pytest.raises(DebianError) as exc:
        check_image_links(
            [wheel],
            base_with(store, [libc]),
            arch=HOST_ARCH,
            store=store,
            cache=cache,
            http=offline,
            recipe=None,
        )
    assert "needs libpthread.so.0" in str(exc.value) and "also missing" not in str(exc.value)
    full = base_with(store, [libc, libc.parent / "libpthread.so.0"])
    check_image_links(
        [wheel], full, arch=HOST_ARCH, store=store, cache=cache, http=offline, recipe=None
    )
    # The other architecture's image does not run this file: nothing to refuse.
    other = "arm64" if HOST_ARCH == "amd64" else "amd64"
    check_image_links(
        [wheel],
        base_with(store, []),
        arch=other,
        store=store,
        cache=cache,
        http=offline,
        recipe=None,
    )
