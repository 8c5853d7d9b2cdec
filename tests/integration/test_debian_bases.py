"""End to end: the bases imgbuild builds from Debian packages, in the real engine.

Each catalog definition is built twice (same digest), loaded and run without a network,
and the scanner's view (dpkg status) is read back; a tampered .deb and a tampered
InRelease are refused through the CLI; a build with no engine writes an archive the engine
then loads. The helpers here serve test_system_packages.py too.

Everything here reads the live Debian archive (through the session's shared Debian cache
where the test allows it), and uses the engine and registry of ``dev/infra.sh``.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from debian import deb822

from imagebuild.debian.archive import fetch_packages, fetch_release
from imagebuild.debian.model import ArchiveSource
from imagebuild.image.validate import validate_archive, validate_layout
from imagebuild.net.http import http_client
from tests.debian.conftest import DEBIAN_MIRROR, SECURITY_MIRROR, LoopbackMirror
from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import MakeProject, imgbuild

pytestmark = [pytest.mark.docker, pytest.mark.debian]

# Runs inside a base with its own Python: real work for the modules that need the
# libraries and data files a base carries (OpenSSL + CA bundle, SQLite, tzdata, xz, bz2,
# zlib, libffi, libmpdec), plus the accounts and /tmp a runtime expects.
PROBE = r"""
import bz2, ctypes, ctypes.util, decimal, hashlib, json, lzma, os, pwd, sqlite3, ssl, stat
import sys, tempfile, zlib
from datetime import datetime, timezone
from zoneinfo import ZoneInfo
import _decimal
data = b"imgbuild " * 1000
db = sqlite3.connect(":memory:")
db.execute("create table t (x integer)")
db.executemany("insert into t values (?)", [(i,) for i in range(100)])
summer = datetime(2024, 7, 1, 12, tzinfo=timezone.utc).astimezone(ZoneInfo("Europe/Paris"))
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
with tempfile.NamedTemporaryFile(dir="/tmp") as scratch:
    scratch.write(b"x")
os_release = dict(
    line.split("=", 1) for line in open("/etc/os-release").read().splitlines() if "=" in line
)
print(json.dumps({
    "version": list(sys.version_info[:2]),
    "uid": os.getuid(),
    "user": pwd.getpwuid(os.getuid()).pw_name,
    "tmp": oct(stat.S_IMODE(os.stat("/tmp").st_mode)),
    "codename": os_release.get("VERSION_CODENAME"),
    "x509": ssl.create_default_context().cert_store_stats()["x509"],
    "sqlite": db.execute("select sum(x) from t").fetchone()[0],
    "paris": summer.isoformat(),
    "sha256": hashlib.sha256(b"abc").hexdigest(),
    "sha3": hashlib.sha3_256(b"abc").hexdigest(),
    "lzma": lzma.decompress(lzma.compress(data)) == data,
    "bz2": bz2.decompress(bz2.compress(data)) == data,
    "zlib": zlib.decompress(zlib.compress(data)) == data,
    "ctypes": libc.abs(-7),
    "decimal": str(decimal.Decimal(1) / decimal.Decimal(7)),
    "cdecimal": decimal.Decimal is _decimal.Decimal,
}))
"""

SHELLS = {"bin/sh", "usr/bin/sh", "bin/dash", "usr/bin/dash", "bin/bash", "usr/bin/bash"}


# ---------------------------------------------------------------- helpers (shared) ---


@dataclass
class Layout:
    """An OCI layout on disk: its one image's manifest, config and layer files."""

    root: Path
    manifest_digest: str
    manifest: dict[str, Any]
    config_digest: str
    config: dict[str, Any]

    def blob(self, digest: str) -> Path:
        """The file of blob ``digest``."""
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    @property
    def layers(self) -> list[Path]:
        """The layer files, bottom first."""
        return [self.blob(layer["digest"]) for layer in self.manifest["layers"]]

    @property
    def history(self) -> list[str]:
        """``created_by`` of each history entry."""
        return [entry.get("created_by", "") for entry in self.config.get("history", [])]


