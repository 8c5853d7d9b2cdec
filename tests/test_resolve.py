"""The resolver: data-driven cases in tests/cases/resolve/*.toml over an in-memory index.

Case file format (one case per file; the file name is the test id):

    # what the case shows
    roots = ["a>=1", "b[x]"]
    prereleases = false                 # optional
    preferences = { b = "1.0" }         # optional, name -> version (the existing lock)
    origins = { "a>=1" = "group dev" }  # optional, str(requirement) -> origin

    [target]                            # optional; these are the defaults
    python = "3.11"                     # or a full version, "3.11.4"
    libc = "glibc"
    libc_version = "2.36"
    arch = "x86_64"

    [index.a."1.0"]                     # project a, version 1.0 (all keys optional)
    requires = ["b>=1", "c; extra == 'x'"]
    requires_python = ">=3.8"           # on the index page and in the metadata
    metadata_requires_python = ">=3.12" # in the metadata only (the page says nothing)
    yanked = true                       # or a reason string
    yanked_tags = ["py2-none-any"]      # extra wheels of a live version that are yanked
    tags = ["py3-none-any"]             # one wheel per tag (the default is py3-none-any)
    sdist = true                        # an sdist besides the wheels
    sdist_only = true                   # no wheels at all
    unreadable = true                   # metadata() fails (an sdist that needs a build)
    extras = ["x"]                      # Provides-Extra besides those the markers name

    [expected]                          # either: the pins, all of them
    a = "1.0"
    b = { version = "1.0", extras = ["x"], dependencies = ["c"] }

    conflict = ["substring", "..."]     # or: ResolutionError whose message has these
"""

from __future__ import annotations

import hashlib
import random
import re
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from imagebuild.errors import PackageIndexError, ResolutionError
from imagebuild.build.sdist import sdist_metadata
from imagebuild.index.model import DistMetadata, IndexFile
from imagebuild.index.simple import SimpleIndex
from imagebuild.lock.resolve import Resolution, resolve
from imagebuild.target.platform import TargetPlatform
from tests.fixtures.index_server import LocalIndex

CASES = Path(__file__).parent / "cases" / "resolve"
_EXTRA_RE = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")


# -- an in-memory PackageIndex ---------------------------------------------------------------


@dataclass
class FakeIndex:
    """``PackageIndex`` over case data; records the calls so tests can look at the traffic."""

    projects: Mapping[str, Mapping[str, Mapping[str, Any]]]
    shuffle: random.Random | None = None
    files_calls: list[str] = field(default_factory=list)
    metadata_calls: list[str] = field(default_factory=list)
    prefetched: list[str] = field(default_factory=list)
    prefetched_metadata: list[str] = field(default_factory=list)

    def _entry(self, file: IndexFile) -> Mapping[str, Any]:
        for name, versions in self.projects.items():
            if canonicalize_name(name) == file.name:
                for version, entry in versions.items():
                    if Version(version) == file.version:
                        return entry
        raise AssertionError(f"{file.filename} is not in the fake index")

    def files(self, name: NormalizedName) -> tuple[IndexFile, ...]:
        self.files_calls.append(name)
        out: list[IndexFile] = []
        for project, versions in self.projects.items():
            if canonicalize_name(project) != name:
                continue
            for version, entry in versions.items():
                out.extend(_files(name, version, entry))
        if self.shuffle is not None:
            self.shuffle.shuffle(out)
        return tuple(out)

    def metadata(self, file: IndexFile) -> DistMetadata:
        self.metadata_calls.append(file.filename)
        entry = self._entry(file)
        if entry.get("unreadable"):
            raise PackageIndexError(f"{file.filename}: metadata needs a build (fake)")
        requires = tuple(Requirement(r) for r in entry.get("requires", ()))
        provided = set(entry.get("extras", ()))
        provided.update(m for req in requires for m in _EXTRA_RE.findall(str(req.marker or "")))
        rp = entry.get("metadata_requires_python", entry.get("requires_python"))
        return DistMetadata(
            name=file.name,
            version=file.version,
            requires_dist=requires,
            requires_python=SpecifierSet(rp) if rp is not None else None,
            provides_extra=tuple(sorted(canonicalize_name(e) for e in provided)),
        )

    def prefetch(self, names: Iterable[NormalizedName]) -> None:
        self.prefetched.extend(names)

    def prefetch_metadata(self, files: Iterable[IndexFile]) -> None:
        self.prefetched_metadata.extend(f.filename for f in files)


