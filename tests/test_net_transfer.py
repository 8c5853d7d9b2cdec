"""net.transfer and the pieces under it: budgets, deadlines, redaction, atomic streams."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imagebuild.cache import default_cache_root
from imagebuild.digest import Hasher, digest_bytes
from imagebuild.net.http import (
    DEFAULT_TIMEOUTS,
    NO_RETRY,
    Deadline,
    RetryPolicy,
    Timeouts,
    TransferDeadlineExceeded,
    attempts,
    client_policy,
    retrying_client,
)
from imagebuild.net.transfer import (
    failure_text,
    fetch_retrying,
    redact,
    redact_text,
    write_stream,
)


def test_budget_scales_only_with_a_size_it_is_given_and_is_capped() -> None:
    timeouts = Timeouts(deadline=300.0, min_rate=1000.0, max_deadline=3600.0)
    assert timeouts.budget() == 300.0
    assert timeouts.budget(0) == 300.0
    assert timeouts.budget(100_000) == 400.0
    assert timeouts.budget(10**12) == 3600.0
    assert DEFAULT_TIMEOUTS.read == 30.0 and DEFAULT_TIMEOUTS.connect == 15.0


def test_a_deadline_on_a_fake_clock() -> None:
    now = [100.0]
    deadline = Deadline(5.0, clock=lambda: now[0])
    assert deadline.allows(4.0) and not deadline.allows(5.0)
    request = httpx.Request("GET", "http://127.0.0.1:9/", extensions={"timeout": {"read": 30.0}})
    now[0] = 103.0
    deadline.clip(request)
    assert request.extensions["timeout"]["read"] == pytest.approx(2.0)
    assert request.extensions["timeout"]["connect"] == pytest.approx(2.0)
    now[0] = 105.5
    with pytest.raises(TransferDeadlineExceeded, match="within 5 s"):
        deadline.check(request)


def test_redaction() -> None:
    assert redact("https://u:p@host/x") == "https://***@host/x"
    assert redact("https://host/x") == "https://host/x"
    text = "Client error '401' for url 'https://me:hunter2@pkgs.example/simple/a/' (see https://x/)"
    assert redact_text(text) == (
        "Client error '401' for url 'https://***@pkgs.example/simple/a/' (see https://x/)"
    )
    assert "token" not in redact_text("git+https://token@github.example/r.git")


def test_failure_text_names_the_limit() -> None:
    request = httpx.Request(
        "GET", "http://127.0.0.1:9/", extensions={"timeout": {"read": 2.5, "connect": 4.0}}
    )
    assert failure_text(httpx.ReadTimeout("timed out", request=request)) == (
        "the server sent nothing for 2.5 s (read timeout)"
    )
    assert failure_text(httpx.ConnectTimeout("timed out", request=request)) == (
        "no connection within 4 s (connect timeout)"
    )
    assert failure_text(httpx.ReadError("boom")) == "boom"


def test_hasher_matches_digest_bytes() -> None:
    hasher = Hasher()
    for piece in (b"ab", b"", b"cdef"):
        hasher.update(piece)
    assert hasher.digest() == digest_bytes(b"abcdef")
    assert hasher.size == 6


def _broken(request: httpx.Request) -> httpx.Response:
    def body() -> Iterator[bytes]:
        yield b"half"
        raise httpx.RemoteProtocolError("peer closed connection", request=request)

    return httpx.Response(200, stream=_Stream(body()))


class _Stream(httpx.SyncByteStream):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks


def test_write_stream_leaves_no_file_when_the_body_breaks(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    with httpx.Client(transport=httpx.MockTransport(_broken)) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            fetch_retrying(http, "http://127.0.0.1:9/f", lambda r: write_stream(r, dest))
    assert list(tmp_path.iterdir()) == []


def test_a_plain_client_retries_nothing() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return _broken(request)

    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        assert client_policy(http) == (NO_RETRY, DEFAULT_TIMEOUTS)
        with pytest.raises(httpx.RemoteProtocolError) as caught:
            fetch_retrying(http, "http://127.0.0.1:9/f", lambda r: r.read())
    assert len(calls) == 1 and attempts(caught.value) == 1


def test_broken_bodies_share_the_attempt_bound_with_status_retries() -> None:
    answers = ["503", "broken", "ok"]
    waits: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0)
        if answer == "503":
            return httpx.Response(503)
        if answer == "broken":
            return _broken(request)
        return httpx.Response(200, content=b"whole")

    policy = RetryPolicy(attempts=3, backoff=0.5, sleep=waits.append)
    with retrying_client(httpx.MockTransport(handler), retry=policy) as http:
        data = fetch_retrying(http, "http://127.0.0.1:9/f", lambda r: r.read())
    assert data == b"whole"
    assert waits == [0.5, 1.0]  # backoff continues from the attempt number, not from 1

    answers[:] = ["503", "broken", "broken", "ok"]
    with (
        retrying_client(httpx.MockTransport(handler), retry=policy) as http,
        pytest.raises(httpx.RemoteProtocolError) as caught,
    ):
        fetch_retrying(http, "http://127.0.0.1:9/f", lambda r: r.read())
    assert attempts(caught.value) == 3
    assert answers == ["ok"]


def test_default_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert default_cache_root().name == "imgbuild"
    monkeypatch.setenv("IMGBUILD_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_root() == tmp_path / "c"
    monkeypatch.setenv("IMGBUILD_CACHE_DIR", "")
    assert default_cache_root().name == "imgbuild"


def test_write_stream_hashes_the_file(tmp_path: Path) -> None:
    dest = tmp_path / "f"
    with httpx.Client(
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=b"xy"))
    ) as c:
        with c.stream("GET", "http://127.0.0.1:9/") as response:
            assert write_stream(response, dest) == hashlib.sha256(b"xy").hexdigest()
    assert dest.read_bytes() == b"xy"
