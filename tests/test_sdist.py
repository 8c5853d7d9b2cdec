"""sdist.py over the real local index server: metadata and pure-Python wheels from sdists.

The generated sdists carry a tiny in-tree PEP 517 backend, so nothing is downloaded from
PyPI and each build takes a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from packaging.metadata import parse_email
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from imagebuild.build.sdist import build_sdist_wheel, sdist_metadata
from imagebuild.errors import BuildError, FetchError, PackageIndexError
from imagebuild.index.model import IndexFile
from imagebuild.index.simple import SimpleIndex
from imagebuild.lock.resolve import resolve
from imagebuild.target.platform import TargetPlatform
from tests.fixtures.index_server import IndexedFile, LocalIndex, make_sdist

# The generated sdists' backend needs nothing installed: a dead loopback index shows that
# nothing is fetched for their build environments.
NO_INDEX = ("http://127.0.0.1:9/simple/",)
TARGET = TargetPlatform(python_version=(3, 11), libc="glibc", libc_version=(2, 36), arch="x86_64")


def n(name: str) -> NormalizedName:
    return canonicalize_name(name)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """The imgbuild cache directory (beside, not around, the index's own files)."""
    return tmp_path / "cache"


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def listed(http: httpx.Client, index: LocalIndex, name: str) -> IndexFile:
    """The one file of ``name`` as SimpleIndex lists it (URL, sha256 from the page)."""
    with SimpleIndex(http, [index.url], cache_dir=None, sdist_metadata=sdist_metadata) as simple:
        (file,) = simple.files(n(name))
    return file


def build_served(
    http: httpx.Client,
    index: LocalIndex,
    served: IndexedFile,
    cache: Path,
    *,
    sha256: str | None = None,
) -> Path:
    """``build_sdist_wheel`` for an sdist the local index serves (by default its own hash)."""
    return build_sdist_wheel(
        http,
        index.file_url(served.filename),
        sha256 or served.sha256,
        served.filename,
        cache,
        indexes=NO_INDEX,
    )


def wheel_text(wheel: Path, member: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [m for m in zf.namelist() if m.endswith(f".dist-info/{member}")]
        return zf.read(name).decode()


def cached_files(cache: Path) -> list[Path]:
    """Cache entries about sdists (a kept build environment is whole whatever the sdist did)."""
    return sorted(
        p
        for p in cache.rglob("*")
        if p.is_file() and p.suffix != ".lock" and "build-envs" not in p.relative_to(cache).parts
    )


# -- sdist_metadata --------------------------------------------------------------------------


def test_metadata_of_an_sdist_only_package(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path
) -> None:
    served = fresh_index.add_sdist(
        "Only-Source", "2.0", requires=["dep>=1", "extra-dep; extra == 'fast'"]
    )
    file = listed(http, fresh_index, "only-source")
    data = sdist_metadata(http, file, cache, indexes=NO_INDEX)
    raw, _ = parse_email(data)
    assert (raw["name"], raw["version"]) == ("Only-Source", "2.0")
    assert [Requirement(r) for r in raw["requires_dist"]] == [
        Requirement("dep>=1"),
        Requirement("extra-dep; extra == 'fast'"),
    ]
    assert raw["provides_extra"] == ["fast"]
    entry = cache / "sdist-metadata" / f"{served.sha256}.metadata"
    assert entry.read_bytes() == data
    # A second call is answered from the cache: no download.
    before = fresh_index.count("/files/")
    assert sdist_metadata(http, file, cache, indexes=NO_INDEX) == data
    assert fresh_index.count("/files/") == before == 1


def test_metadata_without_the_prepare_hook_builds_a_wheel(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path
) -> None:
    fresh_index.add_sdist("no-hook", "1.0", requires=["dep"], prepare_metadata=False)
    data = sdist_metadata(http, listed(http, fresh_index, "no-hook"), cache, indexes=NO_INDEX)
    assert parse_email(data)[0]["requires_dist"] == ["dep"]


def test_metadata_of_a_zip_sdist(http: httpx.Client, fresh_index: LocalIndex, cache: Path) -> None:
    fresh_index.add_sdist("zipped", "1.0", requires=["dep<3"], archive="zip")
    file = listed(http, fresh_index, "zipped")
    assert file.filename == "zipped-1.0.zip"
    assert parse_email(sdist_metadata(http, file, cache, indexes=NO_INDEX))[0]["requires_dist"] == [
        "dep<3"
    ]


def test_metadata_hash_mismatch_caches_nothing(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path
) -> None:
    fresh_index.add_sdist("tampered", "1.0")
    file = dataclasses.replace(listed(http, fresh_index, "tampered"), sha256="0" * 64)
    with pytest.raises(PackageIndexError) as caught:
        sdist_metadata(http, file, cache, indexes=NO_INDEX)
    assert str(caught.value).startswith(
        "sdist tampered-1.0.tar.gz: sha256 mismatch (index: " + "0" * 64
    )
    assert cached_files(cache) == []


def test_metadata_without_an_index_hash_is_still_cached_by_content(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path
) -> None:
    served = fresh_index.add_sdist("unhashed", "1.0")
    file = dataclasses.replace(listed(http, fresh_index, "unhashed"), sha256=None)
    data = sdist_metadata(http, file, cache, indexes=NO_INDEX)
    assert (cache / "sdist-metadata" / f"{served.sha256}.metadata").read_bytes() == data


def test_metadata_backend_failure_is_one_line(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path
) -> None:
    fresh_index.add_sdist("fails", "1.0", fail="needs a C compiler")
    with pytest.raises(PackageIndexError) as caught:
        sdist_metadata(http, listed(http, fresh_index, "fails"), cache, indexes=NO_INDEX)
    message = str(caught.value)
    assert message.startswith("sdist fails-1.0.tar.gz: the build backend failed to make metadata")
    assert "needs a C compiler" in message and "\n" not in message
    assert cached_files(cache) == []


def test_resolve_picks_an_sdist_only_dependency(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path
) -> None:
    fresh_index.add_wheel("sd-app", "1.0", requires=["sd-lib>=1"])
    fresh_index.add_sdist("sd-lib", "1.0", requires=["sd-leaf"])
    fresh_index.add_sdist("sd-lib", "1.2", requires=["sd-leaf>=2"])
    fresh_index.add_wheel("sd-leaf", "1.0")
    fresh_index.add_wheel("sd-leaf", "2.0")
    with SimpleIndex(
        http, [fresh_index.url], cache_dir=cache, sdist_metadata=sdist_metadata
    ) as index:
        result = resolve([Requirement("sd-app")], index=index, target=TARGET)
    pins = {p.name: p for p in result.pins}
    assert {name: str(p.version) for name, p in pins.items()} == {
        "sd-app": "1.0",
        "sd-leaf": "2.0",
        "sd-lib": "1.2",
    }
    assert pins[n("sd-lib")].dependencies == ("sd-leaf",)
    assert [f.filename for f in pins[n("sd-lib")].files] == ["sd_lib-1.2.tar.gz"]


# -- build_sdist_wheel -----------------------------------------------------------------------


def test_build_makes_a_pure_wheel_once(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path
) -> None:
    served = fresh_index.add_sdist(
        "pure-src", "1.0", files={"pure_src/__init__.py": "VALUE = 1\n"}, requires=["dep"]
    )
    url = fresh_index.file_url(served.filename)
    wheel = build_sdist_wheel(http, url, served.sha256, served.filename, cache, indexes=NO_INDEX)
    assert wheel == cache / "sdist-wheels" / served.sha256 / "pure_src-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("pure_src/__init__.py") == b"VALUE = 1\n"
    assert "Requires-Dist: dep" in wheel_text(wheel, "METADATA")
    assert "(epoch 0)" in wheel_text(wheel, "WHEEL")  # SOURCE_DATE_EPOCH reached the backend
    assert fresh_index.count("/files/") == 1
    # The second build is a cache hit: no request, no build, same file.
    again = build_sdist_wheel(
        http, url, f"sha256:{served.sha256}", served.filename, cache, indexes=NO_INDEX
    )
    assert again == wheel
    assert fresh_index.count("/files/") == 1


def test_platform_wheel_is_refused(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path
) -> None:
    served = fresh_index.add_sdist("foo", "1.0", tags="cp311-cp311-linux_x86_64")
    with pytest.raises(BuildError) as caught:
        build_served(http, fresh_index, served, cache)
    assert str(caught.value) == (
        "sdist foo-1.0.tar.gz: builds a platform wheel (foo-1.0-cp311-cp311-linux_x86_64.whl); "
        "imgbuild only builds pure-Python sdists; use a version with a wheel for the target"
    )
    assert cached_files(cache) == []


def test_platlib_wheel_with_pure_tags_is_refused(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path
) -> None:
    served = fresh_index.add_sdist("platlib", "1.0", purelib=False)
    with pytest.raises(BuildError, match=r"builds a platform wheel \(platlib-1.0-py3-none-any"):
        build_served(http, fresh_index, served, cache)


def test_wheel_of_another_version_is_refused(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path, tmp_path: Path
) -> None:
    # An sdist whose file name says 2.0 but whose backend builds 1.0.
    built = make_sdist(tmp_path / "src", "liar", "1.0")
    renamed = tmp_path / "liar-2.0.tar.gz"
    renamed.write_bytes(built.read_bytes())
    served = fresh_index.add(renamed)
    with pytest.raises(BuildError, match=r"built liar-1.0-py3-none-any.whl, which is liar 1.0"):
        build_served(http, fresh_index, served, cache)
    assert cached_files(cache) == []


def test_build_hash_mismatch_caches_nothing(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path
) -> None:
    served = fresh_index.add_sdist("swapped", "1.0")
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(FetchError) as caught:
        build_served(http, fresh_index, served, cache, sha256=wrong)
    assert str(caught.value).startswith(
        f"sdist swapped-1.0.tar.gz: sha256 mismatch (lock: {wrong}, downloaded: {served.sha256})"
    )
    assert cached_files(cache) == []


def test_build_backend_failure_is_a_build_error(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path
) -> None:
    served = fresh_index.add_sdist("wont-build", "1.0", fail="error: command 'gcc' failed")
    with pytest.raises(BuildError) as caught:
        build_served(http, fresh_index, served, cache)
    message = str(caught.value)
    assert message.startswith("sdist wont_build-1.0.tar.gz: the build backend failed to make a")
    assert "command 'gcc' failed" in message and "\n" not in message


def test_missing_sdist_is_a_fetch_error(http: httpx.Client, fresh_index: LocalIndex) -> None:
    url = fresh_index.file_url("gone-1.0.tar.gz")
    with pytest.raises(FetchError, match=r"^sdist gone-1.0.tar.gz: GET .* answered 404"):
        build_sdist_wheel(
            http, url, "a" * 64, "gone-1.0.tar.gz", fresh_index.root / "cache", indexes=NO_INDEX
        )


# -- unsafe archives -------------------------------------------------------------------------


def test_member_escaping_with_dotdot_is_refused(
    http: httpx.Client, fresh_index: LocalIndex, tmp_path: Path
) -> None:
    served = fresh_index.add_sdist("escape", "1.0", members={"../escaped.txt": "gotcha\n"})
    url = fresh_index.file_url(served.filename)
    with pytest.raises(BuildError) as caught:
        build_sdist_wheel(
            http, url, served.sha256, served.filename, tmp_path / "cache", indexes=NO_INDEX
        )
    assert str(caught.value).startswith(
        "sdist escape-1.0.tar.gz: archive member '../escaped.txt' would be written outside"
    )
    with pytest.raises(PackageIndexError, match="would be written outside"):
        sdist_metadata(
            http, listed(http, fresh_index, "escape"), tmp_path / "cache", indexes=NO_INDEX
        )
    assert cached_files(tmp_path / "cache") == []
    assert not list(tmp_path.rglob("escaped.txt"))


def test_absolute_member_in_a_zip_is_refused(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path
) -> None:
    fresh_index.add_sdist("absolute", "1.0", archive="zip", members={"/tmp/abs.txt": "x"})
    with pytest.raises(PackageIndexError, match="'/tmp/abs.txt' would be written outside"):
        sdist_metadata(http, listed(http, fresh_index, "absolute"), cache, indexes=NO_INDEX)


def test_symlink_out_of_the_archive_is_refused(
    http: httpx.Client, fresh_index: LocalIndex, tmp_path: Path
) -> None:
    # A link whose own name is harmless but whose target is outside: the data filter's job.
    source = make_sdist(tmp_path / "src", "linky", "1.0")
    with tarfile.open(source) as tf:
        members = [(m, tf.extractfile(m)) for m in tf.getmembers()]
        contents = [(m, h.read() if h else None) for m, h in members]
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf,
    ):
        for member, data in contents:
            tf.addfile(member, io.BytesIO(data) if data is not None else None)
        link = tarfile.TarInfo("linky-1.0/passwd")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / source.name).write_bytes(buffer.getvalue())
    served = fresh_index.add(tmp_path / "evil" / source.name)
    with pytest.raises(BuildError, match=r"^sdist linky-1.0.tar.gz: unsafe archive member"):
        build_sdist_wheel(
            http,
            fresh_index.file_url(served.filename),
            served.sha256,
            served.filename,
            tmp_path / "cache",
            indexes=NO_INDEX,
        )


def test_archive_without_a_project_is_refused(
    http: httpx.Client, fresh_index: LocalIndex, tmp_path: Path
) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        info = tarfile.TarInfo("hollow-1.0/README")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"hi\n"))
    (tmp_path / "hollow-1.0.tar.gz").write_bytes(buffer.getvalue())
    fresh_index.add(tmp_path / "hollow-1.0.tar.gz")
    with pytest.raises(PackageIndexError, match="no pyproject.toml or setup.py"):
        sdist_metadata(
            http, listed(http, fresh_index, "hollow"), tmp_path / "cache", indexes=NO_INDEX
        )


def test_simple_index_metadata_goes_through_the_backend(
    http: httpx.Client, fresh_index: LocalIndex, cache: Path
) -> None:
    fresh_index.add_sdist("via-index", "0.3", requires=["dep==1.*"], requires_python=">=3.10")
    with SimpleIndex(
        http, [fresh_index.url], cache_dir=cache, sdist_metadata=sdist_metadata
    ) as index:
        (file,) = index.files(n("via-index"))
        meta = index.metadata(file)
    assert meta.version == Version("0.3")
    assert meta.requires_dist == (Requirement("dep==1.*"),)
