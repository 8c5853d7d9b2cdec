"""The base image's own interpreter, run on this host through the base's own dynamic loader.

When the host's CPU is the target's, the base's Python needs no container: its filesystem,
unpacked once (``image.rootfs``), holds the interpreter, its standard library, the C
libraries it links and the dynamic loader (glibc's ``ld-linux-*`` or musl's ``ld-musl-*``)
that finds them. Started as ``<loader> --library-path <the base's lib dirs> <python>``,
it is the same binary with the same libraries as in the image, so it writes the same pyc
bytes, without creating a container or sending the sources through the engine's API.
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from imagebuild.cache import write_atomic
from imagebuild.install.layers import HostCompiler

_MACHINES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_TRIPLETS = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}
_LOADERS = {
    "amd64": ("lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
              "lib/ld-musl-x86_64.so.1"),
    "arm64": ("lib/ld-linux-aarch64.so.1", "lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
              "lib/ld-musl-aarch64.so.1"),
}  # fmt: skip
_PROBE = "import _frozen_importlib_external, _imp, os, sys; print(sys.version.split()[0])"
PROBE_RECORD = ".imgbuild-probe-"
"""How the files a tree keeps its interpreter's probe answers in begin (this host's own)."""


class NativeCompiler(HostCompiler):
    """Compiles with the base's interpreter under the base's loader and libraries."""

    def __init__(
        self,
        *,
        loader: Path,
        library_path: Sequence[Path],
        interpreter: Path,
        identity: str,
        known: str | None = None,
    ) -> None:
        self.loader = loader
        self.library_path = tuple(library_path)
        self._identity = identity
        # One start tells both that it runs here and that it finds what compiling imports.
        super().__init__(interpreter, probe=_PROBE, known=known)

    def command(self) -> list[str]:
        """The loader, told where the base's libraries are, running the base's python."""
        libraries = ":".join(str(p) for p in self.library_path)
        return [str(self.loader), "--library-path", libraries, str(self.executable)]

    @property
    def identity(self) -> str:
        """The same as the engine's run of this interpreter: the bytes are the same."""
        return self._identity

    @property
    def version(self) -> str:
        """The interpreter's full version, as it reported it ('' if it did not start)."""
        return self._version


def native_hint(compiler: NativeCompiler) -> dict[str, object]:
    """What starts ``compiler`` again without looking for it or probing it (``from_hint``)."""
    return {
        "loader": str(compiler.loader),
        "library_path": [str(p) for p in compiler.library_path],
        "interpreter": str(compiler.executable),
        "identity": compiler.identity,
        "version": compiler.version,
    }


def from_hint(hint: object) -> NativeCompiler | None:
    """The compiler ``native_hint`` described, if it reads back and its files are there."""
    if not isinstance(hint, dict):
        return None
    strings = [hint.get(k) for k in ("loader", "interpreter", "identity", "version")]
    paths = hint.get("library_path")
    if not all(isinstance(s, str) and s for s in strings) or not isinstance(paths, list):
        return None
    loader, interpreter, identity, version = (str(s) for s in strings)
    if not all(isinstance(p, str) for p in paths):
        return None
    if not (Path(loader).is_file() and Path(interpreter).is_file()):
        return None  # the tree was removed (idle, or the machine restarted)
    return NativeCompiler(
        loader=Path(loader),
        library_path=[Path(p) for p in paths],
        interpreter=Path(interpreter),
        identity=identity,
        known=version,
    )


def host_arch() -> str | None:
    """This host's CPU as an OCI architecture, if imgbuild knows it and the host is Linux."""
    if not os.uname().sysname == "Linux":
        return None
    return _MACHINES.get(platform.machine())


def native_compiler(
    root: Path, interpreter: PurePosixPath, *, arch: str, identity: str
) -> NativeCompiler | None:
    """The base's interpreter under its own loader, if it starts here; else None.

    It must also find what compiling imports; when it does not, the engine runs it instead.
    """
    if host_arch() != arch:
        return None
    executable = resolve_in(root, interpreter)
    loader = next(
        (
            found
            for rel in _LOADERS.get(arch, ())
            if (found := resolve_in(root, PurePosixPath(rel)))
        ),
        None,
    )
    if executable is None or loader is None:
        return None
    library_path = library_dirs(root, arch)
    # An unpacked tree never changes: what its interpreter answered once, it answers again.
    command = "\0".join(map(str, (loader, *library_path, executable, _PROBE)))
    record = root / f"{PROBE_RECORD}{hashlib.sha256(command.encode()).hexdigest()[:16]}"
    try:
        known = record.read_text(encoding="utf-8").strip() or None
    except OSError:
        known = None
    compiler = NativeCompiler(
        loader=loader,
        library_path=library_path,
        interpreter=executable,
        identity=identity,
        known=known,
    )
    if compiler.version and known is None:
        try:
            write_atomic(record, compiler.version.encode(), durable=False)  # or probed again
        except OSError:
            pass  # asked again next time
    return compiler if compiler.version else None


def library_dirs(root: Path, arch: str) -> list[Path]:
    """The directories the base's loader searches by default, as host paths."""
    triplet = _TRIPLETS[arch]
    candidates = (
        f"usr/local/lib/{triplet}", "usr/local/lib", f"lib/{triplet}", f"usr/lib/{triplet}",
        "lib64", "usr/lib64", "lib", "usr/lib",
    )  # fmt: skip
    found: list[Path] = []
    for rel in candidates:
        path = resolve_in(root, PurePosixPath(rel))
        if path is not None and path.is_dir() and path not in found:
            found.append(path)
    return found


def resolve_in(root: Path, inside: PurePosixPath, *, hops: int = 40) -> Path | None:
    """The host path ``inside`` names in the tree, following links as if ``root`` were ``/``.

    None when it does not exist, or a link loops.
    """
    parts = list(inside.parts[1:] if inside.is_absolute() else inside.parts)
    done: list[str] = []
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        if here.is_symlink():
            hops -= 1
            if hops < 0:
                return None
            target = PurePosixPath(os.readlink(here))
            if target.is_absolute():
                done, parts = [], list(target.parts[1:]) + parts
            else:
                parts = list(target.parts) + parts
            continue
        if not here.exists():
            return None
        done.append(part)
    return root.joinpath(*done)
