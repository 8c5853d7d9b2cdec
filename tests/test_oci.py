"""Tests for imagebuild.image (layers, image assembly, validation) and the layout sinks."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imagebuild.digest import Digest, digest_bytes, digest_file, digest_hex
from imagebuild.errors import ImageError, LayerError
from imagebuild.image import store as store_module
from imagebuild.image.descriptor import (
    ANNOTATION_REF_NAME,
    DOCKER_LAYER_GZIP,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    canonical_json,
)
from imagebuild.image.model import BaseImage, Image, ImageConfig, ImageIndex, Layer
from imagebuild.image.mutate import build_image, build_index
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore, PlainLayers
from imagebuild.image import tarball
from imagebuild.image.tarball import build_layer
from imagebuild.image.validate import validate_archive, validate_layout
from imagebuild.report import NullReporter
from imagebuild.sinks.layout import (
    OciArchiveSink,
    OciLayoutSink,
    write_docker_archive,
    write_oci_archive,
    write_oci_layout,
)
from imagebuild.sinks.sink import Finished

EPOCH = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"


def make_tree(root: Path, *, file_mode: int = 0o644, exec_mode: int = 0o755) -> Path:
    """A small staging tree mirroring the container root."""
    (root / "app/.venv/bin").mkdir(parents=True)
    (root / "app/.venv/lib/python3.11/site-packages/pkg").mkdir(parents=True)
    (root / "app/.venv/lib/python3.11/site-packages/pkg/__init__.py").write_text("x = 1\n")
    (root / "app/.venv/bin/tool").write_text("#!/app/.venv/bin/python\n")
    os.chmod(root / "app/.venv/bin/tool", exec_mode)
    os.chmod(root / "app/.venv/lib/python3.11/site-packages/pkg/__init__.py", file_mode)
    (root / "app/.venv/bin/python").symlink_to("/usr/local/bin/python3.11")
    (root / "app/.venv/pyvenv.cfg").write_text("home = /usr/local/bin\n")
    (root / "app/a-b").write_text("sorts before app/a/ bytewise\n")
    (root / "app/a").mkdir()
    (root / "app/a/b").write_text("b\n")
    return root


def members(store: BlobStore, layer: Layer) -> list[tarfile.TarInfo]:
    with tarfile.open(store.path(layer.digest), "r:gz") as tar:
        return tar.getmembers()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "store")


# ---------------------------------------------------------------------------------------------
# Digests and the blob store


def test_sha256_helpers(tmp_path: Path) -> None:
    data = b"hello\n"
    expected = "sha256:" + hashlib.sha256(data).hexdigest()
    assert digest_bytes(data) == expected
    (tmp_path / "f").write_bytes(data * 300_000)
    assert digest_file(tmp_path / "f") == digest_bytes(data * 300_000)
    assert digest_hex(Digest(expected)) == expected.removeprefix("sha256:")


def test_blob_store_put_and_ingest(store: BlobStore) -> None:
    desc = store.put_bytes(b"{}", media_type=OCI_CONFIG)
    assert desc.digest == digest_bytes(b"{}")
    assert desc.size == 2
    assert store.path(desc.digest).read_bytes() == b"{}"
    assert store.path(desc.digest).parent == store.root / "sha256"
    with pytest.raises(ImageError, match="content hashes to"):
        store.ingest([b"abc"], expected=digest_bytes(b"abd"))
    assert not store.has(digest_bytes(b"abc"))
    assert not store.has(digest_bytes(b"abd"))
    assert list((store.root / "tmp").iterdir()) == []


def test_blob_store_put_file(store: BlobStore) -> None:
    with store.temp_file() as tmp:
        tmp.write_bytes(b"layer bytes")
        desc = store.put_file(tmp, media_type=OCI_LAYER_GZIP)
    assert store.read_bytes(desc.digest) == b"layer bytes"
    assert desc.media_type == OCI_LAYER_GZIP


# ---------------------------------------------------------------------------------------------
# Layers


def test_layer_is_deterministic_across_mtimes_modes_and_owners(tmp_path: Path) -> None:
    one = make_tree(tmp_path / "one")
    two = make_tree(tmp_path / "two", file_mode=0o600, exec_mode=0o700)
    for path in two.rglob("*"):
        os.utime(path, (12345, 12345), follow_symlinks=False)
        if os.geteuid() == 0:
            os.lchown(path, 4321, 4321)
    os.chmod(two / "app/a", 0o700)
    layer_one = build_layer(one, BlobStore(tmp_path / "s1"), mtime=EPOCH)
    layer_two = build_layer(two, BlobStore(tmp_path / "s2"), mtime=EPOCH)
    again = build_layer(one, BlobStore(tmp_path / "s1"), mtime=EPOCH)
    assert layer_one == layer_two == again
    assert (tmp_path / "s1/sha256" / digest_hex(layer_one.digest)).read_bytes() == (
        tmp_path / "s2/sha256" / digest_hex(layer_two.digest)
    ).read_bytes()
    # A different epoch is a different layer.
    assert (
        build_layer(one, BlobStore(tmp_path / "s3"), mtime=EPOCH + 1).diff_id != layer_one.diff_id
    )


def test_layer_digests_match_blob(store: BlobStore, tmp_path: Path) -> None:
    layer = build_layer(make_tree(tmp_path / "t"), store, mtime=EPOCH, created_by="imgbuild: x")
    blob = store.path(layer.digest).read_bytes()
    assert layer.media_type == OCI_LAYER_GZIP
    assert layer.size == len(blob)
    assert layer.digest == digest_bytes(blob)
    assert layer.diff_id == digest_bytes(gzip.decompress(blob))
    assert layer.created_by == "imgbuild: x"
    assert layer.descriptor == Descriptor(
        media_type=OCI_LAYER_GZIP, digest=layer.digest, size=layer.size
    )


def test_layer_entry_order_and_parent_dirs(store: BlobStore, tmp_path: Path) -> None:
    layer = build_layer(make_tree(tmp_path / "t"), store, mtime=EPOCH)
    with tarfile.open(store.path(layer.digest), "r:gz") as tar:
        names = tar.getnames()
        raw = [m.name for m in tar.getmembers()]
    assert names == [
        "app",
        "app/.venv",
        "app/.venv/bin",
        "app/.venv/bin/python",
        "app/.venv/bin/tool",
        "app/.venv/lib",
        "app/.venv/lib/python3.11",
        "app/.venv/lib/python3.11/site-packages",
        "app/.venv/lib/python3.11/site-packages/pkg",
        "app/.venv/lib/python3.11/site-packages/pkg/__init__.py",
        "app/.venv/pyvenv.cfg",
        "app/a",
        "app/a-b",
        "app/a/b",
    ]
    assert names == sorted(names, key=os.fsencode)
    assert names.index("app/a-b") < names.index("app/a/b")  # bytewise: '-' < '/'
    for name in raw:
        assert not name.startswith(("/", "./"))
        parent = name.rsplit("/", 1)[0]
        if "/" in name:
            assert names.index(parent) < names.index(name)


def test_layer_metadata_is_normalised(store: BlobStore, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t", file_mode=0o600, exec_mode=0o711)
    (tree / "app/group-exec").write_text("")
    os.chmod(tree / "app/group-exec", 0o610)
    os.chmod(tree / "app/a", 0o700)
    by_name = {m.name: m for m in members(store, build_layer(tree, store, mtime=EPOCH))}
    for m in by_name.values():
        assert m.mtime == EPOCH
        assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
        assert not m.pax_headers
    assert by_name["app/a"].isdir() and by_name["app/a"].mode == 0o755
    assert by_name["app/.venv/bin/tool"].mode == 0o755
    assert by_name["app/group-exec"].mode == 0o755
    assert by_name["app/.venv/lib/python3.11/site-packages/pkg/__init__.py"].mode == 0o644
    link = by_name["app/.venv/bin/python"]
    assert link.issym() and link.linkname == "/usr/local/bin/python3.11"


def test_layer_tar_format_and_gzip_header(store: BlobStore, tmp_path: Path) -> None:
    tree = tmp_path / "t"
    long_dir = tree / ("d" * 60) / ("e" * 60)
    long_dir.mkdir(parents=True)
    (long_dir / "f").write_text("long")
    (tree / "rel").symlink_to("../dangling/target")
    layer = build_layer(tree, store, mtime=EPOCH)
    blob = store.path(layer.digest).read_bytes()
    # gzip: magic, deflate, no flags (no FNAME), MTIME 0, XFL 0, OS 255 (unknown).
    assert blob[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    raw_tar = gzip.decompress(blob)
    assert raw_tar[257:265] == b"ustar\x0000"  # POSIX (PAX) magic, never GNU's "ustar  \0"
    assert len(raw_tar) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(raw_tar)) as tar:
        by_name = {m.name: m for m in tar.getmembers()}
        assert by_name["rel"].linkname == "../dangling/target"
        long_name = f"{'d' * 60}/{'e' * 60}/f"
        extracted = tar.extractfile(by_name[long_name])
        assert extracted is not None and extracted.read() == b"long"


@pytest.mark.parametrize("pieces", [1, 7, 4096])
def test_gzip_bytes_follow_the_tar_alone_however_it_is_written(pieces: int) -> None:
    # ISA-L's deflate output depends on how its input is cut; the writer re-cuts it into fixed
    # blocks, so the same tar bytes written in any pieces give the same blob.
    rng = random.Random(7)
    words = [bytes(rng.choices(range(97, 123), k=rng.randint(2, 9))) for _ in range(500)]
    data = b" ".join(rng.choices(words, k=700_000))  # ~4 MB: several blocks and a tail
    cuts = sorted(rng.sample(range(1, len(data)), pieces - 1))

    def gzipped(bounds: list[int]) -> bytes:
        out = io.BytesIO()
        with tarball._GzipWriter(out) as gz:
            for start, end in zip([0, *bounds], [*bounds, len(data)], strict=True):
                gz.write(data[start:end])
        return out.getvalue()

    blob = gzipped(cuts)
    assert blob == gzipped([])
    assert gzip.decompress(blob) == data  # the trailer's CRC-32 and size are checked too
    assert len(blob) < len(data) // 2


def test_hardlinks_become_regular_files(store: BlobStore, tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "a").write_text("same")
    os.link(tree / "a", tree / "b")
    with tarfile.open(store.path(build_layer(tree, store, mtime=0).digest), "r:gz") as tar:
        for name in ("a", "b"):
            info = tar.getmember(name)
            assert info.isreg()
            f = tar.extractfile(info)
            assert f is not None and f.read() == b"same"


def test_prefix_dirs_and_empty_layer(store: BlobStore, tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    layer = build_layer(tree, store, mtime=EPOCH, prefix_dirs=["/app/data", "app"])
    assert [m.name for m in members(store, layer)] == ["app", "app/data"]
    empty = build_layer(tree, store, mtime=EPOCH)
    assert members(store, empty) == []


def test_layer_rejects_bad_input(store: BlobStore, tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    with pytest.raises(LayerError, match="mtime"):
        build_layer(tree, store, mtime=1.5)  # type: ignore[arg-type]
    with pytest.raises(LayerError, match="does not exist"):
        build_layer(tmp_path / "missing", store, mtime=0)
    os.mkfifo(tree / "fifo")
    with pytest.raises(LayerError, match="unsupported file type"):
        build_layer(tree, store, mtime=0)


# ---------------------------------------------------------------------------------------------
# Image assembly


def fake_layer(store: BlobStore, content: bytes, created_by: str) -> Layer:
    """A layer whose digests don't depend on zlib: a stored gzip of a fixed tar."""
    tar_bytes = content.ljust(1024, b"\0")
    blob = gzip.compress(tar_bytes, mtime=0)
    desc = store.put_bytes(blob, media_type=OCI_LAYER_GZIP)
    return Layer(
        digest=desc.digest,
        diff_id=digest_bytes(tar_bytes),
        size=desc.size,
        created_by=created_by,
    )


