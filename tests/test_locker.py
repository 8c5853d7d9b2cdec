"""imgbuild's pylock: staleness by recorded inputs (data cases) and other input changes."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from imagebuild.lock.model import LockInputs, RecordedLock
from imagebuild.lock.staleness import staleness
from imagebuild.lock.inputs import environment_marker
from imagebuild.target.platform import TargetPlatform

CASES = tomllib.loads((Path(__file__).parent / "cases" / "locker" / "staleness.toml").read_text())[
    "case"
]

AMD64 = TargetPlatform(python_version=(3, 11), libc_version=(2, 36), arch="x86_64")
ARM64 = TargetPlatform(python_version=(3, 11), libc_version=(2, 36), arch="aarch64")


def _inputs(reqs: list[str], **changes: Any) -> LockInputs:
    values: dict[str, Any] = {
        "requires_python": ">=3.11",
        "requirements": (("", tuple(sorted(reqs))),),
        "indexes": ("https://pypi.org/simple/",),
        "prereleases": False,
        "targets": (AMD64, ARM64),
    }
    values.update(changes)
    return LockInputs(**values)


def _recorded(reqs: list[str], pins: dict[str, str]) -> RecordedLock:
    return RecordedLock(
        inputs=_inputs(reqs),
        pins={canonicalize_name(k): (Version(v),) for k, v in pins.items()},
    )


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_requirement_edits(case: dict[str, Any]) -> None:
    reason = staleness(_recorded(case["old"], case["pins"]), _inputs(case["new"]))
    if case["expect"] == "fresh":
        assert reason is None
    else:
        assert reason is not None and case["expect"] in reason


def test_other_inputs() -> None:
    recorded = _recorded(["attrs"], {"attrs": "23.1.0"})
    assert staleness(recorded, _inputs(["attrs"], requires_python=">=3.12")) == (
        "requires-python changed from >=3.11 to >=3.12"
    )
    assert "indexes changed" in (
        staleness(recorded, _inputs(["attrs"], indexes=("http://127.0.0.1:1/simple/",))) or ""
    )
    py313 = TargetPlatform(python_version=(3, 13), libc_version=(2, 41), arch="x86_64")
    assert staleness(recorded, _inputs(["attrs"], targets=(py313,))) == (
        f"target {py313.describe()} is not covered"
    )
    # Covering fewer targets than locked is fine: the lock still has what is needed.
    assert staleness(recorded, _inputs(["attrs"], targets=(AMD64,))) is None
    group = _inputs(["attrs"], requirements=(("", ("attrs",)), ("group:dev", ("pytest",))))
    assert staleness(recorded, group) == "dependency group 'dev' was added"


def test_environment_marker_holds_only_on_its_target() -> None:
    from packaging.markers import Marker

    marker = Marker(environment_marker(AMD64))
    assert marker.evaluate(AMD64.marker_environment())
    assert not marker.evaluate(ARM64.marker_environment())


def test_index_credentials_are_not_recorded_and_do_not_make_stale() -> None:
    from imagebuild.net.transfer import strip_credentials

    assert (
        strip_credentials("https://user:tok@pkgs.example/simple/") == "https://pkgs.example/simple/"
    )
    recorded = RecordedLock(
        inputs=_inputs(["attrs"], indexes=("https://pkgs.example/simple/",)),
        pins={canonicalize_name("attrs"): (Version("23.1.0"),)},
    )
    current = _inputs(["attrs"], indexes=("https://user:tok@pkgs.example/simple/",))
    assert staleness(recorded, current) is None
