from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.tags import Tag, sys_tags

from imagebuild.errors import TargetError
from imagebuild.project.spec import ProjectSpec, load_project
from imagebuild.target.platform import TargetPlatform, arch_from_oci

CASES = Path(__file__).parent / "cases" / "wheels"


@dataclass(frozen=True)
class File:
    filename: str


def wheels(listing: str) -> list[File]:
    """Real wheel file names of one release, as PyPI lists them."""
    return [File(line) for line in (CASES / listing).read_text().split() if line]


def target(
    py: tuple[int, int] = (3, 11),
    libc: str = "glibc",
    libc_version: tuple[int, int] = (2, 36),
    arch: str = "x86_64",
) -> TargetPlatform:
    return TargetPlatform(
        python_version=py,
        libc=libc,
        libc_version=libc_version,
        arch=arch,
    )


def test_glibc_platforms_x86_64() -> None:
    plats = target().platforms()
    assert plats[:2] == ("manylinux_2_36_x86_64", "manylinux_2_35_x86_64")
    i = plats.index("manylinux_2_17_x86_64")
    assert plats[i + 1] == "manylinux2014_x86_64"
    assert plats[plats.index("manylinux_2_12_x86_64") + 1] == "manylinux2010_x86_64"
    assert plats[-3:] == ("manylinux_2_5_x86_64", "manylinux1_x86_64", "linux_x86_64")
    assert len(plats) == (36 - 5 + 1) + 3 + 1


def test_glibc_platforms_aarch64_stop_at_2_17() -> None:
    plats = target(libc_version=(2, 28), arch="aarch64").platforms()
    assert plats[0] == "manylinux_2_28_aarch64"
    assert plats[-3:] == ("manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64")
    assert not any("manylinux2010" in p or "manylinux1" in p for p in plats)


def test_musl_platforms() -> None:
    plats = target(libc="musl", libc_version=(1, 2), arch="aarch64").platforms()
    assert plats == (
        "musllinux_1_2_aarch64",
        "musllinux_1_1_aarch64",
        "musllinux_1_0_aarch64",
        "linux_aarch64",
    )


def test_tag_order() -> None:
    tags = [str(t) for t in target(libc_version=(2, 17)).tags()]
    assert tags[0] == "cp311-cp311-manylinux_2_17_x86_64"
    assert tags[1] == "cp311-cp311-manylinux2014_x86_64"
    order = [
        "cp311-cp311-linux_x86_64",
        "cp311-abi3-manylinux_2_17_x86_64",
        "cp311-none-manylinux_2_17_x86_64",
        "cp310-abi3-manylinux_2_17_x86_64",
        "cp32-abi3-linux_x86_64",
        "py311-none-manylinux_2_17_x86_64",
        "py3-none-manylinux_2_17_x86_64",
        "cp311-none-any",
        "py311-none-any",
        "py3-none-any",
        "py30-none-any",
    ]
    assert [tags.index(t) for t in order] == sorted(tags.index(t) for t in order)
    assert len(tags) == len(set(tags))
    assert not any("cp312" in t or "win" in t or "macosx" in t for t in tags)


def test_matches_packaging_for_the_host() -> None:
    """For a target equal to this host, the tags are packaging's sys_tags().

    packaging ranks the host's own ``linux_<arch>`` first (wheels built on this machine);
    for an image we rank it last, so compare without those.
    """
    major, minor = map(int, platform.libc_ver()[1].split(".")[:2])
    host = target(py=sys.version_info[:2], libc_version=(major, minor), arch=platform.machine())
    ours = [t for t in host.tags() if not t.platform.startswith("linux_")]
    theirs = [t for t in sys_tags() if not t.platform.startswith("linux_")]
    assert ours == theirs
    assert set(host.tags()) == set(sys_tags())