def python_base(store: BlobStore) -> BaseImage:
    base_blob = store.put_bytes(b"base layer", media_type=DOCKER_LAYER_GZIP)
    return BaseImage(
        reference="docker.io/library/python:3.11-slim",
        manifest_digest=digest_bytes(b"base manifest"),
        config={
            "architecture": "amd64",
            "os": "linux",
            "created": "2020-01-01T00:00:00Z",
            "docker_version": "20.10",
            "config": {
                "Env": ["PATH=/usr/local/bin:/usr/bin", "LANG=C.UTF-8", "PYTHON_VERSION=3.11.9"],
                "Cmd": ["python3"],
                "Labels": {"maintainer": "x", "keep": "1"},
                "StopSignal": "SIGINT",
            },
            "history": [{"created": "2020-01-01T00:00:00Z", "created_by": "/bin/sh -c #(nop) ADD"}],
            "rootfs": {"type": "layers", "diff_ids": [digest_bytes(b"base tar")]},
        },
        layers=(
            Descriptor(media_type=DOCKER_LAYER_GZIP, digest=base_blob.digest, size=base_blob.size),
        ),
        diff_ids=(digest_bytes(b"base tar"),),
    )


APP_CONFIG = ImageConfig(
    entrypoint=("/app/.venv/bin/app",),
    env=(("PATH", "/app/.venv/bin:/usr/local/bin:/usr/bin"), ("VIRTUAL_ENV", "/app/.venv")),
    workdir="/app",
    labels=(("org.opencontainers.image.source", "https://example.invalid/app"), ("keep", "2")),
    exposed_ports=("8000",),
)


