"""pipeline.published: the platforms a base is published for bound what a lock covers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from imagebuild.errors import ProjectError, RegistryError
from imagebuild.image.model import BaseImage
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.pipeline.published import index_platforms, pull_published

REF = ImageReference.parse("registry.example/team/python:3.11")


def _index(*platforms: str) -> bytes:
    manifests = []
    for platform in platforms:
        os_name, arch = platform.split("/")
        manifests.append(
            {"digest": "sha256:" + "0" * 64, "platform": {"os": os_name, "architecture": arch}}
        )
    return json.dumps({"schemaVersion": 2, "manifests": manifests}).encode()


class OnePlatformRegistry:
    """Pulls succeed for ``arch`` only, as for a single image's manifest."""

    def __init__(self, arch: str) -> None:
        self.arch = arch
        self.pulls: list[str] = []

    def pull_image(
        self, ref: ImageReference, *, platform: Sequence[str], store: BlobStore
    ) -> BaseImage:
        self.pulls.append(platform[1])
        if platform[1] != self.arch:
            raise RegistryError(
                f"pulling {ref}: image is for linux/{self.arch}, not linux/{platform[1]}"
            )
        return object()  # type: ignore[return-value]  # only counted here

    def fetch_manifest(self, ref: ImageReference) -> tuple[bytes, str, str]:
        raise AssertionError("not asked here")


class Warnings:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        self.lines.append(message)

    def progress(self, task: str, done: int, total: int | None, unit: str = "") -> None:
        pass


def test_index_platforms() -> None:
    assert index_platforms(_index("linux/arm64", "linux/amd64", "unknown/unknown")) == (
        "linux/amd64",
        "linux/arm64",
    )
    single = {"schemaVersion": 2, "config": {}, "layers": []}
    assert index_platforms(json.dumps(single).encode()) is None
    assert index_platforms(b"not json") is None


def test_an_index_of_one_platform_narrows_the_lock_and_says_so(tmp_path: Path) -> None:
    registry, warnings = OnePlatformRegistry("amd64"), Warnings()
    pulled = pull_published(
        registry, REF, body=_index("linux/amd64"), archs=("amd64", "arm64"),
        store=BlobStore(tmp_path), reporter=warnings,
    )  # fmt: skip
    assert list(pulled) == ["amd64"] and registry.pulls == ["amd64"]  # arm64 never asked
    assert warnings.lines == [
        f"base {REF} is published for linux/amd64 only: the lock covers linux/amd64, "
        "not linux/amd64, linux/arm64"
    ]


def test_a_single_image_is_pulled_for_each_asked_platform(tmp_path: Path) -> None:
    registry, warnings = OnePlatformRegistry("arm64"), Warnings()
    body = json.dumps({"schemaVersion": 2, "config": {}, "layers": []}).encode()
    pulled = pull_published(
        registry, REF, body=body, archs=("amd64", "arm64"), store=BlobStore(tmp_path),
        reporter=warnings,
    )  # fmt: skip
    assert list(pulled) == ["arm64"]
    assert "the lock covers linux/arm64" in warnings.lines[0]


def test_no_platform_in_common_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ProjectError) as info:
        pull_published(
            OnePlatformRegistry("amd64"), REF, body=_index("linux/amd64"), archs=("arm64",),
            store=BlobStore(tmp_path), reporter=None,
        )  # fmt: skip
    assert str(info.value).startswith(
        f"base {REF} is published for linux/amd64, none of the lock's platforms (linux/arm64)"
    )
