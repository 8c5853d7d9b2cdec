"""The compile script: what the target's interpreter runs to write pycs, and its input.

``install.layers`` runs it in a host or a base's interpreter (``HostCompiler``), and
``sinks.engine`` in a container; both feed it ``compile_listing``'s line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

# Runs inside the target interpreter. Reads a listing of groups of (source, in-image path)
# pairs (from the file named by argv[1], else stdin; see compile_listing), writes an
# unchecked-hash pyc next to each source and prints how many did not compile (templates,
# Python 2 leftovers in some sdists are skipped, as pip and uv do). A pyc's bytes depend on
# what the same process compiled before it (marshal marks objects other live references share,
# and interned strings outlive the module that made them), so each group, one layer's
# sources, is compiled in order by a fresh process forked for it alone: a layer's pycs are
# the same whichever layers are compiled beside it and however the groups are shared out
# over the workers (one per CPU, up to 8).
#
# It imports nothing but built-in modules, and runs without site (COMPILE_FLAGS): a base's
# Python ships without bytecode for its standard library (the python images delete it), so
# each module the script imported was compiled before the first source, on every cold
# build's longest chain (multiprocessing and py_compile took 0.11 s of a FastAPI build, json
# and what it imports 0.04 s). Without site, neither the base's .pth files nor its
# sitecustomize run, so the names held interned (which a pyc's bytes can follow: see
# tests/test_compile_listing.py) are the interpreter's own, whatever the base installed; and
# the interpreter needs no more of its tree than the encodings (image.rootfs unpacks that).
# A pyc is written as py_compile writes it, with the same import-system functions py_compile
# calls (the frozen _bootstrap_external, always loaded), and workers are plain forks. An
# interpreter without those functions (a future release) gets py_compile itself, whose
# imports hold other names interned.
COMPILE_SCRIPT = r"""
import _imp, os, sys

try:
    from _frozen_importlib_external import (
        _RAW_MAGIC_NUMBER, _calc_mode, _code_to_hash_pyc, _write_atomic, cache_from_source,
    )
except ImportError:
    import py_compile

    def write_pyc(source, dfile):
        try:
            py_compile.compile(source, dfile=dfile, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        except py_compile.PyCompileError:
            return False
        return True
else:
    def write_pyc(source, dfile):
        # py_compile.compile(source, dfile=dfile, doraise=True, UNCHECKED_HASH), step by step.
        cfile = cache_from_source(source)
        if os.path.islink(cfile) or (os.path.exists(cfile) and not os.path.isfile(cfile)):
            raise FileExistsError(f"{cfile} is a link or not a regular file")
        with open(source, "rb") as stream:
            data = stream.read()
        try:
            code = compile(data, dfile, "exec", dont_inherit=True, optimize=-1)
        except Exception:
            return False
        os.makedirs(os.path.dirname(cfile), exist_ok=True)
        pyc = _code_to_hash_pyc(code, _imp.source_hash(_RAW_MAGIC_NUMBER, data), False)
        _write_atomic(cfile, pyc, _calc_mode(source))
        return True


def work(pairs):
    return sum(not write_pyc(source, dfile) for source, dfile in pairs)


def compile_groups(groups, size):
    # One fork per group, at most size at once; each sends back its count of failures.
    running, failed = {}, 0

    def reap():
        nonlocal failed
        pid, status = os.wait()
        reader = running.pop(pid)
        answer = os.read(reader, 32)
        os.close(reader)
        if status != 0 or not answer:
            raise SystemExit(f"a compile worker failed (wait status {status})")
        failed += int(answer)

    for group in groups:
        while len(running) >= size:
            reap()
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(reader)
                os.write(writer, str(work(group)).encode())
                status = 0
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(status)
        os.close(writer)
        running[pid] = reader
    while running:
        reap()
    return failed


def groups_of(line):
    # See compile_listing: "g" opens a group, "," parts pairs, "." a pair's two hex names.
    def name(text):
        return bytes.fromhex(text).decode("utf-8", "surrogatepass")

    return [
        [tuple(map(name, pair.split("."))) for pair in group.split(",") if pair]
        for group in line.split("g")[1:]
    ]


def lines():
    pending = b""
    while chunk := os.read(0, 1 << 16):
        *done, pending = (pending + chunk).split(b"\n")
        yield from done


# Both ways read bytes and split them alike: the workers fork from the same state.
jobs = int(os.environ.get("IMGBUILD_COMPILE_JOBS") or 0)
size = jobs or min(len(os.sched_getaffinity(0)), 8)
if sys.argv[1:] == ["--serve"]:  # a listing a line, each answered with a line
    for line in lines():
        print(compile_groups(groups_of(line.decode("ascii")), size), flush=True)
else:
    with open(sys.argv[1], "rb") if len(sys.argv) > 1 else sys.stdin.buffer as listing:
        groups = groups_of(listing.read().decode("ascii"))
    print(compile_groups(groups, jobs or min(size, max(1, len(groups)))))
"""

COMPILE_FLAGS = ("-I", "-S")
"""How the compile script's interpreter is started: isolated from the environment and the
user's site, and without ``site`` (see above)."""

COMPILE_SCRIPT_ID = hashlib.sha256(
    "\0".join((*COMPILE_FLAGS, COMPILE_SCRIPT)).encode()
).hexdigest()[:16]
"""Names the compile script and its flags in the keys of compiled layers: another script's
pycs may be other bytes (a pyc follows the names the compiling process holds interned), so
a layer a cache holds from one is never taken for the other's."""


def compile_listing(groups: Iterable[Iterable[tuple[str, str]]]) -> str:
    """The compile script's input, one line: each group ``g``, then its pairs.

    A pair is its two names' UTF-8 bytes in hex, joined by ``.``; pairs are joined by ``,``.
    Hex, not delimiter-joined names, so no file name (a TAB or newline in a wheel member) can
    split one entry into two and point a pyc at a path of its choosing; ``surrogatepass``
    carries names that are not UTF-8 (surrogate escapes) through unchanged. The script reads
    it with built-ins alone (no json to import, see COMPILE_SCRIPT).
    """

    def name(text: str) -> str:
        return text.encode("utf-8", "surrogatepass").hex()

    return "".join(
        "g" + ",".join(f"{name(source)}.{name(dfile)}" for source, dfile in group)
        for group in groups
    )