def test_config_and_manifest_golden(store: BlobStore) -> None:
    base = python_base(store)
    layer = fake_layer(store, b"deps", "imgbuild: dependency numpy 2.1.0")
    image = build_image(base, [layer], config=APP_CONFIG, created=CREATED, store=store)
    config = store.read_bytes(image.config.digest)
    base_diff, our_diff = digest_bytes(b"base tar"), layer.diff_id
    assert config.decode() == (
        '{"architecture":"amd64","config":{"Entrypoint":["/app/.venv/bin/app"],'
        '"Env":["LANG=C.UTF-8","PYTHON_VERSION=3.11.9",'
        '"PATH=/app/.venv/bin:/usr/local/bin:/usr/bin","VIRTUAL_ENV=/app/.venv"],'
        '"ExposedPorts":{"8000/tcp":{}},'
        '"Labels":{"keep":"2","maintainer":"x",'
        '"org.opencontainers.image.source":"https://example.invalid/app"},'
        '"StopSignal":"SIGINT","WorkingDir":"/app"},'
        '"created":"2023-11-14T22:13:20Z",'
        '"history":[{"created":"2020-01-01T00:00:00Z","created_by":"/bin/sh -c #(nop) ADD"},'
        '{"created":"2023-11-14T22:13:20Z","created_by":"imgbuild: dependency numpy 2.1.0"}],'
        '"os":"linux","rootfs":{"diff_ids":["' + base_diff + '","' + our_diff + '"],'
        '"type":"layers"}}'
    )
    assert image.manifest_bytes.decode() == (
        '{"config":{"digest":"' + image.config.digest + '",'
        '"mediaType":"application/vnd.oci.image.config.v1+json","size":' + str(len(config)) + "},"
        '"layers":[{"digest":"' + base.layers[0].digest + '",'
        '"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","size":10},'
        '{"digest":"' + layer.digest + '",'
        '"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","size":'
        + str(layer.size)
        + "}],"
        '"mediaType":"application/vnd.oci.image.manifest.v1+json","schemaVersion":2}'
    )
    assert image.manifest == Descriptor(
        media_type=OCI_MANIFEST,
        digest=digest_bytes(image.manifest_bytes),
        size=len(image.manifest_bytes),
    )
    assert image.config.media_type == OCI_CONFIG
    assert [d.media_type for d in image.layers] == [OCI_LAYER_GZIP, OCI_LAYER_GZIP]
    assert image.platform == ("linux", "amd64")
    # Same inputs, same digests.
    again = build_image(base, [layer], config=APP_CONFIG, created=CREATED, store=store)
    assert again.manifest == image.manifest


