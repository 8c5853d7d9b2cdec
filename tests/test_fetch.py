from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from installer.sources import WheelFile as InstallerWheel
from packaging.utils import canonicalize_name
from packaging.version import Version

from imagebuild.cache import CacheLayout
from imagebuild.errors import FetchError
from imagebuild.install.fetch import WheelCache, fetch_wheels
from imagebuild.install.plan import PlannedWheel
from imagebuild.lock.model import Digest, LockedPackage, PackageSource, WheelFile
from imagebuild.net.http import RetryPolicy, retrying_client
from imagebuild.pipeline.wheels import LazyWheels
from tests.fixtures.index_server import LocalIndex, make_wheel

NO_WAIT = RetryPolicy(backoff=0.0, max_wait=0.0)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def served(index: LocalIndex, name: str, version: str = "1.0", **kwargs: object) -> WheelFile:
    entry = index.add_wheel(
        name, version, files={f"{name}/__init__.py": f"V = {version!r}\n"}, **kwargs
    )
    return WheelFile(
        filename=entry.filename,
        url=index.file_url(entry.filename),
        sha256=Digest(f"sha256:{entry.sha256}"),
        size=entry.size,
    )


def local(path: Path, *, url: str | None = None) -> WheelFile:
    data = path.read_bytes()
    return WheelFile(
        filename=path.name,
        url=url or path.as_uri(),
        sha256=Digest("sha256:" + hashlib.sha256(data).hexdigest()),
        size=len(data),
    )


class Steps:
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.progressed: list[tuple[str, int, int | None, str]] = []

    def progress(self, task: str, done: int, total: int | None, unit: str = "") -> None:
        self.progressed.append((task, done, total, unit))

    def step(self, message: str) -> None:
        self.messages.append(message)

    def warn(self, message: str) -> None:
        self.messages.append("warn: " + message)


def test_download_verify_and_cache_hit(
    fresh_index: LocalIndex, http: httpx.Client, tmp_path: Path
) -> None:
    wheel = served(fresh_index, "fa")
    cache = WheelCache(CacheLayout(tmp_path / "cache").wheels)
    steps = Steps()
    paths = fetch_wheels(http, [wheel], cache, reporter=steps)
    path = paths[wheel]
    hexdigest = wheel.sha256.removeprefix("sha256:")
    assert path == tmp_path / "cache/wheels/sha256" / hexdigest[:2] / hexdigest / wheel.filename
    assert path.read_bytes() == (fresh_index.files_dir / wheel.filename).read_bytes()
    assert [p.name for p in path.parent.iterdir()] == [wheel.filename]
    assert cache.path_for(wheel) == path
    assert steps.messages == ["fetching 1 wheel(s) (0 cached)", f"fetched {wheel.filename}"]
    downloads = fresh_index.count("/files/")
    assert downloads == 1

    # A second run is served from the cache: no request at all.
    before = len(fresh_index.requests)
    assert fetch_wheels(http, [wheel, wheel], cache) == {wheel: path}
    assert len(fresh_index.requests) == before


def test_sha256_mismatch_leaves_nothing(
    fresh_index: LocalIndex, http: httpx.Client, tmp_path: Path
) -> None:
    good = served(fresh_index, "fb")
    bad = WheelFile(filename=good.filename, url=good.url, sha256=Digest("sha256:" + "0" * 64))
    cache = WheelCache(tmp_path / "cache")
    with pytest.raises(FetchError) as info:
        fetch_wheels(http, [bad], cache)
    message = str(info.value)
    assert message.startswith(
        f"wheel {good.filename}: sha256 mismatch (lock: {'0' * 64}, "
        f"downloaded: {good.sha256.removeprefix('sha256:')})"
    )
    assert "re-lock" in message and "\n" not in message
    assert cache.path_for(bad) is None
    entry = cache.entry_dir(bad)
    assert list(entry.iterdir()) == []  # no partial or temporary file either


def test_size_mismatch(fresh_index: LocalIndex, http: httpx.Client, tmp_path: Path) -> None:
    good = served(fresh_index, "fc")
    assert good.size is not None
    bad = WheelFile(filename=good.filename, url=good.url, sha256=good.sha256, size=good.size + 1)
    with pytest.raises(
        FetchError, match=r"size mismatch \(lock: \d+ bytes, downloaded: \d+ bytes\)"
    ):
        fetch_wheels(http, [bad], WheelCache(tmp_path))


