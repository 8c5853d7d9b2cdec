from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from imagebuild.build.sdist import sdist_metadata
from imagebuild.errors import PackageIndexError
from imagebuild.index.model import DistMetadata, IndexFile, PackageIndex
from imagebuild.index.pages import ACCEPT
from imagebuild.index.simple import SimpleIndex
from imagebuild.net.http import RetryPolicy, http_client, retrying_client
from tests.fixtures.index_server import HTML_TYPE, JSON_TYPE, LocalIndex

NO_WAIT = RetryPolicy(backoff=0.0, max_wait=0.0)


def n(name: str) -> NormalizedName:
    return canonicalize_name(name)


class Messages:
    def __init__(self) -> None:
        self.steps: list[str] = []
        self.warnings: list[str] = []

    def step(self, message: str) -> None:
        self.steps.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with http_client(retry=NO_WAIT) as client:
        yield client


@pytest.fixture
def open_index(http: httpx.Client) -> Iterator[Callable[..., SimpleIndex]]:
    """Make ``SimpleIndex`` objects that are closed after the test."""
    made: list[SimpleIndex] = []

    def make(*urls: str, cache_dir: Path | None = None, **kwargs: object) -> SimpleIndex:
        # The build stage's reader, as the pipeline hands it in.
        kwargs.setdefault("sdist_metadata", sdist_metadata)
        index = SimpleIndex(http, urls, cache_dir=cache_dir, **kwargs)  # type: ignore[arg-type]
        made.append(index)
        return index

    yield make
    for index in made:
        index.close()


def mock_index(handler: Callable[[httpx.Request], httpx.Response], **kwargs: object) -> SimpleIndex:
    client = retrying_client(httpx.MockTransport(handler), retry=NO_WAIT)
    return SimpleIndex(client, ["http://127.0.0.1:9/simple/"], cache_dir=None, **kwargs)  # type: ignore[arg-type]


def without_json_only_fields(files: tuple[IndexFile, ...]) -> tuple[IndexFile, ...]:
    # HTML pages have no size or upload-time (PEP 700 added them to JSON only).
    return tuple(dataclasses.replace(f, size=None, upload_time=None) for f in files)


def populate(index: LocalIndex) -> None:
    index.add_wheel("mixed-bag", "1.0", requires_python=">=3.8,<4")
    index.add_wheel("mixed-bag", "1.1", yanked="broken on Windows")
    index.add_wheel("mixed-bag", "1.2", yanked=True, metadata=False)
    index.add_sdist("mixed-bag", "1.3", requires_python=">=3.9")


# -- pages -----------------------------------------------------------------------------