def test_config_without_base_and_with_annotations(store: BlobStore) -> None:
    layer = fake_layer(store, b"app", "imgbuild: project app 1.0")
    image = build_image(
        None,
        [layer],
        config=ImageConfig(cmd=("python",), user="65532"),
        created=CREATED,
        store=store,
        annotations={"org.opencontainers.image.version": "1.0"},
        platform=("linux", "arm64"),
    )
    config = json.loads(store.read_bytes(image.config.digest))
    assert config == {
        "architecture": "arm64",
        "os": "linux",
        "created": CREATED,
        "config": {"Cmd": ["python"], "User": "65532"},
        "history": [{"created": CREATED, "created_by": "imgbuild: project app 1.0"}],
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
    }
    manifest = json.loads(image.manifest_bytes)
    assert manifest["annotations"] == {"org.opencontainers.image.version": "1.0"}
    assert image.platform == ("linux", "arm64")


def test_base_cmd_kept_without_entrypoint(store: BlobStore) -> None:
    base = python_base(store)
    image = build_image(base, [], config=ImageConfig(), created=CREATED, store=store)
    inner = json.loads(store.read_bytes(image.config.digest))["config"]
    assert inner["Cmd"] == ["python3"]
    assert inner["Env"][0] == "PATH=/usr/local/bin:/usr/bin"


