"""The Docker build context writer, over real layer tars (no engine needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagebuild.errors import ImageError
from imagebuild.image.model import ImageConfig, Layer
from imagebuild.image.store import BlobStore
from imagebuild.image.tarball import build_layer
from imagebuild.sinks.context import write_docker_context

BASE = "127.0.0.1:5055/distroless/python3-debian12@sha256:" + "a" * 64


def _layer(tmp_path: Path, store: BlobStore, name: str, text: str) -> Layer:
    staging = tmp_path / f"staging-{name}"
    (staging / "app").mkdir(parents=True)
    (staging / "app" / f"{name}.py").write_text(text)
    (staging / "app" / "python").symlink_to("/usr/bin/python3.11")
    return build_layer(staging, store, mtime=0, created_by=f"imgbuild: dependency {name} 1.0")


def _write(dest: Path, layers: list[Layer], store: BlobStore, **config: object) -> None:
    write_docker_context(
        dest,
        title="app 1.0",
        base=BASE,
        upstream="gcr.io/distroless/python3-debian12:latest",
        layers=layers,
        config=ImageConfig(**config),  # type: ignore[arg-type]
        store=store,
    )


def test_layers_become_directories_and_copy_lines(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    layers = [_layer(tmp_path, store, "one", "A = 1\n"), _layer(tmp_path, store, "two", "B = 2\n")]
    dest = tmp_path / "ctx"
    _write(dest, layers, store, entrypoint=("/app/.venv/bin/app",), env=(("X", "$Y\\z"),))
    text = (dest / "Dockerfile").read_text()
    assert f"\nFROM {BASE}\n" in text
    assert "# Base: gcr.io/distroless/python3-debian12:latest," in text
    copies = [line for line in text.splitlines() if line.startswith("COPY ")]
    assert copies == [
        "COPY layers/01-dependency-one-1.0/ /",
        "COPY layers/02-dependency-two-1.0/ /",
    ]
    assert 'ENV X="\\$Y\\\\z"' in text
    assert 'ENTRYPOINT ["/app/.venv/bin/app"]' in text
    assert (dest / "layers/02-dependency-two-1.0/app/two.py").read_text() == "B = 2\n"
    assert os.readlink(dest / "layers/01-dependency-one-1.0/app/python") == "/usr/bin/python3.11"

    # Written again (one layer fewer): the earlier context is replaced, not merged.
    _write(dest, layers[:1], store)
    assert sorted(p.name for p in (dest / "layers").iterdir()) == ["01-dependency-one-1.0"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ctx")] == []


def test_a_value_with_a_line_break_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    layers = [_layer(tmp_path, store, "one", "A = 1\n")]
    with pytest.raises(ImageError) as caught:
        _write(tmp_path / "ctx", layers, store, labels=(("note", "two\nlines"),))
    assert str(caught.value).startswith(
        "'note': a value with a line break cannot be written into a Dockerfile"
    )
    assert not (tmp_path / "ctx").exists()
