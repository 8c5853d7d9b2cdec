"""The base lock: rendered as ``[tool.imgbuild.debian]``, read back, judged against inputs.

The table travels through the real pylock writer and reader: ``render_pylock`` writes it
with its rows as ``[[tool.imgbuild.debian.debs]]`` and ``load_lock`` hands it back in
``RecordedLock.debian``, from which ``parse_base_lock`` rebuilds the same ``BaseLock``.
"""

from __future__ import annotations

import copy
import hashlib
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from packaging.pylock import Pylock

from imagebuild.debian.baselock import (
    BaseInputs,
    BaseLock,
    PlatformDebs,
    merge_platforms,
    parse_base_lock,
    render_base_lock,
)
from imagebuild.debian.model import LockedDeb
from imagebuild.digest import Digest
from imagebuild.errors import LockError
from imagebuild.lock.load import load_lock
from imagebuild.lock.resolve import resolve
from imagebuild.lock.inputs import project_inputs, project_roots
from imagebuild.lock.writer import render_pylock
from imagebuild.project.spec import parse_project
from imagebuild.target.platform import TargetPlatform
from tests.test_resolve import FakeIndex

MIRROR = "http://deb.debian.org/debian"


def deb(name: str, version: str, arch: str, pool: str = "pool/main") -> LockedDeb:
    """A locked .deb as the archive lists one (the digest stands in for the file's)."""
    digest = hashlib.sha256(f"{name} {version} {arch}".encode()).hexdigest()
    first = name[:4] if name.startswith("lib") else name[0]
    return LockedDeb(
        name=name,
        version=version,
        architecture=arch,
        url=f"{MIRROR}/{pool}/{first}/{name}/{name}_{version}_{arch}.deb",
        sha256=Digest(f"sha256:{digest}"),
        size=1000 + len(name),
    )


INPUTS = BaseInputs(
    flavor="debian",
    suite="bookworm",
    packages=("base-files", "libpython3.11-stdlib", "python3.11-minimal", "tzdata"),
    system_packages=("libgomp1",),
    exclude=("debconf", "dpkg"),
)
LOCK = BaseLock(
    inputs=INPUTS,
    platforms={
        "arm64": PlatformDebs(
            base=(
                deb("tzdata", "2024a-0+deb12u1", "all"),
                deb("base-files", "12.4+deb12u10", "arm64"),
                deb("libc6", "2.36-9+deb12u10", "arm64", "pool/updates/main"),
            ),
            system=(deb("libgomp1", "12.2.0-14+deb12u1", "arm64"),),
        ),
        "amd64": PlatformDebs(
            base=(
                deb("base-files", "12.4+deb12u10", "amd64"),
                deb("libc6", "2.36-9+deb12u10", "amd64", "pool/updates/main"),
                deb("tzdata", "2024a-0+deb12u1", "all"),
            ),
        ),
    },
)


def by_name(lock: BaseLock) -> dict[str, tuple[list[LockedDeb], list[LockedDeb]]]:
    """Each platform's packages, sorted by name (rendering sorts the rows)."""
    return {
        arch: (
            sorted(debs.base, key=lambda d: d.name),
            sorted(debs.system, key=lambda d: d.name),
        )
        for arch, debs in lock.platforms.items()
    }


