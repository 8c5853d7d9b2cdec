"""Base catalog and facts read off base layers (interpreter, libc, shell)."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path, PurePosixPath

import pytest

from imagebuild.target.base import find_entry, inspect_layers, load_catalog
from imagebuild.errors import TargetError


def _layer(path: Path, files: dict[str, bytes], *, compress: bool = True) -> Path:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(raw.getvalue()) if compress else raw.getvalue())
    return path


GLIBC = b"\x00junk GNU C Library (Debian GLIBC 2.36-9+deb12u13) stable release version 2.36.\n"


def test_catalog_has_the_pulled_and_the_built_flavors() -> None:
    catalog = load_catalog()
    assert {e.flavor for e in catalog} == {
        "alpine",
        "debian",
        "debian-shell",
        "debian-slim",
        "debian-slim-trixie",
        "distroless",
    }
    built = {(e.flavor, e.python_version, e.recipe.suite) for e in catalog if e.recipe}
    assert built == {
        ("debian", (3, 11), "bookworm"),
        ("debian", (3, 13), "trixie"),
        ("debian-shell", (3, 11), "bookworm"),
        ("debian-shell", (3, 13), "trixie"),
    }
    shell_less = find_entry(catalog, "debian", (3, 11))
    assert shell_less.reference == "imgbuild.invalid/debian:3.11-bookworm"
    assert not shell_less.shell and find_entry(catalog, "debian-shell", (3, 13)).shell
    assert shell_less.recipe is not None and "python3.11-minimal" in shell_less.recipe.packages
    distroless = find_entry(catalog, "distroless", (3, 11))
    assert distroless.reference == "gcr.io/distroless/python3-debian12:latest"
    assert distroless.interpreter == PurePosixPath("/usr/bin/python3.11")
    assert not distroless.shell
    assert find_entry(catalog, "alpine", None).libc == "musl"


@pytest.mark.parametrize("minor", [12, 13, 14])
@pytest.mark.parametrize(
    ("flavor", "reference", "libc"),
    [
        ("debian-slim", "python:3.{minor}-slim-bookworm", ("glibc", (2, 36))),
        ("debian-slim-trixie", "python:3.{minor}-slim-trixie", ("glibc", (2, 41))),
        ("alpine", "python:3.{minor}-alpine", ("musl", (1, 2))),
    ],
)
def test_catalog_is_current(
    minor: int, flavor: str, reference: str, libc: tuple[str, tuple[int, int]]
) -> None:
    """Python 3.12 to 3.14 on Debian 12 and 13 slim and on Alpine, from /usr/local."""
    entry = find_entry(load_catalog(), flavor, (3, minor))
    assert entry.reference == reference.format(minor=minor)
    assert entry.interpreter == PurePosixPath(f"/usr/local/bin/python3.{minor}")
    assert (entry.libc, entry.libc_version) == libc
    assert entry.shell


def test_catalog_has_distroless_on_debian_12_and_13() -> None:
    catalog = load_catalog()
    debian12 = find_entry(catalog, "distroless", (3, 11))
    debian13 = find_entry(catalog, "distroless", (3, 13))
    assert debian12.reference == "gcr.io/distroless/python3-debian12:latest"
    assert debian13.reference == "gcr.io/distroless/python3-debian13:latest"
    assert (debian12.libc_version, debian13.libc_version) == ((2, 36), (2, 41))
    # The newest Python each flavor offers is its default.
    assert find_entry(catalog, "debian-slim", None).python_version == (3, 14)
    assert find_entry(catalog, "distroless", None).python_version == (3, 13)


def test_catalog_errors_list_choices() -> None:
    catalog = load_catalog()
    with pytest.raises(TargetError, match="unknown base 'ubuntu'") as info:
        find_entry(catalog, "ubuntu", None)
    assert "distroless" in (info.value.hint or "")
    with pytest.raises(TargetError, match=r"has no Python 3.9 \(available: 3.11, 3.13\)"):
        find_entry(catalog, "distroless", (3, 9))


def test_distroless_like_layers(tmp_path: Path) -> None:
    first = _layer(
        tmp_path / "a.tar.gz",
        {"usr/lib/x86_64-linux-gnu/libc.so.6": GLIBC, "etc/passwd": b"root:x:0:0::/root:\n"},
    )
    second = _layer(tmp_path / "b.tar", {"./usr/bin/python3.11": b"\x7fELF"}, compress=False)
    facts = inspect_layers([first, second], arch="amd64")
    assert facts.interpreter == PurePosixPath("/usr/bin/python3.11")
    assert facts.python_version == (3, 11)
    assert (facts.libc, facts.libc_version) == ("glibc", (2, 36))
    assert facts.shell is False
    assert facts.python_tag == "cp311"


def test_source_built_python_and_musl_are_preferred(tmp_path: Path) -> None:
    layer = _layer(
        tmp_path / "a.tar.gz",
        {
            "lib/ld-musl-x86_64.so.1": b"",
            "lib/apk/db/installed": b"P:busybox\nV:1.36\n\nP:musl\nV:1.2.5-r0\n",
            "bin/sh": b"",
            "usr/bin/python3.12": b"",
            "usr/local/bin/python3.13": b"",
        },
    )
    facts = inspect_layers([layer], arch="arm64")
    assert facts.interpreter == PurePosixPath("/usr/local/bin/python3.13")
    assert (facts.libc, facts.libc_version, facts.shell) == ("musl", (1, 2), True)


def test_catalog_interpreter_is_used_when_present(tmp_path: Path) -> None:
    entry = find_entry(load_catalog(), "debian-slim", (3, 11))
    layer = _layer(
        tmp_path / "a.tar.gz",
        {"usr/local/bin/python3.11": b"", "usr/bin/python3.13": b"", "lib/libc-2.36.so": b""},
    )
    facts = inspect_layers([layer], arch="amd64", expected=entry)
    assert facts.interpreter == PurePosixPath("/usr/local/bin/python3.11")
    assert facts.libc_version == (2, 36)


def test_no_python_is_one_clear_error(tmp_path: Path) -> None:
    layer = _layer(tmp_path / "a.tar.gz", {"bin/sh": b""})
    with pytest.raises(TargetError, match="no Python interpreter found in the base image"):
        inspect_layers([layer], arch="amd64")


def test_scan_stops_once_the_catalog_facts_are_seen(tmp_path: Path) -> None:
    """In the top layer, after the catalog's interpreter and the libc, nothing is read."""
    entry = find_entry(load_catalog(), "debian-slim", (3, 11))
    layer = _layer(
        tmp_path / "a.tar.gz",
        {
            "lib/libc-2.36.so": b"",
            "usr/local/bin/python3.11": b"",
            "usr/bin/python3.13": b"",  # after the stop: not seen, so it cannot win
        },
    )
    facts = inspect_layers([layer], arch="amd64", expected=entry)
    assert facts.interpreter == PurePosixPath("/usr/local/bin/python3.11")
    assert facts.shell is True  # bin/sh was not reached: the catalog says it has one
