"""The image SBOM: licences read from METADATA, the document checked against the lock, its
layer in the image, determinism, and the OCI referrer (with the spec's fallback tag)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from imagebuild.digest import Digest, digest_bytes
from imagebuild.image.descriptor import OCI_INDEX, OCI_MANIFEST, SBOM_MEDIA_TYPE, Descriptor
from imagebuild.image.model import Image
from imagebuild.image.name import ImageReference
from imagebuild.image.sbom import SbomPackage, render_sbom, wheel_licenses
from imagebuild.image.store import BlobStore
from imagebuild.image.validate import validate_layout
from imagebuild.sinks.layout import OciLayoutSink
from imagebuild.sinks.referrers import attach_referrer, fallback_tag, merge_referrers
from tests.test_pipeline_build import World, world  # noqa: F401 (the fixture)


def _wheel(tmp_path: Path, *headers: str) -> Path:
    path = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        text = "\n".join(["Metadata-Version: 2.4", "Name: pkg", "Version: 1.0", *headers])
        zf.writestr("pkg-1.0.dist-info/METADATA", text + "\n")
    return path


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (("License-Expression: MIT OR Apache-2.0", "License: ignored"), ("MIT OR Apache-2.0",)),
        (("License: BSD-3-Clause",), ("BSD-3-Clause",)),
        (
            (
                "License: " + "x" * 200,
                "Classifier: License :: OSI Approved :: MIT License",
                "Classifier: License :: OSI Approved :: Apache Software License",
                "Classifier: Programming Language :: Python",
            ),
            ("Apache Software License", "MIT License"),
        ),
        ((), ()),
    ],
)
def test_licence_comes_from_the_wheel_metadata(
    tmp_path: Path, headers: tuple[str, ...], expected: tuple[str, ...]
) -> None:
    assert wheel_licenses(_wheel(tmp_path, *headers)) == expected


def test_the_document_is_the_same_bytes_for_the_same_packages() -> None:
    packages = (
        SbomPackage(name="app", version="1.0"),
        SbomPackage(name="lib", version="2.0", sha256=digest_bytes(b"x"), licenses=("MIT",)),
    )
    first = render_sbom(packages, subject="app", epoch=0)
    assert first == render_sbom(packages, subject="app", epoch=0)
    doc = json.loads(first)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.6"
    assert doc["metadata"]["timestamp"].startswith("1970-01-01T00:00:00")
    assert doc["metadata"]["component"]["name"] == "app"
    # The serial number follows the content: another version, another serial.
    other = render_sbom(
        (packages[0], SbomPackage(name="lib", version="2.1")), subject="app", epoch=0
    )
    assert json.loads(other)["serialNumber"] != doc["serialNumber"]
    assert json.loads(render_sbom(packages, subject="app", epoch=86400))["metadata"][
        "timestamp"
    ].startswith("1970-01-02")


def _read_layout_sbom(layout: Path) -> tuple[dict[str, object], list[str]]:
    """The SBOM from the image in ``layout`` (by opening its layer), and the layers' history."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    history = [h["created_by"] for h in config["history"]]
    # The document is a file of the project's layer, the top one.
    layer = manifest["layers"][-1]
    with tarfile.open(
        fileobj=io.BytesIO(gzip.decompress((blobs / layer["digest"][7:]).read_bytes()))
    ) as tar:
        files = [m.name for m in tar if m.isfile()]
        assert "app/.venv/sbom.cdx.json" in files
        assert all(f.startswith("app/.venv/lib/") for f in files if not f.endswith(".cdx.json"))
        extracted = tar.extractfile("app/.venv/sbom.cdx.json")
        assert extracted is not None
        return json.loads(extracted.read()), history


def test_the_image_lists_every_locked_package_with_the_lock_hash(
    world: World,  # noqa: F811
) -> None:
    world.depend_on("tinydep", "otherdep")
    world.lock()
    first = world.build(OciLayoutSink(path=world.root / "one"))
    validate_layout(world.root / "one")
    doc, history = _read_layout_sbom(world.root / "one")
    # No layer of its own: the project's, on top, holds it.
    assert history[-1] == "imgbuild: project app 1.0"
    assert not any("sbom" in line for line in history)

    lock = tomllib.loads((world.project / "pylock.toml").read_text())
    expected = {
        (p["name"], p["version"], p["wheels"][0]["hashes"]["sha256"]) for p in lock["packages"]
        if "wheels" in p  # the project itself is a directory entry
    }
    listed = {
        (c["name"], c["version"], c["hashes"][0]["content"])
        for c in doc["components"]  # type: ignore[union-attr]
        if c.get("hashes")
    }
    assert listed == expected and len(expected) == 2
    purls = {c["purl"] for c in doc["components"]}  # type: ignore[union-attr]
    assert purls == {"pkg:pypi/app@1.0", "pkg:pypi/otherdep@2.0", "pkg:pypi/tinydep@1.0"}
    assert doc["metadata"]["component"]["purl"] == "pkg:pypi/app@1.0"  # type: ignore[index]

    # Built again from nothing (a fresh cache): the same image, SBOM included.
    again = world.build(OciLayoutSink(path=world.root / "two"), cache_dir=world.root / "cache2")
    assert again.manifest_digest == first.manifest_digest


