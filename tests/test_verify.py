"""``run_verify`` through fake ports (a fake base registry, no engine): an OCI layout built
from the project is identical to its rebuild; after a change, the first differing layer
and the changed file are named. Layer comparison on hand-made tars."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from imagebuild.digest import digest_bytes
from imagebuild.image.compare import ImageView, compare_images, config_differences
from imagebuild.image.descriptor import OCI_LAYER_TAR
from imagebuild.image.store import BlobStore
from imagebuild.pipeline.requests import BuildRequest
from imagebuild.pipeline.verify import VerifyResult, run_verify
from imagebuild.sinks.layout import OciLayoutSink
from tests.test_pipeline_build import World, world  # noqa: F401 (the fixture)


def _verify(w: World, source: str) -> VerifyResult:
    request = BuildRequest(project_dir=w.project, cache_dir=w.cache, compile_bytecode=False)
    return run_verify(source, request, ports=w.ports(), epoch_given=False)


def test_an_unchanged_project_is_identical_and_a_changed_file_is_named(
    world: World,  # noqa: F811
) -> None:
    world.lock()
    layout = world.root / "published"
    built = world.build(OciLayoutSink(path=layout), source_date_epoch=1700000000)

    same = _verify(world, f"oci:{layout}")
    assert same.identical and same.rebuilt == built.manifest_digest
    # The published creation time is used: no SOURCE_DATE_EPOCH needed to match.
    assert same.report_lines(f"oci:{layout}") == [
        f"identical: oci:{layout} is {built.manifest_digest}, and so is the rebuild"
    ]

    (world.project / "app.py").write_text("print('hello, changed')\n")
    changed = _verify(world, f"oci:{layout}")
    assert not changed.identical
    (diff,) = changed.differences
    assert diff.created_by == "imgbuild: project app 1.0"
    assert diff.position == diff.count  # the project's layer, on top
    site = "app/.venv/lib/python"
    assert [n for n in diff.changed if n.endswith("app.py")] and all(
        n.startswith(site) for n in diff.changed
    )
    assert any(n.endswith("/app-1.0.dist-info/RECORD") for n in diff.changed)
    lines = changed.report_lines("x")
    assert lines[0].startswith("differs: x is ")
    assert "first differing layer" in lines[1] and "(imgbuild: project app 1.0)" in lines[1]
    assert any(line.startswith("  changed: ") and line.endswith("/app.py") for line in lines)


def _tar(files: dict[str, bytes], mode: int = 0o644) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def test_layers_compare_by_member_and_configs_by_key(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    same = store.put_bytes(_tar({"a": b"1"}), media_type=OCI_LAYER_TAR)
    theirs = store.put_bytes(_tar({"x": b"1", "y": b"2", "gone": b""}), media_type=OCI_LAYER_TAR)
    ours = store.put_bytes(_tar({"x": b"1", "y": b"3", "new": b""}), media_type=OCI_LAYER_TAR)
    mode = store.put_bytes(
        _tar({"x": b"1", "y": b"2", "gone": b""}, 0o755), media_type=OCI_LAYER_TAR
    )
    history = {"history": [{"created_by": "base"}, {"created_by": "top"}]}

    def view(*layers, digest: bytes, config=history):  # type: ignore[no-untyped-def]
        return ImageView(
            platform="linux/amd64", digest=digest_bytes(digest), layers=layers,
            config=config, store=store,
        )  # fmt: skip

    diff = compare_images(view(same, theirs, digest=b"1"), view(same, ours, digest=b"2"))
    assert diff is not None and (diff.position, diff.created_by) == (2, "top")
    assert (diff.changed, diff.only_published, diff.only_rebuilt) == (("y",), ("gone",), ("new",))
    by_mode = compare_images(view(same, theirs, digest=b"1"), view(same, mode, digest=b"3"))
    assert by_mode is not None and by_mode.changed == ("gone", "x", "y")
    assert compare_images(view(same, digest=b"1"), view(same, digest=b"1")) is None
    other = {**history, "config": {"Env": ["A=1"], "User": "1"}}
    only_config = compare_images(
        view(same, digest=b"1", config={**history, "config": {"Env": ["A=2"], "User": "1"}}),
        view(same, digest=b"2", config=other),
    )
    assert only_config is not None and only_config.config_keys == ("config.Env",)
    assert config_differences({"a": 1}, {"b": 1}) == ("a", "b")
