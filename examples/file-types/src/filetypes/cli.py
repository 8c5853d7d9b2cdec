"""``filetypes FILE...`` prints each file's MIME type; ``--self-test`` checks known samples."""

from __future__ import annotations

import gzip
import sys

import magic

# A 1x1 PNG: the signature, an IHDR chunk and an IEND chunk are all libmagic needs.
_PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\x00IEND\xaeB`\x82"
)


# The smallest GIF: header, screen descriptor, one image of one pixel, trailer.
_GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00"
    b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
_PDF = b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"

SAMPLES = {
    "image/png": _PNG,
    "image/gif": _GIF,
    "application/pdf": _PDF,
    "application/gzip": gzip.compress(b"hello\n", mtime=0),
}


def self_test() -> int:
    """Identify each sample and report any the library names differently."""
    failures = 0
    for expected, data in SAMPLES.items():
        found = magic.from_buffer(data, mime=True)
        print(f"{expected:<20} -> {found}")
        failures += found != expected
    print(f"libmagic {magic.version()}: {len(SAMPLES) - failures}/{len(SAMPLES)} identified")
    return 1 if failures else 0


def main() -> int:
    """Entry point."""
    args = sys.argv[1:]
    if args == ["--self-test"]:
        return self_test()
    if not args:
        print("usage: filetypes FILE... | --self-test", file=sys.stderr)
        return 2
    for path in args:
        print(f"{path}: {magic.from_file(path, mime=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
