"""Which package ships a library: bookworm's real Contents index and small synthetic ones."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from imagebuild.debian.archive import Release
from imagebuild.debian.contents import find_providers, multiarch_triplet, policy_names
from imagebuild.digest import digest_hex
from imagebuild.errors import DebianError
from tests.debian.conftest import LoopbackMirror, make_release

CONTENTS = "main/Contents-amd64.gz"


@pytest.mark.debian
def test_bookworm_libraries_map_to_their_packages(
    debian_http: httpx.Client,
    offline_http: httpx.Client,
    debian_cache: Path,
    debian_release: Callable[[str], Release],
) -> None:
    releases = [debian_release("bookworm"), debian_release("bookworm-security")]
    wanted = ["libstdc++.so.6", "libgomp.so.1", "libGL.so.1", "libnothing-here.so.7"]
    found = find_providers(
        debian_http, releases, arch="amd64", filenames=wanted, cache=debian_cache
    )
    assert found == {
        "libstdc++.so.6": "libstdc++6",
        "libgomp.so.1": "libgomp1",
        "libGL.so.1": "libgl1",
    }
    # The index is kept by its sha256: asking again needs no network.
    digest, _ = releases[0].sha256[CONTENTS]
    assert (debian_cache / "contents" / f"{digest_hex(digest)}.gz").is_file()
    again = find_providers(
        offline_http, releases, arch="amd64", filenames=["libz.so.1"], cache=debian_cache
    )
    assert again == {"libz.so.1": "zlib1g"}


def _contents(lines: list[str]) -> bytes:
    return gzip.compress("".join(f"{line}\n" for line in lines).encode(), compresslevel=1)


def _serve(mirror: LoopbackMirror, contents: bytes, *, listed: bytes | None = None) -> Release:
    """A Release listing ``listed`` (default: ``contents``) while the mirror serves ``contents``."""
    release = make_release(mirror.url, {CONTENTS: contents if listed is None else listed})
    mirror.serve(f"dists/test/{CONTENTS}", contents)
    return release


def test_only_library_directories_of_the_architecture_count(
    static_mirror: LoopbackMirror, debian_http: httpx.Client, tmp_path: Path
) -> None:
    release = _serve(
        static_mirror,
        _contents(
            [
                "usr/share/doc/libdoc.so.1                      doc/libdoc-doc",
                "usr/lib/aarch64-linux-gnu/libarm.so.1          libs/libarm1",
                "usr/lib/x86_64-linux-gnu/private/libdeep.so.1  libs/libdeep1",
                "lib/x86_64-linux-gnu/libold.so.2               libs/libold2",
                "usr/lib/libplain.so.3                          libs/libplain3",
                "lib/libroot.so.4                               libs/libroot4",
                "usr/lib/x86_64-linux-gnu/libz.so.1.2.13        libs/zlib1g",
            ]
        ),
    )
    names = ["libdoc.so.1", "libarm.so.1", "libdeep.so.1", "libold.so.2", "libplain.so.3"]
    names += ["libroot.so.4", "libz.so.1"]
    found = find_providers(debian_http, [release], arch="amd64", filenames=names, cache=tmp_path)
    assert found == {
        "libold.so.2": "libold2",
        "libplain.so.3": "libplain3",
        "libroot.so.4": "libroot4",
    }


def test_the_package_named_after_the_library_wins(
    static_mirror: LoopbackMirror, debian_http: httpx.Client, tmp_path: Path
) -> None:
    release = _serve(
        static_mirror,
        _contents(
            [
                "usr/lib/x86_64-linux-gnu/libfoo.so.1 libs/libfoo-dev,libs/libfoo1t64,libs/libfoo1",
                "usr/lib/libbar.so.2                    libs/aaa-bar-compat",
                "usr/lib/x86_64-linux-gnu/libbar.so.2   libs/zzz-bar-tools",
                "usr/lib/x86_64-linux-gnu/libGL.so.1    libs/libgl1,non-free/libs/nvidia-gl",
                "usr/lib/x86_64-linux-gnu/libssl.so.3   libs/libssl3t64",
            ]
        ),
    )
    names = ["libfoo.so.1", "libbar.so.2", "libGL.so.1", "libssl.so.3"]
    found = find_providers(debian_http, [release], arch="amd64", filenames=names, cache=tmp_path)
    assert found == {
        "libfoo.so.1": "libfoo1",  # the policy name, before its t64 rename and the -dev
        "libbar.so.2": "zzz-bar-tools",  # no policy name: the one in the triplet directory
        "libGL.so.1": "libgl1",
        "libssl.so.3": "libssl3t64",  # only a t64 rename: still found
    }


def test_a_line_across_read_blocks_is_found(
    static_mirror: LoopbackMirror, debian_http: httpx.Client, tmp_path: Path
) -> None:
    # The scan reads 4 MiB at a time; put the one answer across the first boundary.
    filler = "usr/share/doc/filler/file-{:07d}                 doc/filler"
    width = len(filler.format(0)) + 1
    target = "usr/lib/x86_64-linux-gnu/libedge.so.5               libs/libedge5"
    before = (4 << 20) // width
    lines = [filler.format(i) for i in range(before)] + [target]
    lines += [filler.format(i) for i in range(1000)]
    data = "".join(f"{line}\n" for line in lines)
    assert data.index(target) < 4 << 20 < data.index(target) + len(target)
    release = _serve(static_mirror, gzip.compress(data.encode(), compresslevel=1))
    found = find_providers(
        debian_http, [release], arch="amd64", filenames=["libedge.so.5"], cache=tmp_path
    )
    assert found == {"libedge.so.5": "libedge5"}


def test_a_tampered_contents_index_is_refused(
    static_mirror: LoopbackMirror, debian_http: httpx.Client, tmp_path: Path
) -> None:
    real = _contents(["usr/lib/x86_64-linux-gnu/libfoo.so.1  libs/libfoo1"])
    evil = _contents(["usr/lib/x86_64-linux-gnu/libfoo.so.1  libs/evil-package"])
    release = _serve(static_mirror, evil, listed=real)
    with pytest.raises(DebianError) as caught:
        find_providers(
            debian_http, [release], arch="amd64", filenames=["libfoo.so.1"], cache=tmp_path
        )
    text = str(caught.value)
    assert "\n" not in text and f"index {CONTENTS} of test" in text and "does not match" in text
    assert not list((tmp_path / "contents").glob("*.gz"))


def test_no_contents_index_in_any_release_is_refused(offline_http: httpx.Client) -> None:
    release = make_release("http://127.0.0.1:9", {"main/binary-amd64/Packages.xz": b""})
    with pytest.raises(DebianError) as caught:
        find_providers(
            offline_http, [release], arch="amd64", filenames=["libfoo.so.1"], cache=Path("/x")
        )
    text = str(caught.value)
    assert f"no Contents index {CONTENTS} in test" in text and "libfoo.so.1" in text


def test_nothing_asked_reads_nothing(offline_http: httpx.Client) -> None:
    assert find_providers(offline_http, [], arch="amd64", filenames=[], cache=Path("/x")) == {}


def test_an_unknown_architecture_is_refused() -> None:
    assert multiarch_triplet("arm64") == "aarch64-linux-gnu"
    with pytest.raises(DebianError, match="architecture 'sparc' has no known library directory"):
        multiarch_triplet("sparc")


@pytest.mark.parametrize(
    ("filename", "names"),
    [
        ("libstdc++.so.6", ("libstdc++6", "libstdc++6t64")),
        ("libgomp.so.1", ("libgomp1", "libgomp1t64")),
        ("libGL.so.1", ("libgl1", "libgl1t64")),
        ("libfoo-1.2.so.3", ("libfoo-1.2-3", "libfoo-1.2-3t64")),
        ("libgfortran.so.5", ("libgfortran5", "libgfortran5t64")),
        ("libxml2.so.2", ("libxml2-2", "libxml2-2t64")),
        ("not-a-library.txt", ()),
    ],
)
def test_policy_names(filename: str, names: tuple[str, ...]) -> None:
    assert policy_names(filename) == names
