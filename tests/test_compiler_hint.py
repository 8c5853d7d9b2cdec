"""The compiler a base's last build ran is named in the cache, and the next build starts its
compile server before the base is resolved (``pipeline.compiler.prestart``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild.install.layers import HostCompiler
from imagebuild.install.native import NativeCompiler
from imagebuild.pipeline import layerwork
from imagebuild.pipeline.compiler import keep_compiler, prestart
from imagebuild.pipeline.requests import BuildRequest

LOADER = Path("/lib64/ld-linux-x86-64.so.2")
LIBS = [Path("/lib/x86_64-linux-gnu"), Path("/usr/lib/x86_64-linux-gnu")]
BASE = "127.0.0.1:5055/library/python:3.11-slim-bookworm"


@pytest.fixture(autouse=True)
def no_server() -> Iterator[None]:
    """Each test starts without this process's compile server, and leaves none."""
    layerwork._server, layerwork._server_of = None, ""
    yield
    if layerwork._server is not None:
        layerwork._server.close()
    layerwork._server, layerwork._server_of = None, ""


def _native(identity: str = "image:test") -> NativeCompiler:
    """The host's python under the host's loader: a base's interpreter run here, in form."""
    return NativeCompiler(
        loader=LOADER, library_path=LIBS, interpreter=Path(sys.executable), identity=identity
    )


def test_the_compiler_kept_is_started_by_the_next_build_before_the_base(tmp_path: Path) -> None:
    request = BuildRequest(project_dir=tmp_path, cache_dir=tmp_path / "cache")
    compiler = _native()
    assert compiler.version
    keep_compiler(request, BASE, "amd64", compiler)
    hints = list((tmp_path / "cache" / "compiler-hints").glob("*.json"))
    assert len(hints) == 1
    assert json.loads(hints[0].read_text())["identity"] == "image:test"
    started = layerwork._server
    assert started is not None and layerwork._server_of == "image:test"
    written = hints[0].stat().st_mtime_ns
    keep_compiler(request, BASE, "amd64", compiler)
    assert layerwork._server is started  # the same compiler: its server kept
    assert hints[0].stat().st_mtime_ns == written  # and its hint not written again

    # The next build (another process): prestart starts it from the hint alone.
    started.close()
    layerwork._server, layerwork._server_of = None, ""
    prestart(request, BASE, "amd64")
    assert layerwork._server is not None and layerwork._server_of == "image:test"
    # Another base, architecture or --compile-with: no hint, nothing started.
    for other in (
        (request, BASE + "-other", "amd64"),
        (request, BASE, "arm64"),
        (BuildRequest(project_dir=tmp_path, cache_dir=tmp_path / "cache", compile_with="image"),
         BASE, "amd64"),
    ):  # fmt: skip
        if layerwork._server is not None:
            layerwork._server.close()
        layerwork._server, layerwork._server_of = None, ""
        prestart(*other)
        assert layerwork._server is None


def test_a_moved_tag_replaces_the_started_server(tmp_path: Path) -> None:
    request = BuildRequest(project_dir=tmp_path, cache_dir=tmp_path / "cache")
    keep_compiler(request, BASE, "amd64", _native("image:old"))
    layerwork._server.close()  # type: ignore[union-attr]
    layerwork._server, layerwork._server_of = None, ""
    prestart(request, BASE, "amd64")
    early = layerwork._server
    keep_compiler(request, BASE, "amd64", _native("image:new"))
    assert layerwork._server is not early and layerwork._server_of == "image:new"
    hint = next((tmp_path / "cache" / "compiler-hints").glob("*.json"))
    assert json.loads(hint.read_text())["identity"] == "image:new"


def test_no_hint_for_a_host_compiler_and_none_read_from_nonsense(tmp_path: Path) -> None:
    request = BuildRequest(project_dir=tmp_path, cache_dir=tmp_path / "cache")
    keep_compiler(request, BASE, "amd64", HostCompiler(Path(sys.executable)))
    assert not (tmp_path / "cache" / "compiler-hints").exists()
    keep_compiler(request, BASE, "amd64", _native())
    hint = next((tmp_path / "cache" / "compiler-hints").glob("*.json"))
    layerwork._server.close()  # type: ignore[union-attr]
    for text in ("not json", "[]", json.dumps({"loader": 1}), json.dumps(
        {**json.loads(hint.read_text()), "interpreter": str(tmp_path / "gone")}
    )):  # fmt: skip
        layerwork._server, layerwork._server_of = None, ""
        hint.write_text(text)
        prestart(request, BASE, "amd64")
        assert layerwork._server is None
    no_bytecode = BuildRequest(
        project_dir=tmp_path, cache_dir=tmp_path / "cache", compile_bytecode=False
    )
    keep_compiler(request, BASE, "amd64", _native())
    layerwork._server.close()  # type: ignore[union-attr]
    layerwork._server, layerwork._server_of = None, ""
    prestart(no_bytecode, BASE, "amd64")
    assert layerwork._server is None
