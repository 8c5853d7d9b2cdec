"""Build environments kept in the registry cache, for runners that start with an empty cache.

A kept environment is its installed packages (the venv's ``lib`` tree), the answers kept
beside them (``.imgbuild-requires``) and the bytecode its hooks wrote for the packages.
That bytecode lives under the environment's ``.pycache``, named by each source's absolute
path (``build.runner``), so it is kept relative to the environment and put back under the
path the environment has where it is unpacked (a pyc is only taken for a source of the
same time and size: files keep their times). The standard library's bytecode is not
kept: each machine links its own interpreter's there (``build.runner``).

It is kept as a zstd tar (``image.untar``) under a key in the registry cache
(``RemoteLayers.keep_file``); the venv itself (its interpreter link, ``pyvenv.cfg``) is
always made on the machine that uses it. The key names the environment's own key
(interpreter, installer, indexes, requirements) and the platform its packages were
installed for.

Unpacking refuses names that would leave the environment (GNU tar's rules, ``image.untar``;
without GNU tar, ``tarfile``'s ``data`` filter, which refuses links leading out and device
files too). It happens beside the venv, which takes the result only whole: a kept tar that
fails is no error, and the environment is then made as it would be without one.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagebuild.build.runner import bytecode_prefix
from imagebuild.image import untar

if TYPE_CHECKING:
    from imagebuild.pipeline.layers import RemoteLayers

MEDIA_TYPE = "application/vnd.imgbuild.build-env.v1.tar+zstd"
_SHARED = ("lib", ".imgbuild-requires")
"""What of a venv is kept as it is: its packages and imgbuild's answers beside them."""
_OWN_BYTECODE = ".imgbuild-own-bytecode"
"""In the tar: the bytecode of the environment's own files, by path inside it."""
_FORMAT = 3
"""Named in the key: a runner never unpacks a tar laid out otherwise (3: zstd)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RegistryEnvironments:
    """``build.pep517.SharedEnvironments`` over the registry layer cache."""

    remote: RemoteLayers

    def fetch(self, key: str, env: Path, home: Path) -> bool:
        """Unpack what is kept under ``key`` into the fresh venv ``env`` (moved to ``home``)."""
        kept = self.remote.find_file(_registry_key(key), MEDIA_TYPE)
        if kept is None:
            return False
        # Unpacked beside the venv, and moved into it whole: a damaged tar leaves it as made.
        with tempfile.TemporaryDirectory(prefix=".kept-", dir=env.parent) as aside:
            unpacked = Path(aside)
            if not _unpack(kept, unpacked):
                return False  # make the environment instead
            # (a tar kept before the standard library's pycs were linked holds them too, in
            # .pycache: left out, as the environment links its own meanwhile)
            for name in _SHARED:
                if (unpacked / name).exists():
                    shutil.rmtree(env / name, ignore_errors=True)
                    (unpacked / name).rename(env / name)
            if (unpacked / _OWN_BYTECODE).is_dir():
                where = bytecode_prefix(env) / _relative(home)
                where.parent.mkdir(parents=True, exist_ok=True)
                (unpacked / _OWN_BYTECODE).rename(where)
        return True

    def keep(self, key: str, env: Path) -> None:
        """Keep what ``env`` holds under ``key`` (unless the registry has it already)."""
        self.remote.keep_file(_registry_key(key), MEDIA_TYPE, lambda out: _pack(env, out))


_UNPACK = """
import sys, tarfile
with tarfile.open(sys.argv[1], "r:") as tar:
    tar.extractall(sys.argv[2], filter="data")
"""
UNPACK_SECONDS = 300
"""How long the unpacking of a kept environment may take before it is given up."""


def _unpack(kept: Path, into: Path) -> bool:
    """Unpack the kept tar ``kept`` (zstd, or gzip) into ``into``; False if not whole.

    It is decompressed here (``untar.plain_tar``), then unpacked by GNU tar where there is
    one, else by ``tarfile`` in a process of its own: a CI runner unpacks it while its
    other threads pull, inflate and unpack the base, and in a thread here its 350 files'
    system calls each waited for the GIL (0.7 s for what takes 0.11 s alone).
    """
    plain = into.with_name(into.name + ".tar")
    try:
        tar = untar.plain_tar(kept, plain)
        if untar.gnu_tar() is not None:
            return untar.extract(tar, into, seconds=UNPACK_SECONDS)
        command = [sys.executable, "-I", "-S", "-c", _UNPACK, str(tar), str(into)]
        done = subprocess.run(command, capture_output=True, timeout=UNPACK_SECONDS, check=False)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return False
    finally:
        plain.unlink(missing_ok=True)
    return done.returncode == 0


def _registry_key(key: str) -> str:
    platform_tag = f"{sysconfig.get_platform()} {'-'.join(platform.libc_ver())}"
    material = (
        f"imgbuild build-env {_FORMAT}\n{key}\n{sys.implementation.cache_tag}\n{platform_tag}"
    )
    return hashlib.sha256(material.encode()).hexdigest()


def _relative(path: Path) -> Path:
    """``path`` made absolute, as a relative path (how a pycache prefix names a source)."""
    return Path(str(path.absolute()).lstrip("/"))


def _pack(env: Path, out: Path) -> None:
    """What is kept of ``env``, as a zstd tar at ``out``, each tree in name order."""
    bytecode = bytecode_prefix(env)
    trees = [(env / name, name) for name in _SHARED]
    trees.append((bytecode / _relative(env), _OWN_BYTECODE))
    with untar.packing(out) as tar:
        for top, name in trees:
            if not top.is_dir():
                continue
            for path in [top, *sorted(top.rglob("*"))]:
                tar.add(path, arcname=str(Path(name) / path.relative_to(top)), recursive=False)