def _files(name: str, version: str, entry: Mapping[str, Any]) -> list[IndexFile]:
    stem = f"{name.replace('-', '_')}-{version}"
    names = (
        []
        if entry.get("sdist_only")
        else [f"{stem}-{tag}.whl" for tag in entry.get("tags", ["py3-none-any"])]
    )
    if entry.get("sdist") or entry.get("sdist_only"):
        names.append(f"{stem}.tar.gz")
    names += [f"{stem}-{tag}.whl" for tag in entry.get("yanked_tags", ())]
    rp = entry.get("requires_python")
    out = []
    for filename in names:
        yanked = entry.get("yanked", False)
        if any(filename.endswith(f"-{tag}.whl") for tag in entry.get("yanked_tags", ())):
            yanked = "bad build"
        out.append(
            IndexFile(
                filename=filename,
                url=f"https://fake.invalid/files/{filename}",
                sha256=hashlib.sha256(filename.encode()).hexdigest(),
                requires_python=SpecifierSet(rp) if rp is not None else None,
                yanked=None if yanked is False else ("" if yanked is True else str(yanked)),
                index_url="https://fake.invalid/simple/",
            )
        )
    return out


# -- the cases -------------------------------------------------------------------------------


def _target(data: Mapping[str, str]) -> TargetPlatform:
    python = str(data.get("python", "3.11"))
    parts = python.split(".")
    major, minor = (int(p) for p in python.split(".")[:2])
    libc_major, libc_minor = (int(p) for p in data.get("libc_version", "2.36").split("."))
    return TargetPlatform(
        python_version=(major, minor),
        python_full_version=python if len(parts) > 2 else None,
        libc=data.get("libc", "glibc"),  # type: ignore[arg-type]
        libc_version=(libc_major, libc_minor),
        arch=data.get("arch", "x86_64"),  # type: ignore[arg-type]
    )


def _run(case: Mapping[str, Any], index: FakeIndex | None = None) -> Resolution:
    return resolve(
        [Requirement(r) for r in case["roots"]],
        index=index or FakeIndex(case.get("index", {})),
        target=_target(case.get("target", {})),
        prereleases=case.get("prereleases", False),
        preferences={
            canonicalize_name(k): Version(v) for k, v in case.get("preferences", {}).items()
        },
        origins=case.get("origins"),
    )


def _case_files() -> list[Path]:
    return sorted(CASES.glob("*.toml"))


def test_cases_are_well_formed() -> None:
    files = _case_files()
    assert len(files) >= 20
    for path in files:
        case = tomllib.loads(path.read_text())
        assert ("expected" in case) != ("conflict" in case), path.name
        assert case["roots"], path.name


@pytest.mark.parametrize("path", _case_files(), ids=lambda p: p.stem)
def test_case(path: Path) -> None:
    case = tomllib.loads(path.read_text())
    if "conflict" in case:
        with pytest.raises(ResolutionError) as info:
            _run(case)
        message = str(info.value)
        assert "\n" not in message
        for expected in case["conflict"]:
            assert expected in message, f"{expected!r} not in {message!r}"
        return
    result = _run(case)
    got = {pin.name: pin for pin in result.pins}
    assert sorted(got) == sorted(canonicalize_name(n) for n in case["expected"])
    for name, want in case["expected"].items():
        pin = got[canonicalize_name(name)]
        spec = want if isinstance(want, dict) else {"version": want}
        assert pin.version == Version(spec["version"]), name
        assert list(pin.extras) == spec.get("extras", []), name
        if "dependencies" in spec:
            assert list(pin.dependencies) == spec["dependencies"], name


# -- properties the case format can't express ------------------------------------------------


