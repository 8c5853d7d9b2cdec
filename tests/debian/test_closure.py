"""The package closure: real bookworm/trixie closures and small synthetic indexes for each rule."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from debian.debian_support import version_compare

from imagebuild.debian.closure import resolve_closure, to_locked
from imagebuild.debian.model import IndexedPackage
from imagebuild.digest import digest_bytes
from imagebuild.errors import DebianError

SCRIPT_ONLY = ("dpkg", "perl-base", "debconf")
"""What only maintainer scripts need; a distroless base excludes it."""

Packages = Callable[[str, str], tuple[IndexedPackage, ...]]


def pkg(
    name: str,
    version: str = "1.0",
    *,
    arch: str = "amd64",
    depends: str = "",
    pre_depends: str = "",
    provides: str = "",
    essential: bool = False,
    multi_arch: str = "",
    mirror: str = "http://deb.example/debian",
) -> IndexedPackage:
    return IndexedPackage(
        name=name,
        version=version,
        architecture=arch,
        filename=f"pool/main/{name[0]}/{name}/{name}_{version}_{arch}.deb",
        sha256=digest_bytes(f"{name} {version} {arch}".encode()),
        size=100,
        mirror=mirror,
        depends=depends,
        pre_depends=pre_depends,
        provides=provides,
        essential=essential,
        multi_arch=multi_arch,
    )


def names(closure: tuple[IndexedPackage, ...]) -> list[str]:
    return [p.name for p in closure]


def refusal(exc: pytest.ExceptionInfo[DebianError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# --- real archives -------------------------------------------------------------------------


@pytest.mark.debian
def test_the_bookworm_python_closure(debian_packages: Packages) -> None:
    indexes = [debian_packages("bookworm", "amd64"), debian_packages("bookworm-security", "amd64")]
    wanted = ["python3.11-minimal", "libpython3.11-stdlib", "ca-certificates", "tzdata"]
    closure = resolve_closure(indexes, wanted, arch="amd64", exclude=SCRIPT_ONLY)
    got = set(names(closure))
    assert {"libc6", "libssl3", "zlib1g", "libffi8", "openssl", *wanted} <= got
    assert got.isdisjoint(SCRIPT_ONLY)
    assert names(closure) == sorted(got)
    assert all(p.architecture in ("amd64", "all") for p in closure)
    # Without the exclusions, readline-common's "dpkg | install-info" and ca-certificates'
    # "debconf | debconf-2.0" pull both in: the exclusions are what keep them out.
    full = set(names(resolve_closure(indexes, wanted, arch="amd64")))
    assert {"dpkg", "debconf"} <= full
    # Each package is the newest either suite has (the security suite's when it is ahead).
    newest: dict[str, IndexedPackage] = {}
    for index in indexes:
        for entry in index:
            known = newest.get(entry.name)
            if known is None or version_compare(entry.version, known.version) > 0:
                newest[entry.name] = entry
    assert [(p.version, p.mirror) for p in closure] == [
        (newest[p.name].version, newest[p.name].mirror) for p in closure
    ]


@pytest.mark.debian
def test_the_trixie_python_closure(debian_packages: Packages) -> None:
    indexes = [debian_packages("trixie", "arm64")]
    wanted = ["python3.13-minimal", "libpython3.13-stdlib"]
    closure = resolve_closure(indexes, wanted, arch="arm64", exclude=SCRIPT_ONLY)
    got = set(names(closure))
    assert {"libc6", "libssl3t64", "zlib1g", "libffi8", "tzdata", "netbase", *wanted} <= got
    assert "libssl3" not in got  # the t64 rename provides it; the real name is not pulled
    assert got.isdisjoint(SCRIPT_ONLY)
    assert all(p.architecture in ("arm64", "all") for p in closure)


# --- versions and suites -------------------------------------------------------------------


def test_the_highest_version_across_indexes_wins() -> None:
    release = [pkg("app", depends="libfoo (>= 1.0)"), pkg("libfoo", "1.0")]
    updates = [pkg("libfoo", "1.0+deb12u1", mirror="http://deb.example/updates")]
    closure = resolve_closure([release, updates], ["app"], arch="amd64")
    libfoo = closure[names(closure).index("libfoo")]
    assert libfoo.version == "1.0+deb12u1" and libfoo.mirror == "http://deb.example/updates"
    # dpkg ordering, not string ordering: 1.0~rc1 is older than 1.0, 2:0.1 newer than 1.9.
    assert (
        resolve_closure([[pkg("x", "1.0~rc1")], [pkg("x", "1.0")]], ["x"], arch="amd64")[0].version
        == "1.0"
    )
    assert (
        resolve_closure([[pkg("x", "2:0.1")], [pkg("x", "1.9")]], ["x"], arch="amd64")[0].version
        == "2:0.1"
    )


@pytest.mark.parametrize(
    ("relation", "ok"),
    [
        ("libfoo (>= 1.2)", True),
        ("libfoo (>= 1.3)", False),
        ("libfoo (>> 1.1)", True),
        ("libfoo (>> 1.2)", False),
        ("libfoo (= 1.2)", True),
        ("libfoo (= 1.2-1)", False),
        ("libfoo (<= 1.2)", True),
        ("libfoo (<< 1.2)", False),
        ("libfoo (<< 1.10)", True),
    ],
)
def test_version_constraints(relation: str, ok: bool) -> None:
    index = [pkg("app", depends=relation), pkg("libfoo", "1.2")]
    if ok:
        assert names(resolve_closure([index], ["app"], arch="amd64")) == ["app", "libfoo"]
        return
    with pytest.raises(DebianError) as caught:
        resolve_closure([index], ["app"], arch="amd64")
    text = refusal(caught)
    assert f"{relation} (needed by app 1.0): no candidate meets it" in text
    assert "the indexes have libfoo 1.2" in text and "-updates" in text


def test_a_missing_package_names_who_needs_it() -> None:
    index = [pkg("app", depends="libc6, libgone1")]
    with pytest.raises(DebianError) as caught:
        resolve_closure([index, [pkg("libc6")]], ["app"], arch="amd64")
    text = refusal(caught)
    assert "libgone1 (needed by app 1.0): no index has it" in text
    assert "add the suite or component that has it" in text


def test_a_missing_wanted_package_is_refused() -> None:
    with pytest.raises(DebianError) as caught:
        resolve_closure([[pkg("app")]], ["pyhton3"], arch="amd64")
    assert "pyhton3 (needed by the base definition): no index has it" in refusal(caught)


# --- alternatives --------------------------------------------------------------------------


def test_alternatives_take_the_first_that_can_be_satisfied() -> None:
    index = [pkg("app", depends="mawk | gawk"), pkg("mawk"), pkg("gawk")]
    assert names(resolve_closure([index], ["app"], arch="amd64")) == ["app", "mawk"]
    index = [pkg("app", depends="missing | gawk (>= 2) | mawk"), pkg("gawk"), pkg("mawk")]
    assert names(resolve_closure([index], ["app"], arch="amd64")) == ["app", "mawk"]


def test_an_alternative_already_chosen_wins() -> None:
    index = [pkg("app", depends="mawk | gawk"), pkg("mawk"), pkg("gawk")]
    assert names(resolve_closure([index], ["gawk", "app"], arch="amd64")) == ["app", "gawk"]
    # Chosen later in the same walk counts too: tool pulls gawk before app's group is read.
    index.append(pkg("tool", depends="gawk"))
    closure = resolve_closure([index], ["tool", "app"], arch="amd64")
    assert names(closure) == ["app", "gawk", "tool"]


def test_no_alternative_satisfiable_names_the_group() -> None:
    index = [pkg("app", depends="foo (>= 2) | bar"), pkg("foo")]
    with pytest.raises(DebianError) as caught:
        resolve_closure([index], ["app"], arch="amd64")
    assert "foo (>= 2) | bar (needed by app 1.0): no candidate meets it" in refusal(caught)


# --- virtual packages ----------------------------------------------------------------------


def test_a_virtual_package_with_one_provider() -> None:
    index = [
        pkg("app", depends="mail-transport-agent"),
        pkg("exim4", provides="mail-transport-agent"),
    ]
    assert names(resolve_closure([index], ["app"], arch="amd64")) == ["app", "exim4"]


def test_a_virtual_package_with_several_providers_is_not_guessed() -> None:
    index = [
        pkg("base-files", pre_depends="awk"),
        pkg("mawk", provides="awk"),
        pkg("gawk", provides="awk"),
    ]
    with pytest.raises(DebianError) as caught:
        resolve_closure([index], ["base-files"], arch="amd64")
    text = refusal(caught)
    assert "awk (needed by base-files 1.0) is a virtual package several packages provide" in text
    assert "(gawk, mawk)" in text and "exclude awk" in text
    # Naming one settles it; excluding the virtual name drops the dependency.
    wanted = ["base-files", "mawk"]
    assert names(resolve_closure([index], wanted, arch="amd64")) == ["base-files", "mawk"]
    closure = resolve_closure([index], ["base-files"], arch="amd64", exclude=["awk"])
    assert names(closure) == ["base-files"]


def test_a_versioned_dependency_needs_a_versioned_provide() -> None:
    index = [
        pkg("app", depends="libz1 (>= 1.2)"),
        pkg("zlib-unversioned", provides="libz1"),
        pkg("zlib1g", "1:1.2.13", provides="libz1 (= 1:1.2.13)"),
    ]
    assert names(resolve_closure([index], ["app"], arch="amd64")) == ["app", "zlib1g"]
    index[2] = pkg("zlib1g", "1:1.2.13", provides="libz1 (= 1.1)")
    with pytest.raises(DebianError, match=r"libz1 \(>= 1.2\) \(needed by app 1.0\)"):
        resolve_closure([index], ["app"], arch="amd64")


def test_a_real_package_beats_providers_of_its_name() -> None:
    index = [
        pkg("app", depends="libssl3"),
        pkg("libssl3", "3.0"),
        pkg("libssl3t64", "3.5", provides="libssl3 (= 3.5)"),
    ]
    assert names(resolve_closure([index], ["app"], arch="amd64")) == ["app", "libssl3"]
    # A t64 rename: only the provider exists (as on trixie).
    del index[1]
    assert names(resolve_closure([index], ["app"], arch="amd64")) == ["app", "libssl3t64"]


# --- architectures -------------------------------------------------------------------------


def test_other_architectures_are_ignored_and_all_is_taken() -> None:
    index = [
        pkg("app", depends="libfoo, data", arch="arm64"),
        pkg("app", depends="libfoo, data"),
        pkg("libfoo", "9.0", arch="arm64"),
        pkg("libfoo", "1.0"),
        pkg("data", arch="all"),
    ]
    closure = resolve_closure([index], ["app"], arch="amd64")
    assert [(p.name, p.version, p.architecture) for p in closure] == [
        ("app", "1.0", "amd64"),
        ("data", "1.0", "all"),
        ("libfoo", "1.0", "amd64"),
    ]


@pytest.mark.parametrize(
    ("qualifier", "multi_arch", "ok"),
    [
        ("any", "allowed", True),
        ("any", "foreign", False),
        ("any", "", False),
        ("native", "", True),
        ("amd64", "", True),
        ("arm64", "", False),
    ],
)
def test_arch_qualifiers(qualifier: str, multi_arch: str, ok: bool) -> None:
    index = [pkg("tool", depends=f"python3:{qualifier}"), pkg("python3", multi_arch=multi_arch)]
    if ok:
        assert names(resolve_closure([index], ["tool"], arch="amd64")) == ["python3", "tool"]
    else:
        with pytest.raises(DebianError, match=rf"python3:{qualifier} \(needed by tool 1.0\)"):
            resolve_closure([index], ["tool"], arch="amd64")


# --- what is not pulled in -----------------------------------------------------------------


def test_essential_packages_are_not_pulled_in_implicitly() -> None:
    index = [pkg("app", depends="libc6"), pkg("libc6"), pkg("dash", essential=True)]
    assert names(resolve_closure([index], ["app"], arch="amd64")) == ["app", "libc6"]


def test_pre_depends_are_followed() -> None:
    index = [pkg("app", pre_depends="libc6 (>= 1.0)"), pkg("libc6")]
    assert names(resolve_closure([index], ["app"], arch="amd64")) == ["app", "libc6"]


def test_an_excluded_package_satisfies_what_needs_it_and_is_not_installed() -> None:
    index = [
        pkg("ca-certificates", depends="openssl, debconf (>= 0.5) | debconf-2.0"),
        pkg("openssl"),
        pkg("debconf", "1.5", provides="debconf-2.0"),
        pkg("cdebconf", provides="debconf-2.0"),
        pkg("readline-common", depends="dpkg (>= 99) | install-info"),
        pkg("install-info"),
    ]
    exclude = ["dpkg", "debconf"]
    closure = resolve_closure(
        [index], ["ca-certificates", "readline-common"], arch="amd64", exclude=exclude
    )
    # Not cdebconf for debconf-2.0, not install-info for dpkg: whatever version is asked.
    assert names(closure) == ["ca-certificates", "openssl", "readline-common"]


def test_a_package_both_wanted_and_excluded_is_refused() -> None:
    with pytest.raises(DebianError) as caught:
        resolve_closure([[pkg("dpkg")]], ["dpkg"], arch="amd64", exclude=["dpkg"])
    assert "dpkg: both wanted and excluded" in refusal(caught)


def test_an_unreadable_relation_is_refused() -> None:
    with pytest.raises(DebianError) as caught:
        resolve_closure([[pkg("app", depends="libfoo (>= )")]], ["app"], arch="amd64")
    assert "app 1.0: unreadable relation 'libfoo (>= )'" in refusal(caught)


def test_to_locked_keeps_what_a_lock_needs() -> None:
    entry = pkg("netbase", "6.4", arch="all")
    locked = to_locked(entry)
    assert (locked.name, locked.version, locked.architecture) == ("netbase", "6.4", "all")
    assert locked.url == "http://deb.example/debian/pool/main/n/netbase/netbase_6.4_all.deb"
    assert locked.pool_path == "pool/main/n/netbase/netbase_6.4_all.deb"
    assert (locked.sha256, locked.size) == (entry.sha256, entry.size)
