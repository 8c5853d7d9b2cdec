"""Benchmark the bases imgbuild builds from Debian packages against what they replace.

Run on demand (not part of the test suite; needs the Debian archive, no engine):

    .venv/bin/python benchmarks/bases.py [--base debian:3.11]... [--no-mmdebstrap]

For each built base (``debian`` and ``debian-shell``, Python 3.11 on bookworm and 3.13 on
trixie) it prints:

1. cold: ``imgbuild base build`` with an empty cache, the Debian archive cache included
   (signed Releases, Packages indexes and every .deb downloaded and checked);
2. from cached .debs: an empty image cache but the Debian cache kept, as a second project
   on the same machine, or a rebuild from a lock, sees it;
3. cached: the same cache again (the assembled base is reused);
4. its size: the compressed layer bytes a registry stores and the uncompressed bytes;
5. the packages in it.

Beside it, on the same line, the image it replaces: the same Python and suite assembled
by mmdebstrap (``--variant=extract`` for the shell-less bases, ``essential`` for the shell
ones: how ``dev/infra.sh`` built the test bases before, and how most hand-made Debian bases
are made) with the packages the recipe lists, timed and sized the same way (the rootfs tar
gzipped at level 1, as imgbuild writes layers). The upstream images it stands in for
(gcr.io/distroless/python3-debian12 and -debian13, Docker Hub's python:3.X-slim) are looked
up too; from a machine that cannot reach those registries the line says so.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASES = ("debian:3.11", "debian:3.13", "debian-shell:3.11", "debian-shell:3.13")
UPSTREAM = {
    ("debian", "3.11"): "gcr.io/distroless/python3-debian12:latest",
    ("debian", "3.13"): "gcr.io/distroless/python3-debian13:latest",
    ("debian-shell", "3.11"): "docker.io/library/python:3.11-slim-bookworm",
    ("debian-shell", "3.13"): "docker.io/library/python:3.13-slim-trixie",
}
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"


@dataclass(frozen=True)
class Built:
    """One build's time and result."""

    seconds: float
    compressed: int
    uncompressed: int
    packages: int


def imgbuild_base(flavor: str, python: str, cache: Path, debian: Path, out: Path) -> Built:
    """Time one ``imgbuild base build`` into an OCI archive and measure what it wrote."""
    env = {**os.environ, "IMGBUILD_DEBIAN_CACHE": str(debian)}
    command = [
        str(REPO / ".venv/bin/imgbuild"), "base", "build", flavor, "--python", python,
        "--cache-dir", str(cache), "--output", f"oci-archive:{out}", "--quiet",
    ]  # fmt: skip
    started = time.monotonic()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    compressed, uncompressed, packages = _archive_sizes(out)
    return Built(seconds, compressed, uncompressed, packages)


def _archive_sizes(archive: Path) -> tuple[int, int, int]:
    """Layer bytes (compressed, uncompressed) and the packages its dpkg status lists."""
    compressed = uncompressed = packages = 0
    with tarfile.open(archive) as outer:
        index = json.load(_member(outer, "index.json"))
        manifest = json.load(_member(outer, _blob(index["manifests"][0]["digest"])))
        for layer in manifest["layers"]:
            compressed += layer["size"]
            with gzip.open(_member(outer, _blob(layer["digest"]))) as stream:
                with tarfile.open(fileobj=stream, mode="r|") as inner:
                    for member in inner:
                        uncompressed += member.size
                        if member.name == "var/lib/dpkg/status":
                            text = inner.extractfile(member).read().decode()  # type: ignore[union-attr]
                            packages = text.count("\nPackage: ") + text.startswith("Package: ")
    return compressed, uncompressed, packages


def _member(tar: tarfile.TarFile, name: str):  # type: ignore[no-untyped-def]
    stream = tar.extractfile(name)
    assert stream is not None, name
    return stream


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def recipe_packages(flavor: str, python: str) -> tuple[str, list[str]]:
    """The suite and the packages a catalog recipe asks for (what mmdebstrap is given)."""
    data = tomllib.loads((REPO / "base-images" / f"{flavor}.toml").read_text())
    entry = next(p for p in data["python"] if p["version"] == python)
    return entry["suite"], [*entry["packages"], *data["build"]["packages"]]


