"""docker-py stream handling: an HTTP 200 with errorDetail inside is a failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imagebuild.errors import DockerError
from imagebuild.sinks.engine import DockerEngine, read_progress


class FakeAPI:
    """Stands in for docker-py's APIClient.load_image, replaying a progress stream."""

    def __init__(self, stream: list[dict[str, object]]) -> None:
        self.stream = stream
        self.loaded: list[bytes] = []

    def load_image(self, data: object) -> object:
        self.loaded.append(data.read())  # type: ignore[attr-defined]
        return iter(self.stream)


class FakeClient:
    def __init__(self, stream: list[dict[str, object]]) -> None:
        self.api = FakeAPI(stream)


def test_progress_error_detail_raises() -> None:
    stream = [
        {"status": "Loading layer", "progressDetail": {}},
        {"errorDetail": {"message": "unexpected EOF"}, "error": "unexpected EOF"},
    ]
    with pytest.raises(DockerError, match="docker load failed: unexpected EOF"):
        read_progress(iter(stream), "load")


def test_load_reports_loaded_references(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"tar bytes")
    client = FakeClient([{"stream": "Loaded image: docker.io/library/app:1\n"}])
    engine = DockerEngine(client)  # type: ignore[arg-type]
    assert engine.load(archive) == ("docker.io/library/app:1",)
    assert client.api.loaded == [b"tar bytes"]


def test_load_with_error_in_stream_fails(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"x")
    client = FakeClient([{"errorDetail": {"message": "invalid diffID"}, "error": "invalid diffID"}])
    with pytest.raises(DockerError, match="invalid diffID"):
        DockerEngine(client).load(archive)  # type: ignore[arg-type]


def test_load_that_names_no_image_fails(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"x")
    client = FakeClient([{"status": "done"}])
    with pytest.raises(DockerError, match="reported no image"):
        DockerEngine(client).load(archive)  # type: ignore[arg-type]


def _tar(path: Path, members: dict[str, bytes | str]) -> None:
    """Write a tar: bytes are files, a str value makes a symlink to it."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, value in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(value, str):
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))


def test_only_pycs_inside_the_tree_come_back(tmp_path: Path) -> None:
    from imagebuild.sinks.engine import _unpack_pycs

    archive = tmp_path / "out.tar"
    _tar(
        archive,
        {
            "imgbuild-staging/0/app/__pycache__/mod.cpython-311.pyc": b"pyc",
            "imgbuild-staging/0/app/mod.py": b"source, not taken back",
            "imgbuild-staging/0/app/__pycache__/../../../../escape.pyc": b"climbs out",
            "imgbuild-staging/0/app/__pycache__/link.cpython-311.pyc": "/etc/passwd",
            "elsewhere/__pycache__/x.cpython-311.pyc": b"not the tree",
            "imgbuild-staging/0/app/__pycache__/notes.txt": b"not a pyc",
        },
    )
    root = tmp_path / "layers"
    _unpack_pycs(archive, root)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["layers/0/app/__pycache__/mod.cpython-311.pyc", "out.tar"]
    assert (root / "0/app/__pycache__/mod.cpython-311.pyc").read_bytes() == b"pyc"


def test_a_loader_that_wants_every_layer_gets_the_whole_archive(tmp_path: Path) -> None:
    """The thin archive relies on the classic loader skipping layers it has; a loader that
    reads them anyway fails on the empty files, and the full archive follows."""
    import tarfile

    from imagebuild.image.model import ImageConfig
    from imagebuild.image.mutate import build_image
    from imagebuild.image.store import BlobStore
    from imagebuild.report import NullReporter
    from imagebuild.sinks.engine import load_delta
    from tests.test_oci import fake_layer, python_base

    store = BlobStore(tmp_path / "blobs")
    base = python_base(store)
    layer = fake_layer(store, b"app layer", "imgbuild: project app 1")
    image = build_image(
        base, [layer], config=ImageConfig(), created="1970-01-01T00:00:00Z", store=store
    )
    sent: list[dict[str, int]] = []

    class PickyEngine:
        def diff_ids(self, ref: str) -> tuple[str, ...]:
            return tuple(base.diff_ids) if ref == "imgbuild-base:x" else ()

        def load(self, archive: Path) -> tuple[str, ...]:
            with tarfile.open(archive) as tar:
                sizes = {m.name: m.size for m in tar if m.isfile() and m.name.startswith("blobs/")}
            sent.append(sizes)
            if 0 in sizes.values():
                raise DockerError("docker load failed: unexpected EOF")
            return ("app:1",)

    engine: Any = PickyEngine()
    load_delta(engine, image, ["app:1"], tmp_path, "imgbuild-base:x", NullReporter())
    assert len(sent) == 2
    assert min(sent[0].values()) == 0  # the base layer was left out first
    assert 0 not in sent[1].values()
    assert not (tmp_path / "image.tar").exists()