def _simple(**projects: Mapping[str, Mapping[str, Any]]) -> FakeIndex:
    return FakeIndex(projects)


TARGET = _target({})


def test_pin_carries_every_live_file_sorted_and_values_are_sorted() -> None:
    index = _simple(
        zed={
            "1.0": {
                "tags": [
                    "cp311-cp311-manylinux_2_17_x86_64",
                    "cp311-cp311-win_amd64",
                    "cp311-cp311-manylinux_2_17_aarch64",
                ],
                "sdist": True,
            }
        },
        app={"1.0": {"requires": ["zed", "mid"]}},
        mid={"1.0": {}},
    )
    result = resolve([Requirement("app")], index=index, target=TARGET)
    assert [p.name for p in result.pins] == ["app", "mid", "zed"]
    zed = result.pins[2]
    assert [f.filename for f in zed.files] == [
        "zed-1.0-cp311-cp311-manylinux_2_17_aarch64.whl",
        "zed-1.0-cp311-cp311-manylinux_2_17_x86_64.whl",
        "zed-1.0-cp311-cp311-win_amd64.whl",
        "zed-1.0.tar.gz",
    ]
    assert result.pins[0].dependencies == ("mid", "zed")
    assert result.target == TARGET
    # Dependencies were read from the target's wheel, not the sdist or another platform's.
    # (The look-ahead pool may read the same file too: the fake does not memoise as
    # SimpleIndex does.)
    zed_reads = {c for c in index.metadata_calls if c.startswith("zed-")}
    assert zed_reads == {"zed-1.0-cp311-cp311-manylinux_2_17_x86_64.whl"}


def test_yanked_file_of_a_live_version_is_left_out_of_the_pin() -> None:
    index = _simple(a={"1.0": {"yanked_tags": ["py2-none-any"], "sdist": True}})
    result = resolve([Requirement("a")], index=index, target=TARGET)
    assert [f.filename for f in result.pins[0].files] == ["a-1.0-py3-none-any.whl", "a-1.0.tar.gz"]


def _all_case_data() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in _case_files():
        case = tomllib.loads(path.read_text())
        if "expected" in case:
            yield path.stem, case


def test_deterministic_whatever_order_the_index_lists_files() -> None:
    for stem, case in _all_case_data():
        first = _run(case)
        for seed in range(3):
            index = FakeIndex(case.get("index", {}), shuffle=random.Random(seed))
            assert _run(case, index) == first, stem


def test_prefetch_hints_are_given_but_not_relied_on() -> None:
    index = _simple(
        a={"2.0": {"requires": ["b", "c"]}, "1.0": {}},
        b={"1.0": {}},
        c={"1.0": {}},
    )
    resolve([Requirement("a")], index=index, target=TARGET)
    assert index.prefetched[0] == "a"
    assert {"b", "c"} <= set(index.prefetched)
    assert "a-2.0-py3-none-any.whl" in index.prefetched_metadata
    # Only the first candidate: judging the runner-up would cost what laziness saves.
    assert "a-1.0-py3-none-any.whl" not in index.prefetched_metadata


def test_origins_name_where_a_root_came_from() -> None:
    index = _simple(a={"1.0": {}})
    with pytest.raises(ResolutionError, match=r"a>=2 \(from dependency-groups.dev\)"):
        resolve(
            [Requirement("a>=2")],
            index=index,
            target=TARGET,
            origins={"a>=2": "dependency-groups.dev"},
        )


def test_unreadable_sdist_names_the_package_and_chains() -> None:
    index = _simple(a={"1.0": {"sdist_only": True, "unreadable": True}})
    with pytest.raises(ResolutionError, match=r"dependencies of a 1\.0: a-1\.0\.tar\.gz") as e:
        resolve([Requirement("a")], index=index, target=TARGET)
    assert isinstance(e.value.__cause__, PackageIndexError)


