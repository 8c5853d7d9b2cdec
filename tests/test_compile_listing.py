"""The compile script's input crosses the process boundary as hex names, never as joined text.

A source whose name holds a TAB and a newline (wheelcheck refuses such members; this is
the second line of defence) gets its pyc beside it and nowhere else, and the pyc bytes are
exactly what ``py_compile`` writes for the same source and in-image path.
"""

from __future__ import annotations

import importlib.util
import py_compile
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest

from imagebuild.errors import LayerError
from imagebuild.install import layers
from imagebuild.install.compilescript import compile_listing
from imagebuild.install.layers import HostCompiler
from imagebuild.sinks.engine import _pack_sources


def _expected_pyc(source: Path, dfile: str, scratch: Path) -> bytes:
    copy = scratch / "expected.py"
    copy.write_bytes(source.read_bytes())
    target = scratch / "expected.pyc"
    py_compile.compile(
        str(copy),
        cfile=str(target),
        dfile=dfile,
        doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    return target.read_bytes()


def _read_listing(text: str) -> list[list[tuple[str, ...]]]:
    """The listing's groups, read as compile_listing documents them."""

    def name(hex_name: str) -> str:
        return bytes.fromhex(hex_name).decode("utf-8", "surrogatepass")

    return [
        [tuple(map(name, pair.split("."))) for pair in group.split(",")]
        for group in text.split("g")[1:]
    ]


def test_listing_is_hex_pairs_and_round_trips_hostile_names() -> None:
    pairs = [("/s/a\tb\n/tmp/x.py", "/app/a\tb\n/tmp/x.py"), ("/s/\udcff.py", "/app/\udcff.py")]
    text = compile_listing([pairs, pairs[:1]])
    assert set(text) <= set("0123456789abcdefg.,")
    assert _read_listing(text) == [pairs, pairs[:1]]
    assert compile_listing([]) == ""


def test_host_compiler_writes_the_pyc_beside_a_tab_newline_source_only(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    site = staging / "app" / "site"
    escape = tmp_path / "escape"
    # The name the old TAB/newline listing would have split into a source and a host path.
    evil_dir = site / f"a\t{escape}\n"
    evil_dir.mkdir(parents=True)
    plain = site / "plain.py"
    plain.write_text("VALUE = {1, 2, 3}\n")
    evil = evil_dir / "x.py"
    evil.write_text("X = 1\n")
    files = [
        (plain, PurePosixPath("/app/site/plain.py")),
        (evil, PurePosixPath("/") / evil.relative_to(staging).as_posix()),
    ]
    before = {p for p in tmp_path.rglob("*")}
    failed = HostCompiler(Path(sys.executable)).compile(staging, [files])
    assert failed == 0
    made = {p for p in tmp_path.rglob("*")} - before
    expected = {Path(importlib.util.cache_from_source(str(src))) for src, _ in files} | {
        Path(importlib.util.cache_from_source(str(src))).parent for src, _ in files
    }
    assert made == expected
    assert not escape.exists()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for src, dst in files:
        pyc = Path(importlib.util.cache_from_source(str(src))).read_bytes()
        assert pyc == _expected_pyc(src, str(dst), scratch)


def test_engine_upload_carries_the_same_listing(tmp_path: Path) -> None:
    import tarfile

    root = tmp_path / "root"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "m.py").write_text("M = 1\n")
    files = [(root / "pkg" / "m.py", PurePosixPath("/app/pkg/m.py"))]
    listing = _pack_sources(root, [files], tmp_path / "in.tar")
    with tarfile.open(tmp_path / "in.tar") as tar:
        member = tar.extractfile(listing.relative_to("/").as_posix())
        assert member is not None
        groups = _read_listing(member.read().decode("ascii"))
    assert groups == [[("/imgbuild-staging/pkg/m.py", "/app/pkg/m.py")]]


def _three_modules(staging: Path) -> list[tuple[Path, PurePosixPath]]:
    """Modules a, b and c under ``staging``'s /app/site, sharing constants: (source, in image)."""
    site = staging / "app" / "site"
    site.mkdir(parents=True)
    for name in ("a", "b", "c"):
        (site / f"{name}.py").write_text(
            f"NAME = {name!r}\nSHARED = ('shared', 'tuple')\ndef f():\n    return NAME, SHARED\n"
        )
    return [(site / f"{n}.py", PurePosixPath(f"/app/site/{n}.py")) for n in ("a", "b", "c")]


def test_a_groups_pycs_do_not_depend_on_the_groups_beside_it(tmp_path: Path) -> None:
    """Each group (a layer's sources) is compiled by a process of its own."""
    staging = tmp_path / "staging"
    pairs = dict(zip("abc", _three_modules(staging), strict=True))
    compiler = HostCompiler(Path(sys.executable))

    def pycs() -> dict[str, bytes]:
        found = sorted(staging.rglob("*.pyc"))
        return {p.name: p.read_bytes() for p in found}

    assert compiler.compile(staging, [[pairs["c"]]], jobs=1) == 0
    alone = pycs()
    assert compiler.compile(staging, [[pairs["a"], pairs["b"]], [pairs["c"]]], jobs=1) == 0
    beside = pycs()
    assert compiler.compile(staging, [[pairs["a"], pairs["b"]], [pairs["c"]]]) == 0
    assert beside == pycs() and beside["c.cpython-311.pyc"] == alone["c.cpython-311.pyc"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert alone["c.cpython-311.pyc"] == _expected_pyc(pairs["c"][0], "/app/site/c.py", scratch)


def test_a_native_interpreter_counts_only_when_one_start_runs_and_imports(tmp_path: Path) -> None:
    """The base's python under the host's loader is probed once: it must start, import what
    compiling needs and print its version; anything else leaves the engine to compile."""
    from imagebuild.install.native import NativeCompiler

    loader = Path("/lib64/ld-linux-x86-64.so.2")
    libs = [Path(p) for p in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu")]

    def probe(interpreter: Path) -> str:
        return NativeCompiler(
            loader=loader, library_path=libs, interpreter=interpreter, identity="test"
        ).version

    # The host's python (its libpython may come from the library path: any 3.x.y will do).
    assert re.fullmatch(r"3\.\d+\.\d+", probe(Path(sys.executable)))
    assert probe(Path("/bin/false")) == ""
    assert probe(tmp_path / "missing") == ""
    # Starts and prints, but cannot import what compiling needs.
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho {sys.version.split()[0]}; exit 1\n")
    fake.chmod(0o755)
    assert probe(fake) == ""


def test_a_served_listing_compiles_the_bytes_a_one_off_run_does(tmp_path: Path) -> None:
    """The compile server (one interpreter, a fork per group) writes the same pycs as a run
    of its own, listing after listing, and answers every one."""
    staging = tmp_path / "staging"
    pairs = _three_modules(staging)
    groups = [pairs[:2], pairs[2:]]
    compiler = HostCompiler(Path(sys.executable))

    def taken() -> dict[str, bytes]:
        found = sorted(staging.rglob("*.pyc"))
        out = {p.name: p.read_bytes() for p in found}
        for path in found:
            path.unlink()
        return out

    assert compiler.compile(staging, groups, jobs=1) == 0
    expected = taken()
    assert len(expected) == 3
    server = compiler.serve()
    try:
        for _ in range(25):
            assert server.compile(groups) == 0
            assert taken() == expected
    finally:
        server.close()


def test_a_pyc_whose_bytes_follow_interned_names_is_the_same_served_or_not(
    tmp_path: Path,
) -> None:
    """A frozenset of names is shared by the functions using it, or each gets a copy when
    the names are interned already, held by a module the compiling process has loaded
    (scipy's and scikit-learn's pycs changed when the compile script stopped importing
    multiprocessing): a pyc's bytes follow the modules the process holds. Each group is
    compiled by a fork of the same state, so ``n`` is the same bytes alone, beside another
    group, through the server or in a run of its own."""
    staging = tmp_path / "staging"
    site = staging / "app" / "site"
    site.mkdir(parents=True)
    (site / "n.py").write_text(
        "def f(v):\n    return v in {'uniform', 'distance'} or v in {'loads', 'dumps'}\n"
        "def g(v):\n    return v in {'uniform', 'distance'} or v in {'loads', 'dumps'}\n"
    )
    (site / "u.py").write_text("def uniform():\n    pass\ndistance = 1\n")
    n = (site / "n.py", PurePosixPath("/app/site/n.py"))
    u = (site / "u.py", PurePosixPath("/app/site/u.py"))
    pyc = Path(importlib.util.cache_from_source(str(n[0])))
    compiler = HostCompiler(Path(sys.executable))
    seen: list[bytes] = []
    for groups, jobs in (([[n]], 1), ([[u], [n]], 1), ([[u], [n]], 2), ([[n], [u]], 0)):
        assert compiler.compile(staging, groups, jobs=jobs) == 0
        seen.append(pyc.read_bytes())
    server = compiler.serve()
    try:
        for groups in ([[u], [n]], [[n]]):
            assert server.compile(groups) == 0
            seen.append(pyc.read_bytes())
    finally:
        server.close()
    assert len(set(seen)) == 1


def test_the_interpreters_site_does_not_run_while_it_compiles(tmp_path: Path) -> None:
    """A base's .pth files and sitecustomize run no code in the compiler (no site): what they
    import would be held interned by the compiling process, and a pyc's bytes can follow it."""
    import subprocess

    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    marker = tmp_path / "site-ran"
    (site_packages,) = env.glob("lib/python*/site-packages")
    (site_packages / "mark.pth").write_text(f"import os; open({str(marker)!r}, 'w').close()\n")
    python = env / "bin" / "python"
    subprocess.run([str(python), "-I", "-c", "pass"], check=True)
    assert marker.exists()  # the .pth runs where site does
    marker.unlink()
    staging = tmp_path / "staging"
    pairs = _three_modules(staging)
    compiler = HostCompiler(python)
    assert compiler.identity == f"host:{sys.version.split()[0]}"
    assert compiler.compile(staging, [pairs]) == 0
    server = compiler.serve()
    try:
        assert server.compile([pairs]) == 0
    finally:
        server.close()
    assert len(list(staging.rglob("*.pyc"))) == 3
    assert not marker.exists()


def test_a_worker_that_fails_fails_the_compile_in_one_line(tmp_path: Path) -> None:
    missing = (tmp_path / "gone.py", PurePosixPath("/app/gone.py"))
    with pytest.raises(LayerError) as caught:
        HostCompiler(Path(sys.executable)).compile(tmp_path, [[missing]])
    assert str(caught.value).startswith(f"compiling bytecode with {sys.executable} failed: ")
    assert "a compile worker failed" in str(caught.value)


def test_a_compile_server_ends_at_once_when_its_input_ends(tmp_path: Path) -> None:
    """Its pools (multiprocessing's, before its workers were plain forks) once ended with
    close() and join(), which hung one time in ten, holding each build 30 s at its exit."""
    source = tmp_path / "m.py"
    source.write_text("VALUE = 1\n")
    compiler = HostCompiler(Path(sys.executable))
    slowest = 0.0
    for round in range(30):
        server = compiler.serve()
        if round % 2:
            assert server.compile([[(source, PurePosixPath("/app/m.py"))]]) == 0
        started = time.monotonic()
        server.close()
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 5.0


class _Hanging(HostCompiler):
    """An interpreter that never answers (a compiler stuck on something)."""

    def command(self) -> list[str]:
        return [str(self.executable), "-c", "import time; time.sleep(120)"]


def test_a_compiler_that_hangs_is_stopped_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layers, "COMPILE_SECONDS", 1.0)
    source = tmp_path / "m.py"
    source.write_text("X = 1\n")
    group = [(source, PurePosixPath("/app/m.py"))]
    hanging = _Hanging(Path(sys.executable), known="3.11.7")
    expected = (
        f"compiling bytecode with {sys.executable} took over 1 s; it was stopped "
        "(pass --no-compile to skip bytecode, or --compile-with to choose the compiler)"
    )
    server = hanging.serve()
    runs: list[Callable[[], int]] = [
        lambda: hanging.compile(tmp_path, [group]),  # a run of its own
        lambda: server.compile([group]),  # the compile server
    ]
    for run in runs:
        started = time.monotonic()
        with pytest.raises(LayerError) as caught:
            run()
        assert time.monotonic() - started < 10
        assert f"{caught.value.message} ({caught.value.hint})" == expected
    server.close()


def test_a_layer_compiled_by_another_compile_script_is_another_cache_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cache (local, or a registry's) holding layers the last script compiled must not
    hand them to this one: their pycs may be other bytes, and the image another digest."""
    from imagebuild.install import keys
    from imagebuild.install.layers import VenvLayout
    from imagebuild.install.plan import LayerSpec, PlannedWheel

    wheel = PlannedWheel(
        name="pkg", version="1.0", path=Path("/w.whl"), sha256="sha256:" + "a" * 64
    )
    spec = LayerSpec(kind="dependency", wheels=(wheel,))
    venv = VenvLayout(base_interpreter=PurePosixPath("/usr/bin/python3.11"), python_version=(3, 11))

    def key(compiled: str | None) -> str:
        return keys.layer_key(spec, venv, compiled, 0, layer_format="f")

    compiled, plain = key("image:x"), key(None)
    monkeypatch.setattr(keys, "COMPILE_SCRIPT_ID", "another script")
    assert key("image:x") != compiled
    assert key(None) == plain  # a layer without bytecode owes the script nothing