def test_interrupted_stream_leaves_nothing(tmp_path: Path) -> None:
    wheel = local(make_wheel(tmp_path / "w", "fd", "1.0"))
    cache = WheelCache(tmp_path / "cache")

    def broken() -> Iterator[bytes]:
        yield b"PK\x03\x04"
        raise OSError("connection reset")

    with pytest.raises(OSError):
        cache.store(wheel, broken())
    assert cache.path_for(wheel) is None
    assert list(cache.entry_dir(wheel).iterdir()) == []


def test_parallel_fetch(fresh_index: LocalIndex, http: httpx.Client, tmp_path: Path) -> None:
    wheels = [served(fresh_index, f"par{i}") for i in range(12)]
    paths = fetch_wheels(http, wheels, WheelCache(tmp_path), workers=4)
    assert set(paths) == set(wheels)
    for wheel, path in paths.items():
        assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == wheel.sha256
    assert fresh_index.count("/files/") == 12


def test_concurrent_fetchers_share_entries(
    fresh_index: LocalIndex, http: httpx.Client, tmp_path: Path
) -> None:
    """Two builds fetching the same wheels at once both end with the same verified files."""
    wheels = [served(fresh_index, f"con{i}") for i in range(6)]
    cache_root = tmp_path / "cache"
    results: list[dict[WheelFile, Path]] = []
    errors: list[Exception] = []

    def run() -> None:
        try:
            results.append(fetch_wheels(http, wheels, WheelCache(cache_root), workers=3))
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[0] == results[1] == results[2]
    for wheel, path in results[0].items():
        assert [p.name for p in path.parent.iterdir()] == [wheel.filename]


def test_http_errors(fresh_index: LocalIndex, http: httpx.Client, tmp_path: Path) -> None:
    missing = WheelFile(
        filename="gone-1.0-py3-none-any.whl",
        url=fresh_index.file_url("gone-1.0-py3-none-any.whl"),
        sha256=Digest("sha256:" + "1" * 64),
    )
    with pytest.raises(FetchError, match=r"wheel gone-1.0-py3-none-any.whl: GET .* answered 404"):
        fetch_wheels(http, [missing], WheelCache(tmp_path))


def test_server_errors_are_retried(tmp_path: Path) -> None:
    wheel_path = make_wheel(tmp_path / "w", "fe", "1.0")
    wheel = local(wheel_path, url="https://files.example/fe-1.0-py3-none-any.whl")
    calls: list[str] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        if len(calls) < 3:
            return httpx.Response(503)
        return httpx.Response(200, content=wheel_path.read_bytes())

    with retrying_client(httpx.MockTransport(flaky), retry=NO_WAIT) as client:
        path = fetch_wheels(client, [wheel], WheelCache(tmp_path / "c"))[wheel]
    assert len(calls) == 3
    assert path.read_bytes() == wheel_path.read_bytes()

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with (
        retrying_client(httpx.MockTransport(down), retry=NO_WAIT) as client,
        pytest.raises(FetchError, match="failed after 3 attempts: refused"),
    ):
        fetch_wheels(client, [wheel], WheelCache(tmp_path / "d"))


def test_file_urls_and_relative_paths(http: httpx.Client, tmp_path: Path) -> None:
    built = make_wheel(tmp_path / "project" / "wheels", "ff", "1.0")
    by_url = local(built)
    by_path = local(built, url="wheels/" + built.name)
    cache = WheelCache(tmp_path / "cache")
    paths = fetch_wheels(http, [by_url], cache)
    assert paths[by_url].read_bytes() == built.read_bytes()
    paths = fetch_wheels(
        http, [by_path], WheelCache(tmp_path / "c2"), base_dir=tmp_path / "project"
    )
    assert paths[by_path].read_bytes() == built.read_bytes()
    gone = WheelFile(
        filename="fg-1.0-py3-none-any.whl",
        url=(tmp_path / "fg-1.0-py3-none-any.whl").as_uri(),
        sha256=Digest("sha256:" + "2" * 64),
    )
    with pytest.raises(FetchError, match="local file .* does not exist"):
        fetch_wheels(http, [gone], cache)