class FakeReferrerRegistry:
    """Stores what is pushed; answers 404 for ``referrers/`` unless ``api`` is set."""

    def __init__(self, *, api: bool) -> None:
        self.api = api
        self.manifests: dict[str, bytes] = {}
        self.blobs: set[str] = set()

    def push_image(
        self, image: Image, ref: ImageReference, store: BlobStore | None = None
    ) -> Digest:
        self.blobs.update(d.digest for d in (image.config, *image.layers))
        self.manifests[ref.reference] = image.manifest_bytes
        return image.digest

    def push_manifest(self, ref: ImageReference, data: bytes, *, media_type: str) -> Digest:
        self.manifests[ref.reference] = data
        return digest_bytes(data)

    def fetch_optional(self, ref: ImageReference, path: str) -> bytes | None:
        kind, _, name = path.partition("/")
        if kind == "referrers":
            return b'{"manifests": []}' if self.api else None
        return self.manifests.get(name)


def test_referrer_without_the_api_goes_to_the_fallback_tag_once(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    subject = Descriptor(media_type=OCI_MANIFEST, digest=digest_bytes(b"image"), size=5)
    sbom = store.put_bytes(b'{"bomFormat": "CycloneDX"}', media_type=SBOM_MEDIA_TYPE)
    registry = FakeReferrerRegistry(api=False)
    ref = ImageReference.parse("127.0.0.1:5000/team/app:1")
    line = attach_referrer(registry, ref, subject, sbom, store)
    tag = fallback_tag(subject.digest)
    assert tag == "sha256-" + subject.digest[7:] and f"(tag {tag})" in line
    index = json.loads(registry.manifests[tag])
    assert index["mediaType"] == OCI_INDEX
    (entry,) = index["manifests"]
    assert entry["artifactType"] == SBOM_MEDIA_TYPE
    artifact = json.loads(registry.manifests[entry["digest"]])
    assert artifact["subject"]["digest"] == subject.digest
    assert artifact["layers"][0]["digest"] == sbom.digest
    assert sbom.digest in registry.blobs
    # Attaching again keeps one entry; another referrer already there is kept.
    attach_referrer(registry, ref, subject, sbom, store)
    assert len(json.loads(registry.manifests[tag])["manifests"]) == 1
    other = {"mediaType": OCI_MANIFEST, "digest": digest_bytes(b"sig"), "size": 3}
    merged = json.loads(
        merge_referrers(
            json.dumps({"manifests": [other]}).encode(),
            _artifact(registry, entry["digest"], store),
            SBOM_MEDIA_TYPE,
        )
    )
    assert [m["digest"] for m in merged["manifests"]] == [other["digest"], entry["digest"]]


def _artifact(registry: FakeReferrerRegistry, digest: str, store: BlobStore) -> Image:
    data = registry.manifests[digest]
    desc = Descriptor(media_type=OCI_MANIFEST, digest=digest_bytes(data), size=len(data))
    empty = store.put_bytes(b"{}")
    return Image(manifest=desc, manifest_bytes=data, config=empty, layers=(), store=store)


def test_referrer_with_the_api_pushes_no_fallback_tag(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    subject = Descriptor(media_type=OCI_MANIFEST, digest=digest_bytes(b"image"), size=5)
    sbom = store.put_bytes(b"{}", media_type=SBOM_MEDIA_TYPE)
    registry = FakeReferrerRegistry(api=True)
    attach_referrer(registry, ImageReference.parse("r.test/app:1"), subject, sbom, store)
    assert fallback_tag(subject.digest) not in registry.manifests
    assert len(registry.manifests) == 1


def test_the_renderer_is_readied_while_dependencies_layers_are_made(
    world: World,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import imagebuild.pipeline.platform as platform

    readied: list[bool] = []
    monkeypatch.setattr(platform, "ready_renderer", lambda: readied.append(True))
    world.depend_on("tinydep", "otherdep")
    world.lock()
    world.build(OciLayoutSink(path=world.root / "one"))
    assert readied == [True]  # once, though two layers were made
    # Every layer below the project's from the cache: no document is likely new.
    world.build(OciLayoutSink(path=world.root / "two"))
    assert readied == [True]