def mmdebstrap(flavor: str, python: str, work: Path) -> Built | str:
    """Time mmdebstrap making the same base; a string says why it was not run."""
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap is not installed (apt-get install mmdebstrap)"
    suite, packages = recipe_packages(flavor, python)
    variant = "essential" if flavor == "debian-shell" else "extract"
    out = work / f"mmdebstrap-{flavor}-{python}.tar"
    command = [
        "mmdebstrap", "--mode=root", "--format=tar", f"--variant={variant}",
        f"--include={','.join(packages)}", "--skip=output/dev", suite, str(out),
        f"deb {MIRROR} {suite} main", f"deb {MIRROR} {suite}-updates main",
        f"deb {SECURITY} {suite}-security main",
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"mmdebstrap failed: {done.stderr.strip().splitlines()[-1:]}"
    seconds = time.monotonic() - started
    gz = out.with_suffix(".tar.gz")
    with out.open("rb") as source, gz.open("wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as dest:
            shutil.copyfileobj(source, dest, 1 << 20)
    count = 0
    with tarfile.open(out) as tar:
        uncompressed = sum(m.size for m in tar)
        try:
            status = _member(tar, "./var/lib/dpkg/status").read().decode()
            count = status.count("\nPackage: ") + status.startswith("Package: ")
        except KeyError:
            count = 0  # the extract variant installs nothing, so dpkg records nothing
    return Built(seconds, gz.stat().st_size, uncompressed, count)


def upstream_line(reference: str) -> str:
    """The upstream image's size when its registry answers, else why not."""
    command = [str(REPO / ".venv/bin/imgbuild"), "inspect", reference]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return f"{reference}: no answer in 30 s"
    if done.returncode != 0:
        return f"{reference}: {done.stderr.strip().splitlines()[-1] if done.stderr else 'failed'}"
    return f"{reference}:\n{done.stdout}"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line per base."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", action="append", help="flavor:python, e.g. debian:3.11")
    parser.add_argument("--no-mmdebstrap", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="imgbuild-bench-bases-") as tmp:
        work = Path(tmp)
        for spec in args.base or BASES:
            flavor, _, python = spec.partition(":")
            debian = work / f"debian-{flavor}-{python}"
            out = work / f"{flavor}-{python}.tar"
            cold = imgbuild_base(flavor, python, work / f"c1-{spec}", debian, out)
            debs = imgbuild_base(flavor, python, work / f"c2-{spec}", debian, out)
            cached = imgbuild_base(flavor, python, work / f"c2-{spec}", debian, out)
            other = "skipped" if args.no_mmdebstrap else mmdebstrap(flavor, python, work)
            rows.append((spec, cold, debs, cached, other))
            print(_row(spec, cold, debs, cached, other), flush=True)
        print("\nupstream images these replace:")
        for spec in args.base or BASES:
            flavor, _, python = spec.partition(":")
            print("  " + upstream_line(UPSTREAM[(flavor, python)]).replace("\n", "\n    "))
    return 0


def _row(spec: str, cold: Built, debs: Built, cached: Built, other: Built | str) -> str:
    ours = (
        f"{spec:<18} imgbuild: cold {cold.seconds:5.1f} s, from cached .debs "
        f"{debs.seconds:4.1f} s, cached {cached.seconds:4.1f} s; {_mb(cold.compressed)} "
        f"compressed, {_mb(cold.uncompressed)} uncompressed, {cold.packages} packages"
    )
    if isinstance(other, str):
        return f"{ours}\n{'':<18} mmdebstrap: {other}"
    ratio = cold.seconds / other.seconds
    return (
        f"{ours}\n{'':<18} mmdebstrap: {other.seconds:5.1f} s (imgbuild cold / mmdebstrap = "
        f"{ratio:.2f}); {_mb(other.compressed)} compressed, {_mb(other.uncompressed)} "
        f"uncompressed, {other.packages or 'no dpkg status, so no count of'} packages"
    )


if __name__ == "__main__":
    sys.exit(main())
