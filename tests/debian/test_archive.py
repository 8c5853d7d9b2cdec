"""The archive: signed Releases, hash-checked Packages indexes and .debs, and their cache."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from imagebuild.debian.archive import (
    DEFAULT_KEYRING,
    Release,
    fetch_deb,
    fetch_packages,
    fetch_release,
    parse_packages,
)
from imagebuild.debian.closure import to_locked
from imagebuild.debian.model import IndexedPackage, LockedDeb
from imagebuild.digest import digest_bytes, digest_file, digest_hex
from imagebuild.errors import DebianError
from tests.debian.conftest import LoopbackMirror, make_release, source_for

# The primary key of "Debian Archive Automatic Signing Key (12/bookworm)".
BOOKWORM_ARCHIVE_KEY = "B8B80B5B623EAB6AD8775C45B7C5D7D6350947F8"


def one_line(exc: pytest.ExceptionInfo[DebianError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# --- InRelease -----------------------------------------------------------------------------


@pytest.mark.debian
def test_bookworm_inrelease_is_verified_and_parsed(
    debian_http: httpx.Client, tmp_path: Path
) -> None:
    release = fetch_release(debian_http, source_for("bookworm"), cache=tmp_path)
    assert release.codename == "bookworm"
    assert {"amd64", "arm64", "all"} <= set(release.architectures)
    assert "main" in release.components
    assert BOOKWORM_ARCHIVE_KEY in release.signers
    digest, size = release.sha256["main/binary-amd64/Packages.xz"]
    assert size > 1_000_000 and digest.startswith("sha256:")
    assert release.acquire_by_hash
    by_hash, plain = release.index_urls("main/binary-amd64/Packages.xz")
    assert by_hash.endswith(f"/main/binary-amd64/by-hash/SHA256/{digest_hex(digest)}")
    assert plain.endswith("/dists/bookworm/main/binary-amd64/Packages.xz")
    # The verified file is kept by its own sha256.
    kept = tmp_path / "inrelease" / digest_hex(release.inrelease)
    assert digest_file(kept) == release.inrelease


@pytest.mark.debian
def test_a_cached_release_is_reused_without_the_network_when_asked(
    debian_http: httpx.Client, offline_http: httpx.Client, tmp_path: Path
) -> None:
    fresh = fetch_release(debian_http, source_for("bookworm"), cache=tmp_path)
    again = fetch_release(offline_http, source_for("bookworm"), cache=tmp_path, refresh=False)
    assert again == fresh
    # A refresh (the default) asks the mirror whatever the cache holds.
    with pytest.raises(DebianError, match="no network in this test"):
        fetch_release(offline_http, source_for("bookworm"), cache=tmp_path)


@pytest.mark.debian
def test_an_inrelease_with_one_byte_changed_is_refused(
    loopback_mirror: LoopbackMirror, debian_http: httpx.Client, tmp_path: Path
) -> None:
    real = loopback_mirror.upstream_bytes("dists/bookworm/InRelease")
    at = real.index(b"Codename: bookworm") + len("Codename: ")
    tampered = real[:at] + b"B" + real[at + 1 :]  # bookworm -> Bookworm, inside the signed text
    loopback_mirror.serve("dists/bookworm/InRelease", tampered)
    source = source_for("bookworm", mirror=loopback_mirror.url)
    with pytest.raises(DebianError) as caught:
        fetch_release(debian_http, source, cache=tmp_path)
    text = one_line(caught)
    assert f"{loopback_mirror.url}/dists/bookworm/InRelease" in text
    assert "BAD signature" in text and "another mirror" in text
    assert not (tmp_path / "inrelease").exists()


@pytest.mark.debian
def test_another_suites_release_served_in_its_place_is_refused(
    loopback_mirror: LoopbackMirror, debian_http: httpx.Client, tmp_path: Path
) -> None:
    # A correctly signed but different Release (a replay of trixie's as bookworm's).
    trixie = loopback_mirror.upstream_bytes("dists/trixie/InRelease")
    loopback_mirror.serve("dists/bookworm/InRelease", trixie)
    source = source_for("bookworm", mirror=loopback_mirror.url)
    with pytest.raises(DebianError) as caught:
        fetch_release(debian_http, source, cache=tmp_path)
    assert "is signed for suite 'stable' (codename 'trixie'), not 'bookworm'" in one_line(caught)


@pytest.mark.debian
def test_a_release_signed_by_keys_outside_the_keyring_is_refused(
    debian_http: httpx.Client, tmp_path: Path
) -> None:
    bullseye_only = Path("/usr/share/keyrings/debian-archive-bullseye-stable.gpg")
    with pytest.raises(DebianError) as caught:
        fetch_release(debian_http, source_for("bookworm"), cache=tmp_path, keyring=bullseye_only)
    text = one_line(caught)
    assert "no signature by a key of the keyring" in text and str(bullseye_only) in text


@pytest.mark.debian
def test_a_release_past_its_valid_until_is_refused_unless_allowed(
    debian_http: httpx.Client, tmp_path: Path
) -> None:
    source = source_for("bookworm-security")
    current = fetch_release(debian_http, source, cache=tmp_path)
    assert current.valid_until is not None
    later = current.valid_until + timedelta(days=1)
    with pytest.raises(DebianError) as caught:
        fetch_release(debian_http, source, cache=tmp_path, now=later)
    text = one_line(caught)
    assert "expired at" in text and "Valid-Until" in text and "check_valid_until=False" in text
    allowed = fetch_release(debian_http, source, cache=tmp_path, now=later, check_valid_until=False)
    assert allowed.codename == "bookworm-security"


@pytest.mark.debian
def test_a_suite_the_mirror_lacks_fails_in_one_line(
    debian_http: httpx.Client, tmp_path: Path
) -> None:
    with pytest.raises(DebianError) as caught:
        fetch_release(debian_http, source_for("no-such-suite"), cache=tmp_path)
    text = one_line(caught)
    assert "GET http://deb.debian.org/debian/dists/no-such-suite/InRelease answered 404" in text
    assert "check the mirror URL and the suite name" in text


def test_a_file_that_is_not_clearsigned_is_refused(
    static_mirror: LoopbackMirror, debian_http: httpx.Client, tmp_path: Path
) -> None:
    static_mirror.serve("dists/x/InRelease", b"Origin: Debian\nSuite: x\n")
    source = source_for("x", mirror=static_mirror.url)
    with pytest.raises(DebianError) as caught:
        fetch_release(debian_http, source, cache=tmp_path)
    assert f"InRelease at {static_mirror.url}/dists/x/InRelease is not a clearsigned" in one_line(
        caught
    )


def test_a_missing_keyring_is_refused_before_any_request(
    offline_http: httpx.Client, tmp_path: Path
) -> None:
    missing = tmp_path / "no-keyring.gpg"
    with pytest.raises(DebianError) as caught:
        fetch_release(offline_http, source_for("bookworm"), cache=tmp_path, keyring=missing)
    text = one_line(caught)
    assert f"keyring {missing} does not exist" in text
    assert "apt-get install debian-archive-keyring" in text


def test_a_missing_gpgv_is_refused(
    offline_http: httpx.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DebianError) as caught:
        fetch_release(offline_http, source_for("bookworm"), cache=tmp_path)
    assert "gpgv not found" in one_line(caught) and "apt-get install gpgv" in str(caught.value)


def test_the_default_keyring_is_debians() -> None:
    assert DEFAULT_KEYRING == Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    assert DEFAULT_KEYRING.is_file()


# --- Packages ------------------------------------------------------------------------------


@pytest.mark.debian
@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_bookworm_packages_parse_and_a_warm_call_reads_the_cache(
    arch: str,
    debian_http: httpx.Client,
    offline_http: httpx.Client,
    debian_cache: Path,
    debian_release: Callable[[str], Release],
) -> None:
    release = debian_release("bookworm")
    packages = fetch_packages(debian_http, release, arch=arch, cache=debian_cache)
    assert len(packages) > 50_000
    assert {p.architecture for p in packages} == {arch, "all"}
    by_name = {p.name: p for p in packages}
    libc = by_name["libc6"]
    assert libc.architecture == arch and libc.multi_arch == "same"
    assert libc.filename.startswith("pool/main/g/glibc/libc6_")
    assert libc.url == f"http://deb.debian.org/debian/{libc.filename}"
    assert by_name["tzdata"].architecture == "all"  # arch all packages are in each index
    assert by_name["dash"].essential and not libc.essential
    assert "libssl3" in by_name["libpython3.11-minimal"].depends
    assert packages == tuple(sorted(packages, key=lambda p: (p.name, p.architecture, p.version)))
    # Warm: no request at all, and the same values, read from the parsed index.
    digest, _ = release.sha256[f"main/binary-{arch}/Packages.xz"]
    assert (debian_cache / "packages" / f"{digest_hex(digest)}.json").is_file()
    assert fetch_packages(offline_http, release, arch=arch, cache=debian_cache) == packages


@pytest.mark.debian
def test_a_tampered_packages_index_is_refused(
    loopback_mirror: LoopbackMirror, debian_http: httpx.Client, tmp_path: Path
) -> None:
    source = source_for("bookworm", mirror=loopback_mirror.url)
    release = fetch_release(debian_http, source, cache=tmp_path)
    path = "main/binary-amd64/Packages.xz"
    tampered = b"\xfd7zXZ\x00 not the index the Release lists"
    for url in release.index_urls(path):
        loopback_mirror.serve(url.removeprefix(loopback_mirror.url), tampered)
    with pytest.raises(DebianError) as caught:
        fetch_packages(debian_http, release, arch="amd64", cache=tmp_path)
    text = one_line(caught)
    assert f"index {path} of bookworm" in text and "does not match" in text
    assert release.index_urls(path)[0] in text
    assert "another mirror" in text
    assert [p.name for p in (tmp_path / "packages").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.debian
def test_an_index_missing_by_hash_is_read_by_name(
    loopback_mirror: LoopbackMirror, debian_http: httpx.Client, tmp_path: Path
) -> None:
    source = source_for("bookworm", mirror=loopback_mirror.url)
    release = fetch_release(debian_http, source, cache=tmp_path)
    path = "contrib/binary-amd64/Packages.xz"
    by_hash, plain = release.index_urls(path)
    loopback_mirror.hide(by_hash.removeprefix(loopback_mirror.url))
    packages = fetch_packages(
        debian_http, release, component="contrib", arch="amd64", cache=tmp_path
    )
    assert packages and all(p.filename.startswith("pool/contrib/") for p in packages)
    assert loopback_mirror.count(plain.removeprefix(loopback_mirror.url)) == 1


def test_an_architecture_the_release_lacks_is_named(offline_http: httpx.Client) -> None:
    release = make_release("http://127.0.0.1:9", {"main/binary-amd64/Packages.xz": b""})
    with pytest.raises(DebianError) as caught:
        fetch_packages(offline_http, release, arch="riscv64", cache=Path("/nonexistent"))
    assert "has no Packages index for main/binary-riscv64" in one_line(caught)


def test_a_paragraph_without_sha256_is_refused() -> None:
    text = b"Package: broken\nVersion: 1\nArchitecture: all\nFilename: pool/b.deb\nSize: 3\n\n"
    with pytest.raises(DebianError) as caught:
        parse_packages(io.BytesIO(text), mirror="http://m")
    assert "package broken is unusable: no SHA256 field" in one_line(caught)
    bad_size = text.replace(b"Size: 3", b"SHA256: " + b"ab" * 32 + b"\nSize: three")
    with pytest.raises(DebianError, match="package broken is unusable: invalid literal"):
        parse_packages(io.BytesIO(bad_size), mirror="http://m")


# --- .debs ---------------------------------------------------------------------------------


def _netbase(debian_packages: Callable[[str, str], tuple[IndexedPackage, ...]]) -> LockedDeb:
    return to_locked(next(p for p in debian_packages("bookworm", "amd64") if p.name == "netbase"))


@pytest.mark.debian
def test_fetch_deb_checks_and_caches_a_real_deb(
    debian_http: httpx.Client,
    offline_http: httpx.Client,
    debian_packages: Callable[[str, str], tuple[IndexedPackage, ...]],
    tmp_path: Path,
) -> None:
    deb = _netbase(debian_packages)
    path = fetch_deb(debian_http, deb, cache=tmp_path)
    assert path.read_bytes()[:8] == b"!<arch>\n"
    assert digest_file(path) == deb.sha256 and path.stat().st_size == deb.size
    assert fetch_deb(offline_http, deb, cache=tmp_path) == path  # a cache hit


@pytest.mark.debian
def test_a_tampered_deb_is_refused_in_one_line(
    loopback_mirror: LoopbackMirror,
    debian_http: httpx.Client,
    debian_packages: Callable[[str, str], tuple[IndexedPackage, ...]],
    tmp_path: Path,
) -> None:
    deb = _netbase(debian_packages)
    real = loopback_mirror.upstream_bytes(deb.pool_path)
    tampered = real[:-1] + bytes([real[-1] ^ 1])
    loopback_mirror.serve(deb.pool_path, tampered)
    with pytest.raises(DebianError) as caught:
        fetch_deb(debian_http, deb, cache=tmp_path, mirror=loopback_mirror.url)
    text = one_line(caught)
    assert f"package netbase {deb.version} (all)" in text
    assert f"{loopback_mirror.url}/{deb.pool_path}" in text
    assert f"expected {deb.sha256}, downloaded {digest_bytes(tampered)}" in text
    assert "re-lock the base" in text
    assert not (tmp_path / "debs" / f"{digest_hex(deb.sha256)}.deb").exists()


@pytest.mark.debian
def test_a_deb_gone_from_the_mirror_points_at_a_snapshot(
    debian_http: httpx.Client,
    debian_packages: Callable[[str, str], tuple[IndexedPackage, ...]],
    tmp_path: Path,
) -> None:
    deb = _netbase(debian_packages)
    gone = LockedDeb(
        name=deb.name,
        version="0.0-gone",
        architecture=deb.architecture,
        url=deb.url.replace(deb.version, "0.0-gone"),
        sha256=deb.sha256,
        size=deb.size,
    )
    with pytest.raises(DebianError) as caught:
        fetch_deb(debian_http, gone, cache=tmp_path)
    text = one_line(caught)
    assert "answered 404 Not Found" in text and "snapshot.debian.org" in text


@pytest.mark.debian
def test_threads_fetching_one_deb_download_it_once(
    loopback_mirror: LoopbackMirror,
    debian_http: httpx.Client,
    debian_packages: Callable[[str, str], tuple[IndexedPackage, ...]],
    tmp_path: Path,
) -> None:
    deb = _netbase(debian_packages)
    results: list[Path] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(fetch_deb(debian_http, deb, cache=tmp_path, mirror=loopback_mirror.url))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(results)) == 1 and digest_file(results[0]) == deb.sha256
    assert loopback_mirror.count(deb.pool_path) == 1