def test_build_image_errors(store: BlobStore) -> None:
    missing = Layer(digest=digest_bytes(b"nope"), diff_id=digest_bytes(b"x"), size=4)
    with pytest.raises(ImageError, match="missing from the blob store"):
        build_image(None, [missing], config=ImageConfig(), created=CREATED, store=store)
    with pytest.raises(ImageError, match="exposed port"):
        build_image(
            None, [], config=ImageConfig(exposed_ports=("http",)), created=CREATED, store=store
        )
    base = python_base(store)
    odd = BaseImage(
        reference=base.reference,
        manifest_digest=base.manifest_digest,
        config=base.config,
        layers=(Descriptor(media_type="application/x-odd", digest=base.layers[0].digest, size=10),),
        diff_ids=base.diff_ids,
    )
    with pytest.raises(ImageError, match="unsupported layer media type"):
        build_image(odd, [], config=ImageConfig(), created=CREATED, store=store)


# ---------------------------------------------------------------------------------------------
# Sinks and validation


@pytest.fixture
def real_image(store: BlobStore, tmp_path: Path) -> Image:
    deps = build_layer(
        make_tree(tmp_path / "deps"), store, mtime=EPOCH, created_by="imgbuild: deps"
    )
    app_tree = tmp_path / "app"
    (app_tree / "app/src").mkdir(parents=True)
    (app_tree / "app/src/main.py").write_text("print('hi')\n")
    app = build_layer(app_tree, store, mtime=EPOCH, created_by="imgbuild: project")
    return build_image(None, [deps, app], config=APP_CONFIG, created=CREATED, store=store)


