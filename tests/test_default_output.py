"""With no ``--output`` and no engine, a build writes a ``docker load`` archive and says so.

``check_engine_answers`` asks a ``docker`` output's engine before the build; with a
``fallback`` directory (the build's default output) an engine that does not answer is
replaced, in place, by a ``DockerArchiveSink``, whose archive is a real image checked blob
by blob.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from imagebuild.errors import DockerError
from imagebuild.image.model import Image
from imagebuild.image.mutate import build_image
from imagebuild.image.store import BlobStore
from imagebuild.image.tarball import build_layer
from imagebuild.image.validate import validate_archive
from imagebuild.image.name import ImageReference
from imagebuild.pipeline.outputs import (
    check_engine_answers,
    fetched_from,
    make_sinks,
    parse_outputs,
    pushed_only_to,
)
from imagebuild.sinks.daemon import DockerDaemon
from imagebuild.sinks.engine import DockerSink
from imagebuild.sinks.layout import DockerArchiveSink, OciLayoutSink
from imagebuild.sinks.remote import RegistryClient
from tests.test_oci import APP_CONFIG, CREATED, EPOCH, finished_for, make_tree


class Recorder:
    """A ``Reporter`` that keeps what it is told."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.warnings: list[str] = []

    def step(self, message: str) -> None:
        self.steps.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def progress(self, task: str, done: int, total: int | None, unit: str = "") -> None:
        pass


class Engine:
    """Connections to an engine that answers (or not), counted."""

    def __init__(self, answers: bool) -> None:
        self.answers = answers
        self.calls = 0

    def __call__(self) -> DockerDaemon:
        self.calls += 1
        if not self.answers:
            raise DockerError("cannot connect to the Docker engine (no socket)")
        return object()  # type: ignore[return-value]  # never used: only the answer counts


def sinks_for(values: list[str], engine: Callable[[], DockerDaemon]) -> tuple[object, ...]:
    registry: RegistryClient = object()  # type: ignore[assignment]  # no registry output here
    return make_sinks(parse_outputs(values), registry=registry, engine=engine)


def test_an_engine_that_does_not_answer_becomes_an_archive_in_its_place(tmp_path: Path) -> None:
    engine = Engine(answers=False)
    sinks = sinks_for([f"oci:{tmp_path / 'layout'}", "docker"], engine)
    reporter = Recorder()
    dist = tmp_path / "proj" / "dist"
    replaced = check_engine_answers(sinks, fallback=dist, reporter=reporter)  # type: ignore[arg-type]
    assert len(replaced) == 2 and replaced[0] is sinks[0]
    assert isinstance(replaced[0], OciLayoutSink)
    assert replaced[1] == DockerArchiveSink(directory=dist)
    assert (replaced[1].kind, replaced[1].takes_index) == ("docker", False)
    assert reporter.warnings == [
        "cannot connect to the Docker engine (no socket): the image is written as an archive "
        f"in {dist}"
    ]
    assert engine.calls == 1
    assert not dist.exists()  # nothing is written before the build


def test_without_a_fallback_an_engine_that_does_not_answer_fails_the_build(
    tmp_path: Path,
) -> None:
    engine = Engine(answers=False)
    sinks = sinks_for(["docker"], engine)
    with pytest.raises(DockerError, match="cannot connect to the Docker engine"):
        check_engine_answers(sinks, reporter=Recorder())  # type: ignore[arg-type]
    # Without a reporter the fallback still happens, silently.
    [only] = check_engine_answers(sinks, fallback=tmp_path)  # type: ignore[arg-type]
    assert only == DockerArchiveSink(directory=tmp_path)


def test_an_engine_that_answers_keeps_the_docker_output(tmp_path: Path) -> None:
    engine = Engine(answers=True)
    sinks = sinks_for(["docker", f"oci:{tmp_path / 'layout'}"], engine)
    reporter = Recorder()
    kept = check_engine_answers(sinks, fallback=tmp_path / "dist", reporter=reporter)  # type: ignore[arg-type]
    assert kept == sinks and isinstance(kept[0], DockerSink)
    assert engine.calls == 1 and reporter.warnings == []


def test_file_outputs_never_ask_an_engine(tmp_path: Path) -> None:
    engine = Engine(answers=False)
    sinks = sinks_for([f"oci:{tmp_path / 'a'}", f"oci-archive:{tmp_path / 'b.tar'}"], engine)
    assert check_engine_answers(sinks, fallback=tmp_path) == sinks  # type: ignore[arg-type]
    assert engine.calls == 0


def test_layers_stay_in_a_registry_only_when_every_output_pushes_there(tmp_path: Path) -> None:
    """``--push`` alone: the layers of the registry it pushes to are mounted, not fetched;
    another registry's are fetched (sent by the push), and any other output reads them all."""
    engine = Engine(answers=True)
    tags = [ImageReference.parse("registry.example/app:1")]
    pushed = pushed_only_to(sinks_for(["registry"], engine), tags)
    assert pushed == {"registry.example"}
    assert not fetched_from("registry.example", pushed)
    assert fetched_from("docker.io", pushed)
    both = [*tags, ImageReference.parse("ghcr.io/org/app:1")]
    assert fetched_from("registry.example", pushed_only_to(sinks_for(["registry"], engine), both))
    layout = sinks_for(["registry", f"oci:{tmp_path / 'layout'}"], engine)
    assert pushed_only_to(layout, tags) is None and fetched_from("registry.example", None)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Image, BlobStore]:
    store = BlobStore(tmp_path / "store")
    layer = build_layer(make_tree(tmp_path / "tree"), store, mtime=EPOCH, created_by="deps")
    return build_image(None, [layer], config=APP_CONFIG, created=CREATED, store=store), store


@pytest.mark.parametrize(
    ("tags", "file", "repo_tags"),
    [
        (
            ("ghcr.io/acme/app:1.0", "app:latest"),
            "app.tar",
            ["ghcr.io/acme/app:1.0", "docker.io/library/app:latest"],
        ),
        (("hello",), "hello.tar", ["docker.io/library/hello:latest"]),
        ((), "image.tar", []),
    ],
)
def test_the_archive_is_a_checked_image_that_docker_load_takes(
    tmp_path: Path,
    image: tuple[Image, BlobStore],
    tags: tuple[str, ...],
    file: str,
    repo_tags: list[str],
) -> None:
    built, store = image
    dist = tmp_path / "proj" / "dist"  # made on demand
    sink = DockerArchiveSink(directory=dist)
    lines = sink.write(finished_for(built, store, tmp_path, *tags), Recorder())
    archive = dist / file
    assert lines == (
        f"wrote {archive} (no Docker engine answered); load it with: docker load -i {archive}",
    )
    assert sorted(p.name for p in dist.iterdir()) == [file]
    validate_archive(archive)  # every blob re-hashed
    with tarfile.open(archive) as tar:
        stream = tar.extractfile("manifest.json")
        assert stream is not None
        [entry] = json.loads(stream.read())
    assert entry["RepoTags"] == repo_tags
    assert entry["Layers"] == [f"blobs/sha256/{built.layers[0].digest.removeprefix('sha256:')}"]