def test_first_failure_is_reported(
    fresh_index: LocalIndex, http: httpx.Client, tmp_path: Path
) -> None:
    good = served(fresh_index, "fh")
    bad = WheelFile(filename=good.filename, url=good.url, sha256=Digest("sha256:" + "3" * 64))
    other = served(fresh_index, "fi")
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch_wheels(http, [other, bad], WheelCache(tmp_path), workers=1)


def test_unsafe_filename_rejected(tmp_path: Path) -> None:
    wheel = WheelFile(
        filename="../evil-1.0-py3-none-any.whl",
        url="https://x/evil-1.0-py3-none-any.whl",
        sha256=Digest("sha256:" + "4" * 64),
    )
    with pytest.raises(FetchError, match="not a plain file name"):
        WheelCache(tmp_path).path_for(wheel)


def test_default_cache_dir() -> None:
    from imagebuild.cache import default_cache_root

    assert default_cache_root().name == "imgbuild"


def test_httpx_honours_ssl_cert_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The proxy's CA comes from SSL_CERT_FILE; httpx clients must read it (trust_env)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing-ca.pem"))
    with pytest.raises(OSError):
        httpx.Client()


# -- the local index fixture itself ------------------------------------------------------


def test_index_negotiates_json_and_html(fresh_index: LocalIndex, http: httpx.Client) -> None:
    served(fresh_index, "Neg_Pkg")
    fresh_index.add_wheel("neg-pkg", "2.0", yanked="broken", requires_python=">=3.10")
    url = fresh_index.url + "neg-pkg/"
    accept = (
        "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, "
        "text/html;q=0.01"
    )
    page = http.get(url, headers={"Accept": accept})
    assert page.headers["content-type"] == "application/vnd.pypi.simple.v1+json"
    data = page.json()
    assert data["meta"]["api-version"] == "1.1"
    assert data["versions"] == ["1.0", "2.0"]
    first, second = data["files"]
    assert set(first) >= {"filename", "url", "hashes", "size", "upload-time", "core-metadata"}
    assert second["yanked"] == "broken"
    assert second["requires-python"] == ">=3.10"
    wheel = http.get(httpx.URL(url).join(first["url"]))
    assert hashlib.sha256(wheel.content).hexdigest() == first["hashes"]["sha256"]
    assert len(wheel.content) == first["size"]
    metadata = http.get(httpx.URL(url).join(first["url"] + ".metadata"))
    assert hashlib.sha256(metadata.content).hexdigest() == first["core-metadata"]["sha256"]
    assert b"Name: Neg_Pkg" in metadata.content

    html = http.get(url, headers={"Accept": "text/html"})
    assert html.headers["content-type"] == "text/html"
    assert 'data-yanked="broken"' in html.text
    assert 'data-requires-python="&gt;=3.10"' in html.text
    assert f"#sha256={first['hashes']['sha256']}" in html.text
    assert http.get(url, headers={"Accept": "application/xml"}).status_code == 406
    assert http.get(fresh_index.url + "Neg_Pkg/").status_code == 301
    assert http.get(fresh_index.url + "nothing/").status_code == 404
    root = http.get(fresh_index.url, headers={"Accept": accept}).json()
    assert root["projects"] == [{"name": "neg-pkg"}]


def test_make_wheel_is_valid(tmp_path: Path) -> None:
    path = make_wheel(
        tmp_path,
        "My.Pkg",
        "1.2",
        files={"my_pkg/__init__.py": "x = 1\n", "my_pkg/data.bin": b"\x00\x01"},
        requires=["dep>=1", "extra-dep; extra == 'fast'"],
        requires_python=">=3.9",
        tags="cp311-abi3-manylinux_2_17_x86_64",
        entry_points={"console_scripts": {"my-pkg": "my_pkg:main"}},
    )
    assert path.name == "my_pkg-1.2-cp311-abi3-manylinux_2_17_x86_64.whl"
    with InstallerWheel.open(path) as wheel:
        wheel.validate_record()
        assert wheel.dist_info_dir == "my_pkg-1.2.dist-info"
        metadata = wheel.read_dist_info("METADATA")
        assert "Provides-Extra: fast" in metadata
        assert "Requires-Python: >=3.9" in metadata
        assert "Root-Is-Purelib: false" in wheel.read_dist_info("WHEEL")
        assert "my-pkg = my_pkg:main" in wheel.read_dist_info("entry_points.txt")
    # Byte-identical when built again: uv.lock hashes made in tests stay stable.
    again = make_wheel(
        tmp_path / "again",
        "My.Pkg",
        "1.2",
        files={"my_pkg/__init__.py": "x = 1\n", "my_pkg/data.bin": b"\x00\x01"},
        requires=["dep>=1", "extra-dep; extra == 'fast'"],
        requires_python=">=3.9",
        tags="cp311-abi3-manylinux_2_17_x86_64",
        entry_points={"console_scripts": {"my-pkg": "my_pkg:main"}},
    )
    assert again.read_bytes() == path.read_bytes()