def test_render_then_parse_gives_the_same_lock() -> None:
    table = render_base_lock(LOCK)
    again = parse_base_lock(table, source="pylock.toml")
    assert again.inputs == INPUTS
    assert by_name(again) == by_name(LOCK)
    assert again.platforms["amd64"].system == ()
    # Rows: by architecture, base layer before system layer, by name; bare hex digests.
    keys = [(r["arch"], r["layer"], r["name"]) for r in table["debs"]]
    assert keys == [
        ("amd64", "base", "base-files"),
        ("amd64", "base", "libc6"),
        ("amd64", "base", "tzdata"),
        ("arm64", "base", "base-files"),
        ("arm64", "base", "libc6"),
        ("arm64", "base", "tzdata"),
        ("arm64", "system", "libgomp1"),
    ]
    first = table["debs"][0]
    assert first["sha256"] == LOCK.platforms["amd64"].base[0].sha256.removeprefix("sha256:")
    assert set(first) == {
        "arch",
        "layer",
        "name",
        "version",
        "architecture",
        "url",
        "sha256",
        "size",
    }
    assert table["system-packages"] == ["libgomp1"]
    # The same lock renders the same table whatever order its values came in.
    shuffled = BaseLock(
        inputs=INPUTS,
        platforms={
            arch: PlatformDebs(base=tuple(reversed(d.base)), system=d.system)
            for arch, d in reversed(list(LOCK.platforms.items()))
        },
    )
    assert render_base_lock(shuffled) == table


def test_a_pool_path_survives_the_round_trip() -> None:
    again = parse_base_lock(render_base_lock(LOCK), source="pylock.toml")
    libc = next(d for d in again.platforms["amd64"].base if d.name == "libc6")
    assert libc.pool_path.startswith("pool/updates/main/libc/libc6/")
    assert libc.url == f"{MIRROR}/{libc.pool_path}"


def test_merge_platforms_keeps_each_architecture() -> None:
    merged = merge_platforms(list(LOCK.platforms.items()), INPUTS)
    assert merged.inputs == INPUTS
    assert by_name(merged) == by_name(LOCK)


# -- stale_for ---------------------------------------------------------------------------------


def test_a_lock_fits_its_own_inputs_on_each_locked_architecture() -> None:
    assert LOCK.stale_for(INPUTS, "amd64") is None
    assert LOCK.stale_for(INPUTS, "arm64") is None
    assert LOCK.stale_for(INPUTS, "riscv64") == "it has no base packages for riscv64"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"flavor": "debian-shell"}, "its base flavor was debian, is now debian-shell"),
        ({"suite": "trixie"}, "its base suite was bookworm, is now trixie"),
        (
            {"packages": ("base-files", "tzdata")},
            "its base packages were base-files, libpython3.11-stdlib, python3.11-minimal, "
            "tzdata, are now base-files, tzdata",
        ),
        ({"system_packages": ()}, "its base system-packages were libgomp1, are now none"),
        (
            {"system_packages": ("ffmpeg", "libgomp1")},
            "its base system-packages were libgomp1, are now ffmpeg, libgomp1",
        ),
        ({"exclude": ("dpkg",)}, "its base exclude were debconf, dpkg, are now dpkg"),
    ],
)
def test_stale_for_names_the_first_input_that_changed(change: dict[str, Any], why: str) -> None:
    assert LOCK.stale_for(replace(INPUTS, **change), "amd64") == why


def test_an_empty_lock_says_what_it_lacks() -> None:
    empty = BaseLock(inputs=replace(INPUTS, system_packages=()), platforms={})
    assert empty.stale_for(INPUTS, "amd64") == (
        "its base system-packages were none, are now libgomp1"
    )
    assert empty.stale_for(empty.inputs, "amd64") == "it has no base packages for amd64"


# -- malformed tables ----------------------------------------------------------------------------


def broken(edit: str) -> dict[str, Any]:
    """The rendered table with one thing wrong (``edit`` names which)."""
    table = copy.deepcopy(render_base_lock(LOCK))
    row = table["debs"][2]
    if edit == "no suite":
        del table["suite"]
    elif edit == "no debs":
        del table["debs"]
    elif edit == "layer":
        row["layer"] = "python"
    elif edit == "sha256":
        row["sha256"] = "not-a-digest"
    elif edit == "size":
        row["size"] = "big"
    elif edit == "no url":
        del row["url"]
    elif edit == "row":
        table["debs"][2] = "tzdata"
    elif edit == "packages":
        table["packages"] = 3
    return table