@pytest.mark.parametrize(
    ("listing", "tgt", "expected"),
    [
        (
            "numpy-2.1.0.txt",
            target(),
            "numpy-2.1.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        ),
        (
            "numpy-2.1.0.txt",
            target(py=(3, 13), libc_version=(2, 28), arch="aarch64"),
            "numpy-2.1.0-cp313-cp313-manylinux_2_17_aarch64.manylinux2014_aarch64.whl",
        ),
        (
            "numpy-2.1.0.txt",
            target(libc="musl", libc_version=(1, 2)),
            "numpy-2.1.0-cp311-cp311-musllinux_1_1_x86_64.whl",
        ),
        (
            "numpy-2.1.0.txt",
            target(py=(3, 12), libc="musl", libc_version=(1, 2), arch="aarch64"),
            "numpy-2.1.0-cp312-cp312-musllinux_1_2_aarch64.whl",
        ),
        (
            "pandas-2.2.3.txt",
            target(py=(3, 12), arch="aarch64"),
            "pandas-2.2.3-cp312-cp312-manylinux2014_aarch64.manylinux_2_17_aarch64.whl",
        ),
        (
            "pandas-2.2.3.txt",
            target(py=(3, 13), libc="musl", libc_version=(1, 2)),
            "pandas-2.2.3-cp313-cp313-musllinux_1_2_x86_64.whl",
        ),
        (
            "pydantic-core-2.27.2.txt",
            target(arch="i686"),
            "pydantic_core-2.27.2-cp311-cp311-manylinux_2_5_i686.manylinux1_i686.whl",
        ),
        (
            "pydantic-core-2.27.2.txt",
            target(libc="musl", libc_version=(1, 2), arch="armv7l"),
            "pydantic_core-2.27.2-cp311-cp311-musllinux_1_1_armv7l.whl",
        ),
    ],
)
def test_choose_real_wheels(listing: str, tgt: TargetPlatform, expected: str) -> None:
    assert tgt.choose_wheel("x", wheels(listing)).filename == expected


@pytest.mark.parametrize(
    ("listing", "tgt", "described"),
    [
        ("numpy-2.1.0.txt", target(libc_version=(2, 12)), "cp311 manylinux_2_12 x86_64"),
        ("numpy-2.1.0.txt", target(py=(3, 14)), "cp314 manylinux_2_36 x86_64"),
        ("pandas-2.2.3.txt", target(libc="musl", libc_version=(1, 1)), "cp311 musllinux_1_1"),
    ],
)
def test_no_compatible_wheel(listing: str, tgt: TargetPlatform, described: str) -> None:
    files = wheels(listing)
    with pytest.raises(TargetError) as info:
        tgt.choose_wheel(files[0].filename.split("-")[0], files)
    message = str(info.value)
    assert "\n" not in message
    assert described in message
    assert files[0].filename in message and files[-1].filename in message
    assert message.startswith(f"no wheel of {files[0].filename.split('-')[0].replace('_', '-')}")


def test_specific_abi_beats_abi3_and_pure() -> None:
    files = [
        File("foo-1.0-py3-none-any.whl"),
        File("foo-1.0-cp38-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"),
        File("foo-1.0-cp311-cp311-manylinux_2_17_x86_64.whl"),
        File("foo-1.0-cp311-cp311-manylinux_2_28_x86_64.whl"),
    ]
    ranked = [f.filename for f in target().rank_wheels(files)]
    assert ranked == [
        "foo-1.0-cp311-cp311-manylinux_2_28_x86_64.whl",
        "foo-1.0-cp311-cp311-manylinux_2_17_x86_64.whl",
        "foo-1.0-cp38-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "foo-1.0-py3-none-any.whl",
    ]
    # A glibc too old for 2_28 falls back to the 2_17 wheel.
    assert target(libc_version=(2, 27)).choose_wheel("foo", files) == files[2]


def test_build_tag_breaks_ties() -> None:
    files = [
        File("foo-1.0-py3-none-any.whl"),
        File("foo-1.0-9-py3-none-any.whl"),
        File("foo-1.0-10b-py3-none-any.whl"),
        File("foo-1.0-10a-py3-none-any.whl"),
        File("not-a-wheel.tar.gz"),
    ]
    assert [f.filename for f in target().rank_wheels(files)] == [
        "foo-1.0-10b-py3-none-any.whl",
        "foo-1.0-10a-py3-none-any.whl",
        "foo-1.0-9-py3-none-any.whl",
        "foo-1.0-py3-none-any.whl",
    ]


def test_marker_environment() -> None:
    env = target(py=(3, 12), arch="aarch64").marker_environment()
    assert env["python_version"] == "3.12"
    assert env["python_full_version"] == "3.12.0"
    assert env["platform_machine"] == "aarch64"
    assert Marker("sys_platform == 'linux' and os_name == 'posix'").evaluate(env)
    assert Marker("platform_system == 'Linux' and implementation_name == 'cpython'").evaluate(env)
    assert not Marker("python_version < '3.12'").evaluate(env)
    assert not Marker("platform_machine == 'x86_64'").evaluate(env)
    full = TargetPlatform(
        python_version=(3, 12), python_full_version="3.12.7", libc_version=(2, 36), arch="x86_64"
    )
    assert Marker("python_full_version >= '3.12.5'").evaluate(full.marker_environment())


def test_oci_arch_mapping() -> None:
    assert arch_from_oci("amd64") == "x86_64"
    assert arch_from_oci("arm64") == "aarch64"
    assert arch_from_oci("arm64", "v8") == "aarch64"
    assert arch_from_oci("arm", "v7") == "armv7l"
    with pytest.raises(TargetError, match="unsupported image architecture 'mips64'"):
        arch_from_oci("mips64")
    with pytest.raises(TargetError):
        arch_from_oci("arm", "v6")
    t = TargetPlatform.from_oci(architecture="arm64", python_version=(3, 11), libc_version=(2, 36))
    assert t.arch == "aarch64"
    assert t.describe() == "cp311 manylinux_2_36 aarch64"


def test_invalid_targets() -> None:
    with pytest.raises(TargetError):
        target(py=(2, 7))
    with pytest.raises(TargetError):
        target(libc="bionic")
    with pytest.raises(TargetError):
        target(arch="sparc")
    with pytest.raises(TargetError):
        TargetPlatform(
            python_version=(3, 11),
            python_full_version="3.12.1",
            libc_version=(2, 36),
            arch="x86_64",
        )


def test_value_semantics() -> None:
    assert target() == target()
    assert hash(target()) == hash(target())
    assert isinstance(target().tags()[0], Tag)


# -- base and Python choice (imagebuild.target.choose) ---------------------------------------


def _spec(tmp_path: Path, extra: str = "") -> ProjectSpec:
    (tmp_path / "pyproject.toml").write_text(
        f'[project]\nname = "p"\nversion = "1"\n{extra}', encoding="utf-8"
    )
    return load_project(tmp_path)


def test_default_python_is_the_newest_allowed(tmp_path: Path) -> None:
    from imagebuild.target.base import load_catalog
    from imagebuild.target.choose import default_python

    catalog = load_catalog()
    newest = max(e.python_version for e in catalog if e.flavor == "distroless")
    assert default_python(catalog, "distroless", _spec(tmp_path)) == newest
    project = _spec(tmp_path, 'requires-python = "<3.12"\n')
    assert default_python(catalog, "distroless", project) == (3, 11)


def test_default_python_reads_python_version_file(tmp_path: Path) -> None:
    from imagebuild.target.base import load_catalog
    from imagebuild.target.choose import default_python

    project = _spec(tmp_path)
    (tmp_path / ".python-version").write_text("3.12.4\n")
    assert default_python(load_catalog(), "distroless", project) == (3, 12)


def test_default_python_none_allowed(tmp_path: Path) -> None:
    from imagebuild.errors import ProjectError
    from imagebuild.target.base import load_catalog
    from imagebuild.target.choose import default_python

    project = _spec(tmp_path, 'requires-python = ">=4"\n')
    with pytest.raises(ProjectError, match="allows no Python of base 'distroless'") as info:
        default_python(load_catalog(), "distroless", project)
    assert info.value.hint == "loosen requires-python; no base in the catalog fits it"


def test_default_python_names_a_base_that_fits(tmp_path: Path) -> None:
    """distroless has 3.11 and 3.13: a project for 3.14 is told which base offers it."""
    from imagebuild.errors import ProjectError
    from imagebuild.target.base import load_catalog
    from imagebuild.target.choose import default_python

    project = _spec(tmp_path, 'requires-python = ">=3.14"\n')
    with pytest.raises(ProjectError, match="allows no Python of base 'distroless'") as info:
        default_python(load_catalog(), "distroless", project)
    assert info.value.hint == 'set [tool.imgbuild] base = "debian-slim-trixie" with python = "3.14"'
    # A patch-level bound admits its minor version, as uv reads requires-python.
    patch = _spec(tmp_path, 'requires-python = ">=3.13.2,<3.14"\n')
    assert default_python(load_catalog(), "distroless", patch) == (3, 13)


def test_base_reference(tmp_path: Path) -> None:
    from imagebuild.project.settings import parse_settings
    from imagebuild.target.base import find_entry, load_catalog
    from imagebuild.target.choose import base_reference

    project = _spec(tmp_path)
    entry, reference = base_reference(parse_settings({"python": "3.11"}), project)
    assert entry == find_entry(load_catalog(), "debian", (3, 11))
    assert reference == entry.reference == "imgbuild.invalid/debian:3.11-bookworm"
    assert entry.built
    custom = parse_settings({"base": "registry.example/py:3"})
    assert base_reference(custom, project) == (None, "registry.example/py:3")


def test_a_catalog_is_read_once_until_a_file_of_it_changes(tmp_path: Path) -> None:
    """A build asks for the catalog twice (and a server's builds inherit it read): the same
    files give the same entries without reading them again; a file rewritten is read."""
    from imagebuild.target.base import load_catalog

    directory = tmp_path / "catalog"
    directory.mkdir()
    alpine = directory / "alpine.toml"
    text = (Path(__file__).parents[1] / "base-images" / "alpine.toml").read_text()
    alpine.write_text(text)
    first = load_catalog([directory])
    assert load_catalog([directory]) is first  # not read again
    alpine.write_text(text.replace('name = "alpine"', 'name = "alpine-edge"'))
    again = load_catalog([directory])
    assert {e.flavor for e in first} == {"alpine"}
    assert {e.flavor for e in again} == {"alpine-edge"}
    (directory / "more.toml").write_text(text.replace('name = "alpine"', 'name = "more"'))
    assert {e.flavor for e in load_catalog([directory])} == {"alpine-edge", "more"}


def test_a_wheel_this_machine_built_must_fit_the_image() -> None:
    major, minor = sys.version_info[:2]
    machine = platform.machine()
    here = target(py=(major, minor), arch=machine)
    own = f"cp{major}{minor}-cp{major}{minor}-linux_{machine}"
    for fits in (
        f"app-1.0-{own}.whl",
        "app-1.0-py3-none-any.whl",
        f"app-1.0-cp38-abi3-linux_{machine}.whl",
    ):
        here.check_built(fits, "project app")
    target(py=(3, 14), arch=machine).check_built(f"app-1.0-cp38-abi3-linux_{machine}.whl", "x")
    newer = (major, minor + 1)
    with pytest.raises(TargetError) as info:
        target(py=newer, arch=machine).check_built(f"app-1.0-{own}.whl", "project app (/src/app)")
    assert str(info.value).startswith(
        f"project app (/src/app): its wheel app-1.0-{own}.whl holds extension modules built for "
        f"this machine (CPython {major}.{minor} on {machine}), which the image "
        f"(cp{major}{minor + 1} manylinux_2_36 {machine}) cannot import; give the image this "
        f"machine's Python (--python {major}.{minor}): imgbuild runs build backends"
    )
    other = "aarch64" if machine == "x86_64" else "x86_64"
    with pytest.raises(TargetError) as info:
        target(py=(major, minor), arch=other).check_built(f"app-1.0-{own}.whl", "app")
    assert info.value.hint is not None and info.value.hint.startswith(f"build on a {other} machine")