class _Held(Steps):
    """A reporter that holds the first fetch at its start until ``go`` (or fails it)."""

    def __init__(self, *, fail: bool = False) -> None:
        super().__init__()
        self.started, self.go, self.fail, self.first = (
            threading.Event(),
            threading.Event(),
            fail,
            True,
        )

    def step(self, message: str) -> None:
        super().step(message)
        if message.startswith("fetching ") and self.first:
            self.first = False
            self.started.set()
            assert self.go.wait(30)
            if self.fail:
                raise FetchError("the first fetch failed")


def _asking_at_once(
    index: LocalIndex, http: httpx.Client, tmp_path: Path, steps: _Held
) -> tuple[list[PlannedWheel], list[BaseException]]:
    """Two threads ensure the same two wheels; the second asks while the first fetches."""
    chosen = [(_package(name), served(index, name)) for name in ("fa", "fb")]
    lazy = LazyWheels(http, WheelCache(CacheLayout(tmp_path / "cache").wheels), steps)
    planned = lazy.plan(chosen)
    errors: list[BaseException] = []

    def ensure() -> None:
        try:
            lazy.ensure(planned)
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            errors.append(exc)

    first = threading.Thread(target=ensure)
    first.start()
    assert steps.started.wait(30)
    second = threading.Thread(target=ensure)
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waiting for the first, not fetching
    assert index.count("/files/") == 0
    steps.go.set()
    first.join(30)
    second.join(30)
    return planned, errors


def _package(name: str) -> LockedPackage:
    return LockedPackage(
        name=canonicalize_name(name),
        version=Version("1.0"),
        source=PackageSource(kind="registry", location="https://pypi.org/simple"),
    )


def test_wheels_asked_for_by_two_threads_at_once_are_fetched_once(
    fresh_index: LocalIndex, http: httpx.Client, tmp_path: Path
) -> None:
    planned, errors = _asking_at_once(fresh_index, http, tmp_path, _Held())
    assert errors == []
    assert fresh_index.count("/files/") == 2
    assert all(wheel.path.is_file() for wheel in planned)


def test_a_wheel_whose_fetch_failed_in_another_thread_is_fetched_by_the_waiting_one(
    fresh_index: LocalIndex, http: httpx.Client, tmp_path: Path
) -> None:
    planned, errors = _asking_at_once(fresh_index, http, tmp_path, _Held(fail=True))
    assert [str(e) for e in errors] == ["the first fetch failed"]
    assert fresh_index.count("/files/") == 2
    assert all(wheel.path.is_file() for wheel in planned)


def test_planning_a_cached_wheel_marks_it_used(
    fresh_index: LocalIndex, http: httpx.Client, tmp_path: Path
) -> None:
    # A build whose layers are all cached reads no wheel; choosing it still counts as a use
    # for `imgbuild cache prune --unused-for`.
    cache = WheelCache(CacheLayout(tmp_path / "cache").wheels)
    wheel = served(fresh_index, "used")
    path = fetch_wheels(http, [wheel], cache)[wheel]
    os.utime(path, (1_000_000, 1_000_000))
    lazy = LazyWheels(http, cache, Steps())
    before = time.time() - 5
    (planned,) = lazy.plan([(_package("used"), wheel)])
    assert planned.path == path and path.stat().st_mtime > before
    # Not fetched by planning: a wheel not in the cache stays out of it.
    absent = served(fresh_index, "absent")
    lazy.plan([(_package("absent"), absent)])
    assert cache.path_for(absent) is None
