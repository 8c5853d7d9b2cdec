"""docker-py stream handling: an HTTP 200 with errorDetail inside is a failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagebuild.daemon import DockerEngine, read_progress
from imagebuild.errors import DockerError


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
