"""Hostile wheels are refused in one line before anything of them is written; RECORD is checked."""

from __future__ import annotations

import stat
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest

from imagebuild.errors import LayerError
from imagebuild.install.layers import VenvLayout, install_wheel
from imagebuild.install.wheelcheck import check_members
from tests.fixtures.index_server import make_wheel

VENV = VenvLayout(base_interpreter=PurePosixPath("/usr/bin/python3.11"), python_version=(3, 11))
DIST_INFO = "evil-1.0.dist-info"

Member = tuple[zipfile.ZipInfo, bytes]


def _rewrite(wheel: Path, change: Callable[[list[Member]], list[Member]]) -> Path:
    """The same wheel with its members changed by ``change`` (RECORD left as it was)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    out = wheel.parent / "hostile" / wheel.name
    out.parent.mkdir()
    with zipfile.ZipFile(out, "w") as zf:
        for info, data in change(members):
            zf.writestr(info, data)
    return out


def _added(
    name: str, data: bytes = b"x = 1\n", mode: int = 0o100644
) -> Callable[..., list[Member]]:
    def change(members: list[Member]) -> list[Member]:
        info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = mode << 16
        return [*members, (info, data)]

    return change


def _tampered(members: list[Member]) -> list[Member]:
    return [(i, b"print('owned')\n" if i.filename == "evil/__init__.py" else d) for i, d in members]


def _record_line_dropped(members: list[Member]) -> list[Member]:
    out = []
    for info, data in members:
        if info.filename.endswith("/RECORD"):
            kept = [row for row in data.splitlines(True) if not row.startswith(b"evil/__init__")]
            data = b"".join(kept)
        out.append((info, data))
    return out


def _md5_record(members: list[Member]) -> list[Member]:
    return [
        (
            i,
            d.replace(b"evil/__init__.py,sha256=", b"evil/__init__.py,md5=")
            if i.filename.endswith("/RECORD")
            else d,
        )
        for i, d in members
    ]


HOSTILE: list[tuple[str, Callable[[list[Member]], list[Member]], str]] = [
    ("tab-and-newline", _added("evil/a\tb\n/tmp/x.py"), "has a control character"),
    ("escape", _added("../../etc/evil.py"), "climbs out of the wheel"),
    ("escape-nested", _added("evil/../../x.py"), "climbs out of the wheel"),
    ("absolute", _added("/etc/cron.d/evil"), "is an absolute path"),
    ("backslash", _added("evil\\..\\x.py"), "has a backslash"),
    ("symlink", _added("evil/link", b"/etc/shadow", stat.S_IFLNK | 0o777), "is a symbolic link"),
    ("device", _added("evil/dev", b"", stat.S_IFCHR | 0o600), "is not a regular file"),
    ("fifo", _added("evil/pipe", b"", stat.S_IFIFO | 0o600), "is not a regular file"),
    ("duplicate", _added("evil/__init__.py", b"print('second')\n"), "appears twice"),
    ("record-mismatch", _tampered, "does not match its RECORD line"),
    ("not-in-record", _record_line_dropped, "has no hash in RECORD"),
    ("weak-hash", _md5_record, "not sha256 or stronger"),
]


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    return make_wheel(tmp_path / "dist", "evil", "1.0", files={"evil/__init__.py": "x = 1\n"})


def test_a_sound_wheel_installs(wheel: Path, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    install_wheel(wheel, staging, VENV)
    assert (
        staging / "app/.venv/lib/python3.11/site-packages/evil/__init__.py"
    ).read_text() == "x = 1\n"


@pytest.mark.parametrize(("case", "change", "message"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_hostile_wheel_is_refused_in_one_line(
    case: str,
    change: Callable[[list[Member]], list[Member]],
    message: str,
    wheel: Path,
    tmp_path: Path,
) -> None:
    hostile = _rewrite(wheel, change)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(LayerError) as caught:
        install_wheel(hostile, staging, VENV)
    text = str(caught.value)
    assert text.startswith(f"wheel {hostile.name}: ") and message in text
    assert "\n" not in text.replace("\\n", "")
    if case not in ("record-mismatch", "not-in-record", "weak-hash"):
        # Names and kinds are refused before a single file is written.
        assert list(staging.rglob("*")) == []
    # Nothing outside the staging directory, whatever the names said.
    assert not (tmp_path / "etc").exists() and not Path("/tmp/x.py").exists()


def test_a_wheel_that_expands_past_the_limit_is_refused(tmp_path: Path) -> None:
    big = make_wheel(tmp_path, "big", "1.0", files={"big/data.bin": b"\0" * (1 << 20)})
    with zipfile.ZipFile(big) as zf, pytest.raises(LayerError) as caught:
        check_members(big, zf, max_unpacked=1 << 19)
    assert "unpacks to" in str(caught.value) and "more than the 524288" in str(caught.value)


def test_a_file_that_is_not_a_zip_is_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "fake-1.0-py3-none-any.whl"
    fake.write_bytes(b"not a zip")
    with pytest.raises(LayerError) as caught:
        install_wheel(fake, tmp_path / "staging", VENV)
    assert str(caught.value).startswith("wheel fake-1.0-py3-none-any.whl: cannot install")


def test_a_data_script_is_checked_though_its_shebang_is_reread(tmp_path: Path) -> None:
    # installer reads a script's first line, seeks back and reads it again to put the venv's
    # interpreter in its shebang (real wheels: jsonpointer, many command-line tools).
    script = "#!python\nprint('hello')\n"
    wheel = make_wheel(
        tmp_path / "dist", "tool", "1.0", files={"tool-1.0.data/scripts/tool": script}
    )
    staging = tmp_path / "staging"
    install_wheel(wheel, staging, VENV)
    installed = (staging / "app/.venv/bin/tool").read_text()
    assert installed == "#!/app/.venv/bin/python\nprint('hello')\n"

    def tamper(members: list[Member]) -> list[Member]:
        return [(i, b"#!python\nprint('owned')\n" if i.filename.endswith("/tool") else d)
                for i, d in members]  # fmt: skip

    with pytest.raises(LayerError) as caught:
        install_wheel(_rewrite(wheel, tamper), tmp_path / "staging-2", VENV)
    assert "does not match its RECORD line" in str(caught.value)