def read_layout(root: Path) -> Layout:
    """The single image of the OCI layout ``root`` (checked with ``validate_layout``)."""
    validate_layout(root)
    index = json.loads((root / "index.json").read_text())
    (entry,) = index["manifests"]
    manifest = json.loads((root / "blobs" / "sha256" / entry["digest"][7:]).read_text())
    config_digest = manifest["config"]["digest"]
    config = json.loads((root / "blobs" / "sha256" / config_digest[7:]).read_text())
    return Layout(
        root=root,
        manifest_digest=entry["digest"],
        manifest=manifest,
        config_digest=config_digest,
        config=config,
    )


def unpack_archive(archive: Path, into: Path) -> Layout:
    """The OCI archive ``archive`` (checked with ``validate_archive``) unpacked into ``into``."""
    validate_archive(archive)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return read_layout(into)


def layer_files(layer: Path) -> dict[str, bytes | None]:
    """Each member of a layer tar: regular files' bytes, None for anything else."""
    files: dict[str, bytes | None] = {}
    with tarfile.open(layer) as tar:
        for member in tar:
            name = member.name.removeprefix("./").rstrip("/")
            extracted = tar.extractfile(member) if member.isreg() else None
            files[name] = extracted.read() if extracted is not None else None
    return files


def status_entries(text: str) -> dict[str, deb822.Deb822]:
    """The paragraphs of a dpkg status text, by package name."""
    return {para["Package"]: para for para in deb822.Deb822.iter_paragraphs(text.splitlines())}


def status_d_entries(files: dict[str, bytes | None]) -> dict[str, str]:
    """Package -> version from a layer's ``var/lib/dpkg/status.d`` entries."""
    found: dict[str, str] = {}
    for name, data in files.items():
        if name.startswith("var/lib/dpkg/status.d/") and not name.endswith(".md5sums"):
            assert data is not None, f"{name} is not a regular file"
            (para,) = deb822.Deb822.iter_paragraphs(data.decode().splitlines())
            found[para["Package"]] = para["Version"]
    return found


def run_in_image(
    infra: TestInfra, image: str, *args: str, entrypoint: str | None = None
) -> tuple[int, str]:
    """Run ``image`` with no network: its exit status and output (status -1 and the
    engine's message when the process cannot even start, e.g. a missing executable)."""
    container = infra.client.containers.create(
        image, list(args), entrypoint=entrypoint, network_mode="none"
    )
    try:
        try:
            container.start()
        except docker.errors.APIError as exc:
            return -1, str(exc)
        status = int(container.wait(timeout=180)["StatusCode"])
        return status, bytes(container.logs(stdout=True, stderr=True)).decode()
    finally:
        container.remove(force=True)


def error_lines(stderr: str) -> list[str]:
    """The ``error:`` lines of a run's stderr (progress lines are left out)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def printed_digest(stdout: str) -> str:
    """The ``digest: sha256:…`` a build printed."""
    (digest,) = re.findall(r"^digest: (sha256:[0-9a-f]{64})$", stdout, flags=re.M)
    return digest


@pytest.fixture
def fresh_debian_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Debian cache for this test (instead of the session's shared one)."""
    path = tmp_path / "debian-cache"
    monkeypatch.setenv("IMGBUILD_DEBIAN_CACHE", str(path))
    return path


@contextmanager
def loopback_mirrors() -> Iterator[tuple[LoopbackMirror, LoopbackMirror]]:
    """Loopback mirrors in front of deb.debian.org's debian and debian-security."""
    with http_client() as http:
        main = LoopbackMirror(DEBIAN_MIRROR, http)
        security = LoopbackMirror(SECURITY_MIRROR, http)
        main.start()
        security.start()
        try:
            yield main, security
        finally:
            main.stop()
            security.stop()


@pytest.fixture
def mirrors() -> Iterator[tuple[LoopbackMirror, LoopbackMirror]]:
    """``loopback_mirrors()`` for one test."""
    with loopback_mirrors() as pair:
        yield pair


# ------------------------------------------------- each definition, twice, and run ---


