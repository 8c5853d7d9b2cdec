"""A link check's records kept in the registry cache as one bundle, taken back in one request."""

from __future__ import annotations

import json
from pathlib import Path

from imagebuild.cache import CacheLayout
from imagebuild.debian import linkcheck
from imagebuild.digest import Digest
from imagebuild.image.descriptor import Descriptor
from imagebuild.image.model import BaseImage
from imagebuild.install.plan import PlannedWheel
from imagebuild.pipeline.links import (
    LinkRecords,
    _bundle_key,
    _keep_bundle,
    _keep_records,
    gather_link_records,
)


class Records:
    """The registry cache's records (a fake of the ``RemoteLayers`` port): asks counted."""

    def __init__(self, *, keeps: bool = True) -> None:
        self.kept: dict[str, bytes] = {}
        self.asked: list[str] = []
        self.keeps = keeps

    def find_record(self, key: str) -> bytes | None:
        self.asked.append(key)
        return self.kept.get(key)

    def keep_record(self, key: str, data: bytes) -> None:
        self.kept[key] = data


def _digest(n: int) -> Digest:
    return Digest("sha256:" + f"{n:02x}" * 32)


_BASE = BaseImage(
    reference="base",
    manifest_digest=_digest(90),
    config={},
    layers=(
        Descriptor(media_type="application/vnd.oci.image.layer.v1.tar", digest=_digest(91), size=1),
    ),
    diff_ids=(_digest(91),),
)
_WHEELS = [
    PlannedWheel(name=f"w{n}", version="1", path=Path(f"/w{n}.whl"), sha256=_digest(n))
    for n in range(1, 4)
]


def _record(text: str) -> bytes:
    return json.dumps({"format": linkcheck._FORMAT, "what": text}).encode()


def _seeded(tmp_path: Path) -> tuple[Records, list[Path], CacheLayout]:
    """A runner that worked the records out and kept them, and its records."""
    seeder = CacheLayout(tmp_path / "seeder")
    seeder.elf.mkdir(parents=True)
    records = [linkcheck.base_record(seeder.elf, [d.digest for d in _BASE.layers])]
    records += [linkcheck.scan_record(seeder.elf, w.sha256) for w in _WHEELS if w.sha256]
    for record in records:
        record.write_bytes(_record(record.name))
    remote = Records()
    _keep_bundle(records, remote)
    return remote, records, seeder


def test_a_runner_takes_all_of_a_checks_records_in_one_request(tmp_path: Path) -> None:
    remote, records, _ = _seeded(tmp_path)
    runner = CacheLayout(tmp_path / "runner")
    gathered = gather_link_records(_WHEELS, _BASE, cache=runner, remote=remote)  # type: ignore[arg-type]
    assert remote.asked == [_bundle_key(records)]
    assert gathered.bundled and not gathered.made
    assert gathered.fetched == frozenset(gathered.records)
    for mine, theirs in zip(gathered.records, records, strict=True):
        assert mine.read_bytes() == theirs.read_bytes()


def test_records_a_bundle_lacks_are_asked_for_one_by_one(tmp_path: Path) -> None:
    remote, records, _ = _seeded(tmp_path)
    key = _bundle_key(records)
    bundle = json.loads(remote.kept[key])
    del bundle["records"][records[2].name]
    bundle["records"][records[1].name] = "not a record"
    remote.kept[key] = json.dumps(bundle).encode()
    runner = CacheLayout(tmp_path / "runner")
    gathered = gather_link_records(_WHEELS, _BASE, cache=runner, remote=remote)  # type: ignore[arg-type]
    # The bundle, then the two it did not answer, alone (kept by nobody: worked out later).
    assert remote.asked[0] == key and len(remote.asked) == 3
    assert gathered.records[0] in gathered.fetched and gathered.records[3] in gathered.fetched
    assert gathered.made == {gathered.records[1], gathered.records[2]}

    # A damaged bundle is no error: every record is asked for alone.
    remote.kept[key] = b"{not json"
    remote.asked.clear()
    again = gather_link_records(_WHEELS, _BASE, cache=CacheLayout(tmp_path / "r2"), remote=remote)  # type: ignore[arg-type]
    assert len(remote.asked) == 1 + len(records) and not again.bundled


def test_no_bundle_is_kept_for_one_record_or_an_unusable_one(tmp_path: Path) -> None:
    _, records, _ = _seeded(tmp_path)
    remote = Records()
    _keep_bundle(records[:1], remote)
    assert remote.kept == {}
    records[1].write_bytes(b"half a rec")
    _keep_bundle(records, remote)
    assert remote.kept == {}


def test_a_check_s_records_are_kept_only_where_a_cache_keeps(tmp_path: Path) -> None:
    _, records, _ = _seeded(tmp_path)  # worked out on this runner, on disk
    gathered = LinkRecords(records=tuple(records), made=frozenset(records), fetched=frozenset())
    reader = Records(keeps=False)  # --cache-from alone
    _keep_records(gathered, reader)  # type: ignore[arg-type]
    assert reader.kept == {}
    keeper = Records()
    _keep_records(gathered, keeper)  # type: ignore[arg-type]
    assert len(keeper.kept) == len(records) + 1  # each alone, and the bundle
    assert keeper.kept[_bundle_key(records)]
