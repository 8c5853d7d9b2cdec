#!/usr/bin/env python3
"""Write a two-platform OCI image layout from rootfs tarballs, for `skopeo copy --all`.

usage: oci-index.py OUT_DIR ENTRYPOINT ARCH=TARBALL [ARCH=TARBALL ...]

Each tarball (an mmdebstrap rootfs) becomes a one-layer image for linux/ARCH with PATH and
LANG set and ENTRYPOINT as its entrypoint; index.json names one image index, tagged
"latest", that lists them all. Only the standard library is used (this runs before any
project environment exists), and every byte is deterministic.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import sys
from pathlib import Path

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def blob(out: Path, data: bytes, media_type: str, **extra: object) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (out / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data), **extra}


def canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def image(out: Path, arch: str, tarball: Path, entrypoint: str) -> dict[str, object]:
    raw = tarball.read_bytes()
    layer = blob(
        out,
        gzip.compress(raw, compresslevel=6, mtime=0),
        "application/vnd.oci.image.layer.v1.tar+gzip",
    )
    config = blob(
        out,
        canonical(
            {
                "architecture": arch,
                "os": "linux",
                "config": {"Env": [f"PATH={PATH}", "LANG=C.UTF-8"], "Entrypoint": [entrypoint]},
                "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(raw).hexdigest()}"]},
                "history": [{"created_by": f"mmdebstrap rootfs for linux/{arch}"}],
            }
        ),
        "application/vnd.oci.image.config.v1+json",
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [layer],
    }
    return blob(
        out,
        canonical(manifest),
        "application/vnd.oci.image.manifest.v1+json",
        platform={"architecture": arch, "os": "linux"},
    )


def main() -> None:
    out, entrypoint, *pairs = sys.argv[1:]
    target = Path(out)
    shutil.rmtree(target, ignore_errors=True)
    (target / "blobs" / "sha256").mkdir(parents=True)
    manifests = [
        image(target, arch, Path(tarball), entrypoint)
        for arch, _, tarball in (pair.partition("=") for pair in pairs)
    ]
    index = blob(
        target,
        canonical(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": manifests,
            }
        ),
        "application/vnd.oci.image.index.v1+json",
        annotations={"org.opencontainers.image.ref.name": "latest"},
    )
    (target / "index.json").write_bytes(canonical({"schemaVersion": 2, "manifests": [index]}))
    (target / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))


if __name__ == "__main__":
    main()