@pytest.mark.parametrize(
    ("edit", "detail"),
    [
        ("no suite", "'suite'"),
        ("no debs", "'debs'"),
        ("layer", "layer 'python'"),
        ("sha256", "not-a-digest"),
        ("size", "'big'"),
        ("no url", "'url'"),
        ("row", "string indices"),
        ("packages", "packages must be a list of package names"),
    ],
)
def test_a_malformed_table_is_one_lock_error(edit: str, detail: str) -> None:
    with pytest.raises(LockError) as exc:
        parse_base_lock(broken(edit), source="pylock.toml")
    assert "\n" not in str(exc.value)
    assert exc.value.message.startswith("pylock.toml: tool.imgbuild.debian is malformed (")
    assert detail in exc.value.message
    assert exc.value.hint == "run 'imgbuild lock'"


def test_a_list_written_as_a_string_is_malformed() -> None:
    table = render_base_lock(LOCK)
    table["packages"] = "tzdata"
    with pytest.raises(LockError, match="malformed"):
        parse_base_lock(table, source="pylock.toml")


# -- through pylock.toml -------------------------------------------------------------------------

TARGETS = [
    TargetPlatform(python_version=(3, 11), libc_version=(2, 36), arch=a)
    for a in ("x86_64", "aarch64")
]


def write_pylock(tmp_path: Path, base_lock: dict[str, Any] | None) -> Path:
    """A real pylock.toml for a project without dependencies, carrying ``base_lock``."""
    project = parse_project(
        {"project": {"name": "app", "version": "1.0", "requires-python": ">=3.11"}},
        root=tmp_path,
    )
    resolutions = [resolve([], index=FakeIndex(projects={}), target=t) for t in TARGETS]
    inputs = project_inputs(
        project, indexes=("https://pypi.org/simple/",), prereleases=False, targets=TARGETS
    )
    text = render_pylock(
        project,
        inputs,
        resolutions,
        roots=project_roots(project),
        lock_dir=tmp_path,
        base_lock=base_lock,
    )
    path = tmp_path / "pylock.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_pylock_writer_and_reader_carry_the_base_lock(tmp_path: Path) -> None:
    path = write_pylock(tmp_path, render_base_lock(LOCK))
    text = path.read_text()
    data = tomllib.loads(text)
    Pylock.from_dict(data)  # still valid PEP 751
    assert "[tool.imgbuild.debian]" in text
    assert text.count("[[tool.imgbuild.debian.debs]]") == 7
    # The inputs' lists stay on one line each.
    packages = ", ".join(f'"{p}"' for p in INPUTS.packages)
    assert f"packages = [{packages}]" in text
    assert 'system-packages = ["libgomp1"]' in text
    lock = load_lock(path)
    assert lock.recorded is not None and lock.recorded.debian is not None
    again = parse_base_lock(lock.recorded.debian, source=lock.filename)
    assert again.inputs == INPUTS
    assert by_name(again) == by_name(LOCK)


def test_a_pylock_without_a_built_base_records_none(tmp_path: Path) -> None:
    path = write_pylock(tmp_path, None)
    assert "tool.imgbuild.debian" not in path.read_text()
    lock = load_lock(path)
    assert lock.recorded is not None and lock.recorded.debian is None


def test_a_hand_broken_base_lock_in_pylock_is_refused_by_name(tmp_path: Path) -> None:
    path = write_pylock(tmp_path, render_base_lock(LOCK))
    text = path.read_text().replace('layer = "system"', 'layer = "other"')
    path.write_text(text, encoding="utf-8")
    lock = load_lock(path)  # the reader keeps the table as written; the debian stage judges it
    assert lock.recorded is not None and lock.recorded.debian is not None
    with pytest.raises(LockError, match=r"^pylock\.toml: tool\.imgbuild\.debian is malformed"):
        parse_base_lock(lock.recorded.debian, source=lock.filename)