def test_oci_layout_roundtrip(real_image: Image, tmp_path: Path) -> None:
    dest = tmp_path / "layout"
    write_oci_layout(real_image, dest, ref_name="1.0")
    validate_layout(dest)
    assert json.loads((dest / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((dest / "index.json").read_text())
    assert index["manifests"] == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": real_image.digest,
            "size": real_image.manifest.size,
            "annotations": {"org.opencontainers.image.ref.name": "1.0"},
            "platform": {"architecture": "amd64", "os": "linux"},
        }
    ]
    blobs = sorted(p.name for p in (dest / "blobs/sha256").iterdir())
    assert blobs == sorted(
        digest_hex(d.digest) for d in (real_image.manifest, real_image.config, *real_image.layers)
    )
    # Writing again over an existing layout works; over an unrelated directory does not.
    write_oci_layout(real_image, dest, ref_name="1.0")
    validate_layout(dest)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("")
    with pytest.raises(ImageError, match="not empty"):
        write_oci_layout(real_image, other, ref_name="1.0")


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_validate_catches_corrupted_layer(real_image: Image, tmp_path: Path) -> None:
    dest = tmp_path / "layout"
    write_oci_layout(real_image, dest, ref_name="1")
    victim = real_image.layers[1].digest
    _corrupt(dest / "blobs/sha256" / digest_hex(victim))
    with pytest.raises(ImageError, match=f"layer blob {victim}"):
        validate_layout(dest)


def test_validate_catches_missing_and_short_blobs(real_image: Image, tmp_path: Path) -> None:
    dest = tmp_path / "layout"
    write_oci_layout(real_image, dest, ref_name="1")
    (dest / "blobs/sha256" / digest_hex(real_image.config.digest)).unlink()
    with pytest.raises(ImageError, match=f"config blob {real_image.config.digest} is missing"):
        validate_layout(dest)


def test_validate_catches_diff_id_mismatch(store: BlobStore, tmp_path: Path) -> None:
    layer = build_layer(make_tree(tmp_path / "t"), store, mtime=EPOCH)
    lying = Layer(digest=layer.digest, diff_id=digest_bytes(b"other"), size=layer.size)
    image = build_image(None, [lying], config=ImageConfig(), created=CREATED, store=store)
    write_oci_layout(image, tmp_path / "layout", ref_name="x")
    with pytest.raises(ImageError, match=f"layer blob {layer.digest} decompresses to"):
        validate_layout(tmp_path / "layout")


def test_validate_catches_diff_id_count(store: BlobStore, tmp_path: Path) -> None:
    layer = build_layer(make_tree(tmp_path / "t"), store, mtime=EPOCH)
    config = store.put_bytes(
        canonical_json(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
        ),
        media_type=OCI_CONFIG,
    )
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.descriptor.to_json()],
        }
    )
    desc = store.put_bytes(manifest, media_type=OCI_MANIFEST)
    image = Image(
        manifest=desc,
        manifest_bytes=manifest,
        config=config,
        layers=(layer.descriptor,),
        store=store,
    )
    write_oci_layout(image, tmp_path / "layout", ref_name="x")
    with pytest.raises(ImageError, match="1 layers but config .* lists 0 diff_ids"):
        validate_layout(tmp_path / "layout")