def test_satisfies_the_protocol(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    index: PackageIndex = open_index(fresh_index.url)
    assert index.files(n("nothing-here")) == ()


def test_json_page_fields(open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex) -> None:
    populate(fresh_index)
    files = open_index(fresh_index.url).files(n("Mixed_Bag"))
    served = {f.filename: f for f in fresh_index.files_for("mixed-bag")}
    assert [f.filename for f in files] == sorted(served)
    by_version = {str(f.version): f for f in files}
    for file in files:
        entry = served[file.filename]
        # The page links are relative (../../files/...): resolved against the page URL.
        assert file.url == fresh_index.file_url(file.filename)
        assert file.sha256 == entry.sha256
        assert file.size == entry.size
        assert file.upload_time == "2024-01-01T00:00:00.000000Z"
        assert file.index_url == fresh_index.url
        assert file.name == "mixed-bag"
    v10, v11, v12, v13 = (by_version[v] for v in ("1.0", "1.1", "1.2", "1.3"))
    assert v10.requires_python == SpecifierSet(">=3.8,<4")
    assert v10.yanked is None
    assert v11.yanked == "broken on Windows"
    assert v12.yanked == ""
    assert v10.core_metadata == hashlib.sha256(served[v10.filename].metadata or b"").hexdigest()
    assert v12.core_metadata is False
    assert (v13.kind, v13.requires_python, v13.core_metadata) == (
        "sdist",
        SpecifierSet(">=3.9"),
        False,
    )


def test_html_page_gives_the_same_files(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    populate(fresh_index)
    from_json = open_index(fresh_index.url).files(n("mixed-bag"))
    fresh_index.serve_json = False
    from_html = open_index(fresh_index.url).files(n("mixed-bag"))
    assert fresh_index.statuses("/simple/mixed-bag/") == [200, 200]
    assert len(from_html) == 4
    assert from_html == without_json_only_fields(from_json)
    # data-requires-python was HTML-escaped on the page.
    assert b"&lt;4" in fresh_index.project_html("mixed-bag")
    assert from_html[0].requires_python == SpecifierSet(">=3.8,<4")


def test_unusable_files_are_left_out(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    fresh_index.add_wheel("oddities", "1.0")
    fresh_index.add_raw("oddities", "oddities-0.9-py2.7.egg")
    fresh_index.add_raw("oddities", "oddities-0.8.win32.exe")
    fresh_index.add_raw("oddities", "oddities-0.7.tar.bz2")
    fresh_index.add_raw("oddities", "oddities-not.a.version.whl")
    fresh_index.add_raw("oddities", "somebody_else-1.0-py3-none-any.whl")
    fresh_index.add_raw("oddities", "oddities-0.6.zip")
    for serve_json in (True, False):
        fresh_index.serve_json = serve_json
        files = open_index(fresh_index.url).files(n("oddities"))
        assert [f.filename for f in files] == ["oddities-0.6.zip", "oddities-1.0-py3-none-any.whl"]


def test_unknown_project_is_empty(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    fresh_index.add_wheel("known", "1.0")
    assert open_index(fresh_index.url).files(n("unknown")) == ()
    assert fresh_index.statuses("/simple/unknown/") == [404]


def test_accept_header_and_normalised_url(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(404)

    mock_index(handler).files(n("Some.Project_Name"))
    assert seen[0].headers["Accept"] == ACCEPT
    assert str(seen[0].url) == "http://127.0.0.1:9/simple/some-project-name/"


def test_legacy_metadata_keys_base_href_and_absolute_links(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    digest = "ab" * 32
    page = {
        "meta": {"api-version": "1.0"},
        "name": "legacy",
        "files": [
            {
                "filename": "legacy-1.0-py3-none-any.whl",
                "url": "https://files.example/packages/legacy-1.0-py3-none-any.whl",
                "hashes": {"sha256": digest.upper()},
                "dist-info-metadata": {"sha256": digest},
            },
            {
                "filename": "legacy-1.1-py3-none-any.whl",
                "url": "/elsewhere/legacy-1.1-py3-none-any.whl#sha256=" + digest,
                "hashes": {},
                "core-metadata": False,
                "dist-info-metadata": True,
                "yanked": False,
            },
            {"filename": "legacy-1.2.tar.gz", "url": "x/legacy-1.2.tar.gz", "hashes": {}},
        ],
    }
    base = f"{fresh_index.base_url}/legacy-json/"
    fresh_index.serve_raw("/legacy-json/legacy/", json.dumps(page).encode(), content_type=JSON_TYPE)
    files = open_index(base).files(n("legacy"))
    assert [(f.url, f.sha256, f.core_metadata) for f in files] == [
        ("https://files.example/packages/legacy-1.0-py3-none-any.whl", digest, digest),
        (f"{fresh_index.base_url}/elsewhere/legacy-1.1-py3-none-any.whl", digest, False),
        (f"{base}legacy/x/legacy-1.2.tar.gz", None, False),
    ]
    assert files[0].size is None and files[0].upload_time is None

    html_page = f"""<!DOCTYPE html><html><head><base href="/mirror/pkgs/"></head><body>
    <a href="legacy-1.0-py3-none-any.whl#sha256={digest}" data-dist-info-metadata="true">x</a>
    <a href="../legacy-1.1-py3-none-any.whl" data-core-metadata="sha256={digest}"
       data-dist-info-metadata="true" data-yanked>y</a>
    <a href="legacy-1.2.tar.gz" data-yanked="&lt;3.8 only" data-requires-python="&gt;=3.8">z</a>
    <a>no href</a>
    </body></html>""".encode()
    base = f"{fresh_index.base_url}/legacy-html/"
    fresh_index.serve_raw(
        "/legacy-html/legacy/", html_page, content_type="text/html; charset=utf-8"
    )
    files = open_index(base).files(n("legacy"))
    mirror = f"{fresh_index.base_url}/mirror"
    assert [(f.url, f.sha256, f.core_metadata, f.yanked, f.requires_python) for f in files] == [
        (f"{mirror}/pkgs/legacy-1.0-py3-none-any.whl", digest, True, None, None),
        (f"{mirror}/legacy-1.1-py3-none-any.whl", None, digest, "", None),
        (f"{mirror}/pkgs/legacy-1.2.tar.gz", None, False, "<3.8 only", SpecifierSet(">=3.8")),
    ]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (JSON_TYPE, json.dumps({"meta": {"api-version": "2.0"}, "files": []}).encode()),
        (
            HTML_TYPE,
            b'<html><head><meta name="pypi:repository-version" content="2.0"></head></html>',
        ),
    ],
)
def test_newer_major_api_version_fails(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex, content_type: str, body: bytes
) -> None:
    fresh_index.serve_raw("/v2/future/", body, content_type=content_type)
    with pytest.raises(PackageIndexError) as caught:
        open_index(f"{fresh_index.base_url}/v2/").files(n("future"))
    message = str(caught.value)
    assert "project future" in message and "2.0" in message and "\n" not in message


def test_newer_minor_api_version_is_read_with_one_warning(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    page = {
        "meta": {"api-version": "1.99", "_private": 1},
        "files": [
            {"filename": "minor-1.0.tar.gz", "url": "minor-1.0.tar.gz", "hashes": {}, "new": 1}
        ],
        "unknown-key": True,
    }
    for project in ("minor", "minor-two"):
        fresh_index.serve_raw(f"/v1/{project}/", json.dumps(page).encode(), content_type=JSON_TYPE)
    messages = Messages()
    index = open_index(f"{fresh_index.base_url}/v1/", reporter=messages)
    assert [f.filename for f in index.files(n("minor"))] == ["minor-1.0.tar.gz"]
    assert index.files(n("minor-two")) == ()  # the file belongs to another project
    assert len(messages.warnings) == 1 and "1.99" in messages.warnings[0]


def test_unexpected_content_type_fails(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    fresh_index.serve_raw("/json/plain/", b"{}", content_type="application/json")
    with pytest.raises(
        PackageIndexError, match=r"project plain: .*Content-Type 'application/json'"
    ):
        open_index(f"{fresh_index.base_url}/json/").files(n("plain"))


def test_a_page_that_does_not_parse_is_not_cached(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex, tmp_path: Path
) -> None:
    fresh_index.serve_raw("/broken/junk/", b"{", content_type=JSON_TYPE)
    fresh_index.cache_control = "max-age=600"
    for _ in range(2):
        with pytest.raises(PackageIndexError, match="not valid JSON"):
            open_index(f"{fresh_index.base_url}/broken/", cache_dir=tmp_path).files(n("junk"))
    assert fresh_index.count("/broken/junk/") == 2
    assert not (tmp_path / "http").exists()


def test_forbidden_fails_with_status(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    fresh_index.serve_raw("/private/secret/", b"no\n", content_type="text/plain", status=403)
    with pytest.raises(PackageIndexError) as caught:
        open_index(f"{fresh_index.base_url}/private/").files(n("secret"))
    assert "answered 403" in str(caught.value)
    assert caught.value.hint is not None and "credentials" in caught.value.hint


# -- several indexes -------------------------------------------------------------------


def test_first_index_that_knows_a_project_wins(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex, tmp_path: Path
) -> None:
    with LocalIndex(tmp_path / "second") as second:
        fresh_index.add_wheel("shared", "1.0")
        second.add_wheel("shared", "2.0")
        second.add_wheel("only-second", "1.0")
        index = open_index(fresh_index.url, second.url)
        shared = index.files(n("shared"))
        assert [(f.filename, f.index_url) for f in shared] == [
            ("shared-1.0-py3-none-any.whl", fresh_index.url)
        ]
        assert second.count("/simple/shared/") == 0  # never asked: the first index knew it
        only = index.files(n("only-second"))
        assert [(f.url, f.index_url) for f in only] == [
            (second.file_url("only_second-1.0-py3-none-any.whl"), second.url)
        ]
        assert index.metadata(only[0]).version == Version("1.0")
        assert index.files(n("nowhere")) == ()
        assert (fresh_index.count("/simple/nowhere/"), second.count("/simple/nowhere/")) == (1, 1)


# -- memo, concurrency, prefetch -----------------------------------------------------------


def test_concurrent_calls_share_one_request(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    fresh_index.add_wheel("popular", "1.0")
    fresh_index.delay = 0.3
    index = open_index(fresh_index.url)
    barrier = threading.Barrier(8)
    results: list[tuple[IndexFile, ...]] = []
    metadata: list[DistMetadata] = []

    def work() -> None:
        barrier.wait()
        files = index.files(n("popular"))
        metadata.append(index.metadata(files[0]))
        results.append(files)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert len(results) == 8 and len(set(results)) == 1 and len(set(metadata)) == 1
    assert fresh_index.count("/simple/popular/") == 1
    assert fresh_index.count("/files/") == 1
    index.files(n("popular"))
    assert fresh_index.count("/simple/popular/") == 1


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_prefetch_makes_later_calls_request_free(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    names = [n(f"pre-{i}") for i in range(5)]
    for name in names:
        fresh_index.add_wheel(name, "1.0")
    index = open_index(fresh_index.url, workers=3)
    index.prefetch([*names, n("pre-missing")])
    wait_for(lambda: len(fresh_index.statuses("/simple/")) == 6)
    before = len(fresh_index.requests)
    files = [f for name in names for f in index.files(name)]
    assert index.files(n("pre-missing")) == ()
    assert len(files) == 5 and len(fresh_index.requests) == before

    index.prefetch_metadata(files)
    index.prefetch_metadata(files)  # already started: not queued again
    wait_for(lambda: len(fresh_index.statuses("/files/")) == 5)
    before = len(fresh_index.requests)
    assert [index.metadata(f).name for f in files] == names
    assert len(fresh_index.requests) == before


def test_prefetch_swallows_errors_and_the_real_call_raises(fresh_index: LocalIndex) -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(500)

    index = mock_index(handler)
    index.prefetch([n("flaky")])
    index.close()  # waits for the prefetch
    assert calls == ["/simple/flaky/"] * 3
    with pytest.raises(PackageIndexError, match="project flaky"):
        index.files(n("flaky"))
    assert len(calls) == 6  # failures are not memoised: the real call tried again
    index.prefetch([n("other")])  # closed: a no-op, not an error
    assert len(calls) == 6


# -- metadata ------------------------------------------------------------------------------


def test_metadata_from_the_metadata_file(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    fresh_index.add_wheel(
        "Meta.Pkg",
        "2.0",
        requires=["dep-a>=1", "Dep_B[extra]; extra == 'Fancy.Stuff'"],
        requires_python=">=3.10",
    )
    index = open_index(fresh_index.url)
    (file,) = index.files(n("meta-pkg"))
    assert isinstance(file.core_metadata, str)
    meta = index.metadata(file)
    assert meta == DistMetadata(
        name=n("meta-pkg"),
        version=Version("2.0"),
        requires_dist=(
            Requirement("dep-a>=1"),
            Requirement("Dep_B[extra]; extra == 'Fancy.Stuff'"),
        ),
        requires_python=SpecifierSet(">=3.10"),
        provides_extra=(n("fancy-stuff"),),
    )
    assert fresh_index.count("/files/") == 1
    assert fresh_index.count(f"/files/{file.filename}.metadata") == 1
    assert index.metadata(file) is meta  # memoised


def test_metadata_hash_mismatch_fails(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    fresh_index.add_wheel("tampered", "1.0")
    index = open_index(fresh_index.url)
    (file,) = index.files(n("tampered"))
    forged = dataclasses.replace(file, core_metadata="0" * 64)
    with pytest.raises(PackageIndexError) as caught:
        index.metadata(forged)
    message = str(caught.value)
    assert message.startswith(f"wheel {file.filename}: metadata file ")
    assert "0" * 64 in message and "\n" not in message


def test_metadata_name_or_version_mismatch_fails(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    fresh_index.add_wheel("liar", "1.0")
    index = open_index(fresh_index.url)
    (file,) = index.files(n("liar"))
    renamed = dataclasses.replace(file, filename="liar-9.0-py3-none-any.whl")
    with pytest.raises(PackageIndexError, match=r"says liar 1\.0, the file name says liar 9\.0"):
        index.metadata(renamed)


def test_metadata_falls_back_to_the_wheel(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex, tmp_path: Path
) -> None:
    fresh_index.add_wheel("no-meta", "1.0", requires=["six"], metadata=False)
    messages = Messages()
    index = open_index(fresh_index.url, cache_dir=tmp_path / "cache", reporter=messages)
    (file,) = index.files(n("no-meta"))
    assert file.core_metadata is False
    meta = index.metadata(file)
    assert (meta.name, meta.requires_dist) == ("no-meta", (Requirement("six"),))
    assert fresh_index.count("/files/") == 1
    assert fresh_index.count(f"/files/{file.filename}") == 1
    assert messages.steps == [f"downloading {file.filename} to read its metadata"]
    # The extracted METADATA is cached: a new index object downloads nothing.
    again = open_index(fresh_index.url, cache_dir=tmp_path / "cache")
    assert again.metadata(file) == meta
    assert fresh_index.count("/files/") == 1


def test_wheel_fallback_checks_the_wheel_hash(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    fresh_index.add_wheel("no-meta-bad", "1.0", metadata=False)
    index = open_index(fresh_index.url)
    (file,) = index.files(n("no-meta-bad"))
    with pytest.raises(PackageIndexError, match=r"sha256 mismatch \(index: 0{64}, downloaded: "):
        index.metadata(dataclasses.replace(file, sha256="0" * 64))


def test_advertised_metadata_file_missing_falls_back_with_a_warning(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    fresh_index.add_wheel("gone-meta", "1.0", metadata=False)
    messages = Messages()
    index = open_index(fresh_index.url, reporter=messages)
    (file,) = index.files(n("gone-meta"))
    meta = index.metadata(dataclasses.replace(file, core_metadata=True))
    assert meta.name == "gone-meta"
    assert len(messages.warnings) == 1 and "answered 404" in messages.warnings[0]


def test_sdist_without_metadata_is_read_through_its_build_backend(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex, tmp_path: Path
) -> None:
    fresh_index.add_sdist("source-only", "3.1", requires=["dep>=2"], requires_python=">=3.9")
    messages = Messages()
    index = open_index(fresh_index.url, cache_dir=tmp_path / "cache", reporter=messages)
    (file,) = index.files(n("source-only"))
    meta = index.metadata(file)
    assert (meta.name, meta.version) == ("source-only", Version("3.1"))
    assert meta.requires_dist == (Requirement("dep>=2"),)
    assert meta.requires_python == SpecifierSet(">=3.9")
    assert fresh_index.count("/files/") == 1
    assert any("source_only-3.1.tar.gz" in step for step in messages.steps)
    # Memoised in the instance, and cached on disk for the next one.
    assert index.metadata(file) is meta
    again = open_index(fresh_index.url, cache_dir=tmp_path / "cache")
    assert again.metadata(file) == meta
    assert fresh_index.count("/files/") == 1


def test_sdist_metadata_without_a_cache_dir(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    fresh_index.add_sdist("source-nocache", "1.0", requires=["dep"])
    index = open_index(fresh_index.url)
    (file,) = index.files(n("source-nocache"))
    assert index.metadata(file).requires_dist == (Requirement("dep"),)


def test_broken_sdist_is_one_line_naming_it(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex
) -> None:
    fresh_index.add_sdist("source-broken", "3.1", fail="no compiler here")
    index = open_index(fresh_index.url)
    (file,) = index.files(n("source-broken"))
    with pytest.raises(PackageIndexError) as caught:
        index.metadata(file)
    message = str(caught.value)
    assert message.startswith("sdist source_broken-3.1.tar.gz: the build backend failed")
    assert "RuntimeError: no compiler here" in message and "\n" not in message


# -- the disk cache --------------------------------------------------------------------------


def test_fresh_cached_page_needs_no_request(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex, tmp_path: Path
) -> None:
    fresh_index.add_wheel("cached", "1.0")
    fresh_index.cache_control = "max-age=600"
    fresh_index.etag = True
    cache = tmp_path / "cache"
    first = open_index(fresh_index.url, cache_dir=cache).files(n("cached"))
    meta = open_index(fresh_index.url, cache_dir=cache).metadata(first[0])
    before = len(fresh_index.requests)
    again = open_index(fresh_index.url, cache_dir=cache)
    assert again.files(n("cached")) == first
    assert again.metadata(first[0]) == meta
    assert len(fresh_index.requests) == before
    assert len(list((cache / "http").rglob("*"))) == 2  # one directory, one entry


@pytest.mark.parametrize("validator", ["etag", "last-modified"])
def test_stale_page_is_revalidated(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex, tmp_path: Path, validator: str
) -> None:
    fresh_index.add_wheel("stale", "1.0")
    fresh_index.cache_control = "max-age=0"
    if validator == "etag":
        fresh_index.etag = True
    else:
        fresh_index.last_modified = "Mon, 01 Jan 2024 00:00:00 GMT"
    cache = tmp_path / "cache"
    first = open_index(fresh_index.url, cache_dir=cache).files(n("stale"))
    assert open_index(fresh_index.url, cache_dir=cache).files(n("stale")) == first
    assert fresh_index.statuses("/simple/stale/") == [200, 304]
    # Once the page changes, the validator no longer matches and the new page is read.
    fresh_index.add_wheel("stale", "2.0")
    fresh_index.last_modified = fresh_index.last_modified and "Tue, 02 Jan 2024 00:00:00 GMT"
    files = open_index(fresh_index.url, cache_dir=cache).files(n("stale"))
    assert [str(f.version) for f in files] == ["1.0", "2.0"]
    assert fresh_index.statuses("/simple/stale/") == [200, 304, 200]


def test_page_without_freshness_is_revalidated_every_time(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex, tmp_path: Path
) -> None:
    fresh_index.add_wheel("etag-only", "1.0")
    fresh_index.etag = True
    for _ in range(3):
        open_index(fresh_index.url, cache_dir=tmp_path).files(n("etag-only"))
    assert fresh_index.statuses("/simple/etag-only/") == [200, 304, 304]


def test_no_store_and_no_cache_dir_keep_nothing(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex, tmp_path: Path
) -> None:
    fresh_index.add_wheel("secretive", "1.0")
    fresh_index.cache_control = "no-store"
    fresh_index.etag = True
    open_index(fresh_index.url, cache_dir=tmp_path / "cache").files(n("secretive"))
    assert not (tmp_path / "cache" / "http").exists()
    fresh_index.cache_control = "max-age=600"
    open_index(fresh_index.url, cache_dir=None).files(n("secretive"))
    open_index(fresh_index.url, cache_dir=None).files(n("secretive"))
    assert fresh_index.statuses("/simple/secretive/") == [200, 200, 200]
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    # A page stored earlier is dropped once the server says no-store (here on a 304).
    fresh_index.cache_control = "max-age=0"
    open_index(fresh_index.url, cache_dir=tmp_path / "cache").files(n("secretive"))
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] != []
    fresh_index.cache_control = "max-age=0, no-store"
    open_index(fresh_index.url, cache_dir=tmp_path / "cache").files(n("secretive"))
    assert fresh_index.statuses("/simple/secretive/")[-2:] == [200, 304]
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_corrupt_cache_entries_are_refetched(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex, tmp_path: Path
) -> None:
    fresh_index.add_wheel("fragile", "1.0")
    fresh_index.cache_control = "max-age=600"
    cache = tmp_path / "cache"
    first = open_index(fresh_index.url, cache_dir=cache)
    files = first.files(n("fragile"))
    meta = first.metadata(files[0])
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert {p.relative_to(cache).parts[0] for p in entries} == {"http", "metadata"}
    garbage = [None, b"", b"\x00garbage", b"imgbuild-http-cache 1\n{not json\n", b"Name: x\n"]
    for attempt, junk in enumerate(garbage, start=1):
        for path in entries:
            # None: keep the page header, damage the body (its stored sha256 catches it).
            path.write_bytes(path.read_bytes()[:-3] + b"xyz" if junk is None else junk)
        index = open_index(fresh_index.url, cache_dir=cache)
        assert index.files(n("fragile")) == files
        assert index.metadata(files[0]) == meta
        assert fresh_index.count("/simple/fragile/") == 1 + attempt
        assert fresh_index.count("/files/") == 1 + attempt
    # The refetched entries were written back whole: now nothing is requested.
    before = len(fresh_index.requests)
    index = open_index(fresh_index.url, cache_dir=cache)
    assert index.files(n("fragile")) == files and index.metadata(files[0]) == meta
    assert len(fresh_index.requests) == before


def test_unwritable_cache_is_a_warning(
    open_index: Callable[..., SimpleIndex], fresh_index: LocalIndex, tmp_path: Path
) -> None:
    fresh_index.add_wheel("readonly", "1.0")
    fresh_index.etag = True
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    messages = Messages()
    index = open_index(fresh_index.url, cache_dir=blocker, reporter=messages)
    files = index.files(n("readonly"))
    index.metadata(files[0])
    assert len(files) == 1
    assert len(messages.warnings) == 1 and "cannot write the index cache" in messages.warnings[0]


# -- failures --------------------------------------------------------------------------------


def test_server_errors_are_retried_then_reported() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503)

    index = mock_index(handler)
    with pytest.raises(PackageIndexError) as caught:
        index.files(n("down"))
    assert len(calls) == 3
    assert str(caught.value) == (
        "project down: GET http://127.0.0.1:9/simple/down/ failed 3 times, "
        "last: HTTP 503 Service Unavailable; check the network and the index URL"
    )


def test_a_retry_can_succeed() -> None:
    answers = [httpx.Response(502), httpx.Response(404)]
    index = mock_index(lambda request: answers.pop(0))
    assert index.files(n("recovers")) == ()
    assert answers == []


def test_garbage_and_truncated_bodies() -> None:
    def garbage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"\x89PNG not json", headers={"Content-Type": JSON_TYPE})

    with pytest.raises(PackageIndexError, match=r"project junk: page .*: not valid JSON"):
        mock_index(garbage).files(n("junk"))

    def not_a_page(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[1, 2], headers={"Content-Type": JSON_TYPE})

    with pytest.raises(PackageIndexError, match="JSON page is not an object"):
        mock_index(not_a_page).files(n("junk"))

    calls: list[int] = []

    def truncated(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body"
        )

    with pytest.raises(PackageIndexError) as caught:
        mock_index(truncated).files(n("junk"))
    assert len(calls) == 3
    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)
    assert "RemoteProtocolError: peer closed connection" in str(caught.value)


def test_connection_refused_is_a_package_index_error(http: httpx.Client) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    index = SimpleIndex(http, [f"http://user:hunter2@127.0.0.1:{port}/simple"], cache_dir=None)
    with index, pytest.raises(PackageIndexError) as caught:
        index.files(n("anything"))
    message = str(caught.value)
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert f"GET http://***@127.0.0.1:{port}/simple/anything/ failed 3 times" in message
    assert "hunter2" not in message


def test_metadata_server_error_names_the_file() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500)

    file = IndexFile(
        filename="x-1.0-py3-none-any.whl",
        url="http://127.0.0.1:9/files/x-1.0-py3-none-any.whl",
        sha256=None,
        core_metadata=True,
    )
    with pytest.raises(
        PackageIndexError, match=r"^wheel x-1.0-py3-none-any.whl: GET .*\.metadata failed"
    ):
        mock_index(handler).metadata(file)


def test_no_index_urls() -> None:
    with pytest.raises(PackageIndexError, match="no package index"), httpx.Client() as client:
        SimpleIndex(client, [], cache_dir=None)


# -- live PyPI -------------------------------------------------------------------------------


@pytest.mark.pypi
def test_pypi_six(tmp_path: Path) -> None:
    with (
        httpx.Client(timeout=30) as client,
        SimpleIndex(client, ["https://pypi.org/simple/"], cache_dir=tmp_path) as index,
    ):
        files = index.files(n("six"))
        wheels = [f for f in files if f.kind == "wheel" and f.version == Version("1.16.0")]
        assert len(wheels) == 1
        wheel = wheels[0]
        assert wheel.url.startswith("https://files.pythonhosted.org/")
        assert wheel.sha256 is not None and wheel.size is not None
        # pypi.org advertises PEP 658 files; some mirrors and proxies drop the key, and
        # then the wheel (11 kB) is read instead. Either way the metadata is the same.
        assert wheel.index_url == "https://pypi.org/simple/"
        meta = index.metadata(wheel)
        assert (meta.name, meta.version) == ("six", Version("1.16.0"))
        assert meta.requires_python is not None and meta.requires_python.contains("3.11")


def test_big_pages_are_kept_parsed_by_their_bytes(
    open_index: Callable[..., SimpleIndex],
    fresh_index: LocalIndex,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A page too big to parse cheaply is kept parsed, keyed by its exact bytes."""
    import imagebuild.index.simple as index_module

    monkeypatch.setattr(index_module, "_PARSED_CACHE_ABOVE", 0)
    fresh_index.add_wheel("big", "1.0", requires_python=">=3.9")
    fresh_index.add_wheel("big", "2.0", yanked="broken")
    cache = tmp_path / "cache"
    first = open_index(fresh_index.url, cache_dir=cache).files(n("big"))
    (kept,) = list((cache / "pages-parsed").glob("*.marshal"))
    parse = index_module.parse_json_page

    def must_not_parse(*args: object) -> object:
        raise AssertionError("the page was parsed again")

    monkeypatch.setattr(index_module, "parse_json_page", must_not_parse)
    assert open_index(fresh_index.url, cache_dir=cache).files(n("big")) == first
    monkeypatch.setattr(index_module, "parse_json_page", parse)
    # A damaged entry is parsed again, never an error; new bytes make a new entry.
    kept.write_bytes(b"\x00garbage")
    assert open_index(fresh_index.url, cache_dir=cache).files(n("big")) == first
    fresh_index.add_wheel("big", "3.0")
    third = open_index(fresh_index.url, cache_dir=cache).files(n("big"))
    assert len(third) == len(first) + 1
    assert len(list((cache / "pages-parsed").glob("*.marshal"))) == 2
