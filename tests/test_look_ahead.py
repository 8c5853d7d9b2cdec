"""Looking ahead in the registry layer cache: a runner with an empty local cache asks for the
layers below the project while its compiler is still being readied, under the keys that
compiler will give them, and the lookup after it takes those answers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import httpx
import pytest

from imagebuild.image.model import Layer
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.image.tarball import build_layer
from imagebuild.install.layers import Sources, VenvLayout
from imagebuild.install.plan import LayerPlan, LayerSpec, PlannedWheel
from imagebuild.pipeline import layers
from imagebuild.pipeline.compiler import expected_identity
from imagebuild.pipeline.layers import LayerJob, look_ahead
from imagebuild.pipeline.remotecache import RegistryLayerCache, _set_key
from imagebuild.report import NullReporter, Reporter
from imagebuild.sinks.daemon import engine_base_tag
from imagebuild.sinks.engine import EngineCompiler
from imagebuild.sinks.remote import RegistryClient
from tests.fixtures.registry_server import LocalRegistry

if TYPE_CHECKING:
    from imagebuild.image.model import BaseImage
    from imagebuild.sinks.daemon import DockerDaemon
    from imagebuild.target.base import BaseFacts

EPOCH = 1_700_000_000
VENV = VenvLayout(base_interpreter=PurePosixPath("/usr/bin/python3.11"), python_version=(3, 11))
EXPECTED = "image:imgbuild-base:0123456789abcdef:/usr/bin/python3.11"


@dataclass
class _Remote:
    """The registry cache port, recording what it is asked (it holds nothing)."""

    asked: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    keeps: bool = False

    def ask(self, keys: Sequence[str]) -> None:
        self.asked.extend(keys)

    def find(self, key: str) -> Layer | None:
        self.found.append(key)
        return None

    def keep(self, kept: Sequence[tuple[str, Layer]], reporter: Reporter) -> None:
        pass

    def keep_set(self, layers: Sequence[tuple[str, Layer]]) -> None:
        pass

    def find_record(self, key: str) -> bytes | None:
        return None

    def keep_record(self, key: str, data: bytes) -> None:
        pass

    def find_file(self, key: str, media_type: str) -> Path | None:
        return None

    def keep_file(self, key: str, media_type: str, make: Callable[[Path], None]) -> None:
        pass


@dataclass(frozen=True)
class _Compiler:
    """A compiler by its name only: the lookup reads nothing else of it."""

    identity: str

    def compile(self, root: Path, groups: Sequence[Sources]) -> int:
        raise AssertionError("a lookup compiles nothing")


def _wheel(name: str) -> PlannedWheel:
    digest = f"sha256:{name.encode().hex():0<64}"[:71]
    return PlannedWheel(
        name=name,
        version="1.0",
        path=Path(f"/nowhere/{name}.whl"),
        sha256=digest,  # type: ignore[arg-type]
    )


PLAN = LayerPlan(
    layers=(
        LayerSpec(kind="venv", wheels=(), files=((PurePosixPath("/app/.venv/x"), b"x"),)),
        LayerSpec(kind="dependency", wheels=(_wheel("numpy"),)),
        LayerSpec(kind="dependencies", wheels=(_wheel("idna"), _wheel("six"))),
    )
)


def _job(tmp_path: Path, remote: _Remote) -> LayerJob:
    return LayerJob(
        store=BlobStore(tmp_path / "blobs"),
        records=tmp_path / "records",
        work=tmp_path / "work",
        mtime=EPOCH,
        reporter=NullReporter(),
        remote=remote,
    )


def test_the_keys_asked_ahead_are_those_the_lookup_then_uses(tmp_path: Path) -> None:
    remote = _Remote()
    job = _job(tmp_path, remote)
    look_ahead(PLAN, VENV, EXPECTED, job)
    assert len(remote.asked) == 3 and len(set(remote.asked)) == 3
    layers._lookup(PLAN, VENV, _Compiler(EXPECTED), job)
    assert remote.found == remote.asked


def test_another_compiler_than_expected_looks_up_other_keys(tmp_path: Path) -> None:
    remote = _Remote()
    job = _job(tmp_path, remote)
    look_ahead(PLAN, VENV, EXPECTED, job)
    layers._lookup(PLAN, VENV, _Compiler("host:3.11.7"), job)
    # Only the layer without bytecode (the venv's own files) has the same key either way.
    assert set(remote.found) & set(remote.asked) == {remote.asked[0]}
    assert len(remote.found) == 3


def test_layers_the_local_cache_holds_are_not_asked_for(tmp_path: Path) -> None:
    remote = _Remote()
    job = _job(tmp_path, remote)
    look_ahead(PLAN, VENV, EXPECTED, job)
    held = remote.asked[1]
    job.records.mkdir(parents=True)
    (job.records / f"{held}.json").write_text("{}")
    again = _Remote()
    look_ahead(PLAN, VENV, EXPECTED, _job(tmp_path, again))
    assert again.asked == [key for key in remote.asked if key != held]


@pytest.fixture
def requests() -> Iterator[tuple[httpx.Client, list[str]]]:
    """An HTTP client, and the paths of the requests it sends."""
    sent: list[str] = []
    hooks = {"request": [lambda request: sent.append(request.url.path)]}
    with httpx.Client(trust_env=False, timeout=10.0, event_hooks=hooks) as http:
        yield http, sent


def test_a_layer_asked_for_ahead_is_looked_up_once(
    local_registry: LocalRegistry, requests: tuple[httpx.Client, list[str]], tmp_path: Path
) -> None:
    http, sent = requests
    ref = ImageReference.parse(f"{local_registry.host}/test/look-ahead")
    tree = tmp_path / "tree"
    (tree / "app").mkdir(parents=True)
    (tree / "app" / "data.txt").write_text("kept\n")
    store = BlobStore(tmp_path / "kept")
    layer = build_layer(tree, store, mtime=EPOCH)
    key, absent = "ab" * 32, "cd" * 32
    client = RegistryClient(http)
    RegistryLayerCache(client=client, store=store, source=None, target=ref).keep(
        [(key, layer)], NullReporter()
    )

    # A runner with an empty store asks ahead, then finds: the set of both (none is kept),
    # then one manifest request per key.
    runner = RegistryLayerCache(
        client=client, store=BlobStore(tmp_path / "runner"), source=ref, target=None
    )
    sent.clear()
    runner.ask([key, absent])
    found = runner.find(key)
    assert found is not None and found.digest == layer.digest
    assert runner.find(absent) is None
    manifests = sorted(path for path in sent if "/manifests/" in path)
    both = f"/v2/test/look-ahead/manifests/set-{_set_key([key, absent])}"
    assert manifests == sorted([both, *(f"/v2/test/look-ahead/manifests/{k}" for k in (key, absent))])
    assert runner.store.path(layer.digest).read_bytes() == store.path(layer.digest).read_bytes()
    # An answer is taken once: a later find asks the registry again.
    assert runner.find(key) is not None
    assert len([path for path in sent if path.endswith(f"/manifests/{key}")]) == 2


def test_a_plan_kept_as_a_set_is_found_in_one_manifest_request(
    local_registry: LocalRegistry, requests: tuple[httpx.Client, list[str]], tmp_path: Path
) -> None:
    http, sent = requests
    ref = ImageReference.parse(f"{local_registry.host}/test/look-ahead-set")
    store = BlobStore(tmp_path / "kept")
    layers = []
    for name in ("one", "two"):
        tree = tmp_path / name
        (tree / "app").mkdir(parents=True)
        (tree / "app" / f"{name}.txt").write_text(f"{name}\n")
        layers.append((name[0] * 64, build_layer(tree, store, mtime=EPOCH)))
    client = RegistryClient(http)
    keeper = RegistryLayerCache(client=client, store=store, source=None, target=ref)
    keeper.keep(layers, NullReporter())
    keeper.keep_set(layers)
    sent.clear()
    keeper.keep_set(layers)  # kept already: asked, not pushed again
    assert [path for path in sent if "/manifests/" in path] == [
        f"/v2/test/look-ahead-set/manifests/set-{_set_key([k for k, _ in layers])}"
    ]

    runner = RegistryLayerCache(
        client=client, store=BlobStore(tmp_path / "runner"), source=ref, target=None
    )
    sent.clear()
    runner.ask([k for k, _ in layers])
    for key, layer in layers:
        assert runner.find(key) == layer
        assert runner.store.path(layer.digest).read_bytes() == store.path(layer.digest).read_bytes()
    manifests = [path for path in sent if "/manifests/" in path]
    assert manifests == [f"/v2/test/look-ahead-set/manifests/set-{_set_key([k for k, _ in layers])}"]
    # Another set of keys (one of them unknown) is not that set: each is asked alone.
    sent.clear()
    runner.ask([layers[0][0], "ee" * 32])
    assert runner.find(layers[0][0]) == layers[0][1] and runner.find("ee" * 32) is None
    assert len([path for path in sent if "/manifests/" in path]) == 3


def test_the_expected_identity_is_the_one_the_base_s_own_python_compiles_under() -> None:
    base = cast("BaseImage", SimpleNamespace(manifest_digest="sha256:" + "ef" * 32))
    facts = cast("BaseFacts", SimpleNamespace(interpreter=PurePosixPath("/usr/bin/python3.11")))
    engine = EngineCompiler(
        cast("DockerDaemon", None), engine_base_tag(base.manifest_digest), facts.interpreter
    )
    assert expected_identity(base, facts, "auto") == engine.identity
    assert expected_identity(base, facts, "image") == engine.identity
    assert expected_identity(base, facts, "host") is None