def test_docker_archive_structure(real_image: Image, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    write_docker_archive(real_image, archive, repo_tags=["myapp:1.0", "ghcr.io/acme/app"])
    validate_archive(archive)
    with tarfile.open(archive) as tar:
        infos = tar.getmembers()
        names = [m.name for m in infos]
        manifest_json = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        layout = json.loads(tar.extractfile("oci-layout").read())  # type: ignore[union-attr]
    hexes = sorted(
        digest_hex(d.digest) for d in (real_image.manifest, real_image.config, *real_image.layers)
    )
    assert names == [
        "blobs",
        "blobs/sha256",
        *[f"blobs/sha256/{h}" for h in hexes],
        "index.json",
        "manifest.json",
        "oci-layout",
    ]
    for info in infos:
        assert (info.mtime, info.uid, info.gid, info.uname, info.gname) == (0, 0, 0, "", "")
    assert layout == {"imageLayoutVersion": "1.0.0"}
    assert manifest_json == [
        {
            "Config": f"blobs/sha256/{digest_hex(real_image.config.digest)}",
            "RepoTags": ["myapp:1.0", "ghcr.io/acme/app:latest"],
            "Layers": [f"blobs/sha256/{digest_hex(d.digest)}" for d in real_image.layers],
        }
    ]
    assert [m["annotations"] for m in index["manifests"]] == [
        {
            "io.containerd.image.name": "docker.io/library/myapp:1.0",
            "org.opencontainers.image.ref.name": "1.0",
        },
        {
            "io.containerd.image.name": "ghcr.io/acme/app:latest",
            "org.opencontainers.image.ref.name": "latest",
        },
    ]
    assert {m["digest"] for m in index["manifests"]} == {real_image.digest}
    # Deterministic, and the stream form writes the same bytes.
    again = tmp_path / "again.tar"
    write_docker_archive(real_image, again, repo_tags=["myapp:1.0", "ghcr.io/acme/app"])
    buffer = io.BytesIO()
    write_docker_archive(real_image, buffer, repo_tags=["myapp:1.0", "ghcr.io/acme/app"])
    assert archive.read_bytes() == again.read_bytes() == buffer.getvalue()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_docker_archive_rejects_bad_tags(real_image: Image, tmp_path: Path) -> None:
    for bad in ("MyApp:1", "app@sha256:" + "0" * 64, "app:bad tag"):
        with pytest.raises(ImageError):
            write_docker_archive(real_image, tmp_path / "x.tar", repo_tags=[bad])
    assert not (tmp_path / "x.tar").exists()


def test_oci_archive_and_validation_of_tampered_archive(real_image: Image, tmp_path: Path) -> None:
    archive = tmp_path / "image.oci.tar"
    write_oci_archive(real_image, archive, ref_name="v1")
    validate_archive(archive)
    with tarfile.open(archive) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        assert "manifest.json" not in tar.getnames()
    assert index["manifests"][0]["annotations"] == {"org.opencontainers.image.ref.name": "v1"}

    # Rewrite the archive with one layer blob corrupted: validation names that blob.
    victim = f"blobs/sha256/{digest_hex(real_image.layers[0].digest)}"
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(archive) as src, tarfile.open(tampered, "w") as dst:
        for info in src.getmembers():
            f = src.extractfile(info)
            data = f.read() if f is not None else None
            if info.name == victim and data is not None:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            dst.addfile(info, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ImageError, match=real_image.layers[0].digest):
        validate_archive(tampered)


def test_sink_filesystem_errors_are_image_errors(real_image: Image, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ImageError, match="cannot write"):
        write_docker_archive(real_image, blocker / "image.tar", repo_tags=["app:1"])
    with pytest.raises(ImageError, match="cannot write"):
        write_oci_layout(real_image, blocker / "layout", ref_name="1")


def finished_for(image: Image | ImageIndex, store: BlobStore, work: Path, *tags: str) -> Finished:
    """A ``Finished`` around ``image``, as the pipeline hands it to every sink."""
    base = python_base(store)
    return Finished(
        image=image,
        tags=tuple(ImageReference.parse(t) for t in tags),
        work=work,
        base=base,
        base_pulled=ImageReference.parse(base.reference),
        base_upstream="python:3.11-slim",
        layers=(),
        config=APP_CONFIG,
        title="app 1.0",
    )


def test_plain_layers_inflate_a_gzip_layer_once_for_every_reader(
    store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build's three readers of a base layer share one decompression; a plain blob and a
    damaged one are handed over as stored (the reader then names the damage)."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        info = tarfile.TarInfo("usr/lib/libx.so.1")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    gz = store.put_bytes(gzip.compress(tar_bytes.getvalue(), mtime=0)).digest
    plain_blob = store.put_bytes(tar_bytes.getvalue()).digest
    damaged = store.put_bytes(gzip.compress(tar_bytes.getvalue(), mtime=0)[:40]).digest
    opened: list[object] = []
    real_open = store_module.igzip.open

    def counting_open(*args: object, **kwargs: object) -> object:
        opened.append(args[0])
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module.igzip, "open", counting_open)
    layers = PlainLayers(store, tmp_path / "plain")
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda _: layers.path(gz), range(8)))
    assert len(set(paths)) == 1 and paths[0] != store.path(gz)
    assert paths[0].read_bytes() == tar_bytes.getvalue()
    assert opened == [store.path(gz)]
    assert layers.path(plain_blob) == store.path(plain_blob)
    assert layers.path(damaged) == store.path(damaged)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [paths[0].name]
    # Small layers are inflated in memory when there is a place for them; big ones on disk.
    layers = PlainLayers(store, tmp_path / "disk", memory=tmp_path / "memory")
    assert layers.path(gz).parent == tmp_path / "memory"
    monkeypatch.setattr(store_module, "MEMORY_LAYER", 10)
    layers = PlainLayers(store, tmp_path / "disk", memory=tmp_path / "memory2")
    assert layers.path(gz).parent == tmp_path / "disk"
    assert layers.path(gz).read_bytes() == tar_bytes.getvalue()