def test_extra_the_package_does_not_provide_is_warned_about() -> None:
    warnings: list[str] = []

    class Collect:
        def step(self, message: str) -> None:
            pass

        def warn(self, message: str) -> None:
            warnings.append(message)

    index = _simple(a={"1.0": {}})
    result = resolve([Requirement("a[nope]")], index=index, target=TARGET, reporter=Collect())
    assert [(p.name, p.extras) for p in result.pins] == [("a", ("nope",))]
    assert warnings == ["a 1.0 does not provide the extra 'nope'"]


def test_direct_url_requirement_is_refused() -> None:
    with pytest.raises(ResolutionError, match="direct URL requirements are not supported"):
        resolve(
            [Requirement("a @ https://example.invalid/a-1.0-py3-none-any.whl")],
            index=_simple(),
            target=TARGET,
        )


def test_wide_backtracking_finishes_quickly() -> None:
    # b N requires c==N; c N requires d<=0 except c 0: ~forty rounds of backtracking.
    n = 40
    projects: dict[str, dict[str, dict[str, Any]]] = {
        "b": {f"{i}.0": {"requires": [f"c=={i}.0"]} for i in range(n)},
        "c": {f"{i}.0": {"requires": ["d>=1" if i else "d<1"]} for i in range(n)},
        "d": {"0.5": {}, "1.0": {}},
    }
    start = time.perf_counter()
    result = resolve(
        [Requirement("b"), Requirement("d<1")], index=FakeIndex(projects), target=TARGET
    )
    assert time.perf_counter() - start < 10
    assert {p.name: str(p.version) for p in result.pins} == {"b": "0.0", "c": "0.0", "d": "0.5"}


# -- over the real local index server --------------------------------------------------------


def test_resolve_over_the_local_index_server(fresh_index: LocalIndex, tmp_path: Path) -> None:
    fresh_index.add_wheel("rs-app", "1.0", requires=["rs-lib>=1", "rs-extra; extra == 'x'"])
    fresh_index.add_wheel("rs-app", "0.9", requires=["rs-lib"])
    fresh_index.add_wheel("rs-lib", "1.0")
    fresh_index.add_wheel("rs-lib", "1.5", yanked="broken")
    fresh_index.add_wheel("rs-lib", "2.0", requires_python=">=3.99")
    fresh_index.add_wheel("rs-lib", "2.1", tags="cp311-cp311-musllinux_1_2_x86_64")
    fresh_index.add_wheel("rs-extra", "0.1", requires=["rs-lib<2; python_version < '3.11'"])
    with (
        httpx.Client() as http,
        SimpleIndex(
            http, [fresh_index.url], cache_dir=tmp_path, sdist_metadata=sdist_metadata
        ) as index,
    ):
        result = resolve([Requirement("rs-app[x]")], index=index, target=TARGET)
    assert {p.name: (str(p.version), p.extras) for p in result.pins} == {
        "rs-app": ("1.0", ("x",)),
        "rs-extra": ("0.1", ()),
        "rs-lib": ("1.0", ()),
    }
    app, extra, lib = result.pins
    assert app.dependencies == ("rs-extra", "rs-lib")
    assert extra.dependencies == ()
    assert [f.filename for f in lib.files] == ["rs_lib-1.0-py3-none-any.whl"]
    assert lib.files[0].url == fresh_index.file_url("rs_lib-1.0-py3-none-any.whl")
    assert lib.files[0].sha256 == fresh_index.files_for("rs-lib")[0].sha256
    # Dependencies came from PEP 658 metadata files: no wheel was downloaded.
    assert not [path for _, path in fresh_index.requests if path.endswith(".whl")]


def test_wheel_metadata_failure_stays_an_index_error() -> None:
    index = _simple(a={"1.0": {"unreadable": True}})
    with pytest.raises(PackageIndexError, match="metadata needs a build"):
        resolve([Requirement("a")], index=index, target=TARGET)


def test_no_roots_on_this_target_resolve_to_nothing() -> None:
    index = _simple(a={"1.0": {}})
    result = resolve([Requirement("a; sys_platform == 'darwin'")], index=index, target=TARGET)
    assert result == resolve([], index=index, target=TARGET)
    assert result.pins == ()
    assert index.files_calls == []