@pytest.mark.parametrize(
    ("flavor", "python", "suite"),
    [
        ("debian", "3.11", "bookworm"),
        ("debian", "3.13", "trixie"),
        ("debian-shell", "3.11", "bookworm"),
        ("debian-shell", "3.13", "trixie"),
    ],
)
def test_each_definition_is_reproducible_and_runs(
    docker_env: TestInfra,
    image_cleanup: list[str],
    tmp_path: Path,
    flavor: str,
    python: str,
    suite: str,
) -> None:
    tag = f"imgbuild-test/d-{flavor}:{python}"
    image_cleanup.append(tag)
    first, second = tmp_path / "first.tar", tmp_path / "second.tar"
    build = ("base", "build", flavor, "--python", python, "--tag", tag)
    one = imgbuild(
        *build, "-o", f"oci-archive:{first}", "-o", "docker",
        "--cache-dir", tmp_path / "cache-1",
    )  # fmt: skip
    assert one.exit_code == 0, one.stderr
    assert f"loaded docker.io/{tag}" in one.stdout
    two = imgbuild(*build, "-o", f"oci-archive:{second}", "--cache-dir", tmp_path / "cache-2")
    assert two.exit_code == 0, two.stderr
    # Two builds in separate caches: the same image, and the same archive byte for byte.
    assert printed_digest(one.stdout) == printed_digest(two.stdout)
    assert hashlib.sha256(first.read_bytes()).digest() == (
        hashlib.sha256(second.read_bytes()).digest()
    )
    layout = unpack_archive(first, tmp_path / "layout")
    assert layout.manifest_digest == printed_digest(one.stdout)
    # The engine holds exactly that image (its ID is the config's digest).
    assert docker_env.client.images.get(tag).id == layout.config_digest
    assert layout.config["config"]["User"] == "65532"
    (created_by,) = layout.history
    counted = re.fullmatch(
        rf"imgbuild: {flavor} base, Debian {suite} \((\d+) packages\)", created_by
    )
    assert counted is not None, created_by

    interpreter = f"/usr/bin/python{python}"
    _check_python(docker_env, tag, interpreter, python, suite)

    files: dict[str, bytes | None] = {}
    for layer in layout.layers:
        files.update(layer_files(layer))
    _check_shell(docker_env, tag, files, shell=flavor == "debian-shell")
    _check_scanner_view(docker_env, tag, files, interpreter, python, int(counted.group(1)))


def _check_python(infra: TestInfra, tag: str, interpreter: str, minor: str, suite: str) -> None:
    """The base's Python does real work with no network, as nonroot by default."""
    status, out = run_in_image(infra, tag, "-c", PROBE, entrypoint=interpreter)
    assert status == 0, out
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe == {
        "version": [int(part) for part in minor.split(".")],
        "uid": 65532,
        "user": "nonroot",
        "tmp": "0o1777",
        "codename": suite,
        "x509": probe["x509"],
        "sqlite": 4950,
        "paris": "2024-07-01T14:00:00+02:00",
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "sha3": "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532",
        "lzma": True,
        "bz2": True,
        "zlib": True,
        "ctypes": 7,
        "decimal": "0.1428571428571428571428571429",
        "cdecimal": True,
    }
    assert probe["x509"] > 100


def _check_shell(
    infra: TestInfra, tag: str, files: dict[str, bytes | None], *, shell: bool
) -> None:
    """debian-shell runs a shell command line; debian has no shell at all."""
    if shell:
        assert {"usr/bin/dash", "usr/bin/sh"} <= files.keys()
        status, out = run_in_image(infra, tag, "-c", "echo ok; ls /", entrypoint="/bin/sh")
        assert status == 0, out
        lines = out.split()
        assert lines[0] == "ok" and {"usr", "etc", "tmp"} <= set(lines[1:])
        return
    assert not SHELLS & files.keys(), sorted(SHELLS & files.keys())
    for sh in ("/bin/sh", "/usr/bin/sh"):
        status, out = run_in_image(infra, tag, "-c", "echo ok", entrypoint=sh)
        assert status != 0 and "ok" not in out.split(), out


def _check_scanner_view(
    infra: TestInfra,
    tag: str,
    files: dict[str, bytes | None],
    interpreter: str,
    minor: str,
    count: int,
) -> None:
    """/var/lib/dpkg/status in the running image lists every package, installed, and
    agrees with the layer's status.d entries (what distroless-aware scanners read)."""
    status, text = run_in_image(
        infra, tag, "-c", "print(open('/var/lib/dpkg/status').read(), end='')",
        entrypoint=interpreter,
    )  # fmt: skip
    assert status == 0, text
    layer_status = files["var/lib/dpkg/status"]
    assert layer_status is not None and text == layer_status.decode()
    installed = status_entries(text)
    assert len(installed) == count
    assert {"libc6", f"python{minor}-minimal", "ca-certificates", "tzdata"} <= installed.keys()
    assert {para["Status"] for para in installed.values()} == {"install ok installed"}
    versions = {name: para["Version"] for name, para in installed.items()}
    assert versions == status_d_entries(files)