def test_layout_blobs_are_linked_to_the_store_on_its_file_system_and_copied_elsewhere(
    real_image: Image, tmp_path: Path
) -> None:
    """A code change's layout of hundreds of MB costs no copy when it can share the store's
    blobs; across file systems (tmpfs here) it is copied, and valid either way."""
    near = tmp_path / "layout"
    write_oci_layout(real_image, near, ref_name="1.0")
    validate_layout(near)
    for layer in real_image.layers:
        blob = near / "blobs/sha256" / digest_hex(layer.digest)
        assert blob.stat().st_ino == real_image.store.path(layer.digest).stat().st_ino
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.fail("this test needs /dev/shm on a file system of its own (a tmpfs)")
    with tempfile.TemporaryDirectory(dir=shm) as far_root:
        far = Path(far_root) / "layout"
        write_oci_layout(real_image, far, ref_name="1.0")
        validate_layout(far)
        for layer in real_image.layers:
            blob = far / "blobs/sha256" / digest_hex(layer.digest)
            assert blob.read_bytes() == real_image.store.read_bytes(layer.digest)
            assert blob.stat().st_dev != real_image.store.path(layer.digest).stat().st_dev


def test_layout_sinks_write_the_first_tag(
    real_image: Image, store: BlobStore, tmp_path: Path
) -> None:
    finished = finished_for(real_image, store, tmp_path, "ghcr.io/acme/app:1.0", "app:latest")
    layout = OciLayoutSink(path=tmp_path / "layout")
    archive = OciArchiveSink(path=tmp_path / "image.tar")
    assert (layout.kind, layout.takes_index) == ("oci", True)
    assert (archive.kind, archive.takes_index) == ("oci-archive", True)
    assert layout.write(finished, NullReporter()) == (f"wrote OCI layout {layout.path}",)
    assert archive.write(finished, NullReporter()) == (f"wrote OCI archive {archive.path}",)
    validate_layout(layout.path)
    validate_archive(archive.path)
    index = json.loads((layout.path / "index.json").read_text())
    assert index["manifests"][0]["digest"] == real_image.digest
    assert index["manifests"][0]["annotations"] == {ANNOTATION_REF_NAME: "1.0"}


def test_layout_sink_takes_an_index(store: BlobStore, tmp_path: Path) -> None:
    images = [
        build_image(
            None,
            [fake_layer(store, arch.encode(), f"imgbuild: {arch}")],
            config=APP_CONFIG,
            created=CREATED,
            store=store,
            platform=("linux", arch),
        )
        for arch in ("amd64", "arm64")
    ]
    index = build_index(images, store)
    finished = finished_for(index, store, tmp_path, "app:2")
    sink = OciLayoutSink(path=tmp_path / "multi")
    assert sink.write(finished, NullReporter()) == (f"wrote OCI layout {sink.path}",)
    written = json.loads((sink.path / "index.json").read_text())
    assert written["manifests"][0]["digest"] == index.digest
    assert written["manifests"][0]["mediaType"] == OCI_INDEX
    assert written["manifests"][0]["annotations"] == {ANNOTATION_REF_NAME: "2"}