# ------------------------------------------------- tampered .deb, tampered InRelease ---


def _pool_path(cache: Path, suite: str, arch: str, name: str) -> str:
    """Where ``name`` is in ``suite``'s main Packages index (read through ``cache``)."""
    with http_client() as http:
        source = ArchiveSource(mirror=DEBIAN_MIRROR, suite=suite)
        release = fetch_release(http, source, cache=cache)
        (package,) = [
            p for p in fetch_packages(http, release, arch=arch, cache=cache) if p.name == name
        ]
    return package.filename


def _refused_base_build(
    main: LoopbackMirror, security: LoopbackMirror, out: Path, cache: Path
) -> str:
    """``imgbuild base build debian`` through the mirrors: it fails; its one error line."""
    result = imgbuild(
        "base", "build", "debian", "--python", "3.11", "--cache-dir", cache,
        "--debian-mirror", main.url, "--debian-security-mirror", security.url,
        "-o", f"oci-archive:{out}",
    )  # fmt: skip
    assert result.exit_code == 1
    (line,) = error_lines(result.stderr)
    assert not out.exists()
    return line


def test_a_tampered_deb_is_refused_in_one_line(
    tmp_path: Path,
    shared_debian_cache: Path,
    fresh_debian_cache: Path,
    mirrors: tuple[LoopbackMirror, LoopbackMirror],
) -> None:
    main, security = mirrors
    path = _pool_path(shared_debian_cache, "bookworm", "amd64", "netbase")
    data = bytearray(main.upstream_bytes(path))
    data[len(data) // 2] ^= 0x01
    main.serve(path, bytes(data))
    out = tmp_path / "base.tar"
    line = _refused_base_build(main, security, out, tmp_path / "cache")
    assert line.startswith("error: package netbase "), line
    assert f"{main.url}/{path}" in line and "does not match" in line, line
    assert main.count(path) >= 1
    # The cache keeps only checked files: none holds the tampered bytes.
    for deb in (fresh_debian_cache / "debs").glob("*.deb"):
        assert hashlib.sha256(deb.read_bytes()).hexdigest() == deb.stem


def test_a_tampered_inrelease_is_refused_in_one_line(
    tmp_path: Path, mirrors: tuple[LoopbackMirror, LoopbackMirror]
) -> None:
    main, security = mirrors
    path = "dists/bookworm/InRelease"
    original = main.upstream_bytes(path)
    signed_text = original.index(b"\n\n") + 2  # after the armour header, inside the signed text
    tampered = original.replace(b"Origin: Debian", b"Origin: Debiam", 1)
    assert tampered != original and tampered.index(b"Origin: Debiam") >= signed_text
    main.serve(path, tampered)
    out = tmp_path / "base.tar"
    line = _refused_base_build(main, security, out, tmp_path / "cache")
    assert f"InRelease at {main.url}/{path}" in line and "BAD signature" in line, line
    assert main.count(path) == 1


# ----------------------------------------------------------------------- no engine ---


@pytest.mark.pypi
def test_without_an_engine_the_image_is_an_archive_the_engine_loads(
    docker_env: TestInfra,
    make_project: MakeProject,
    image_cleanup: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = make_project()
    tag = "imgbuild-test/d-no-engine:1"
    image_cleanup.append(tag)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    result = imgbuild(
        "build", project, "--tag", tag, "--python", "3.11", "--cache-dir", tmp_path / "cache"
    )
    assert result.exit_code == 0, result.stderr
    archive = project / "dist" / "d-no-engine.tar"
    assert f"docker load -i {archive}" in result.stdout
    assert archive.is_file()
    with pytest.raises(docker.errors.ImageNotFound):
        docker_env.client.images.get(tag)
    with archive.open("rb") as stream:
        loaded = docker_env.client.images.load(stream)
    assert [image.tags for image in loaded] == [[tag]]
    status, out = run_in_image(docker_env, tag, "arg")
    assert status == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["uid"] == 65532 and report["msg"] == "hello image" and report["argv"] == ["arg"]
