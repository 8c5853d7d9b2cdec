"""Index credentials over a real local index that demands HTTP Basic auth."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imagebuild.net.credentials import AUTH_HINT, IndexCredentials, IndexEntry, env_name
from imagebuild.errors import FetchError, PackageIndexError
from imagebuild.install.fetch import WheelCache, fetch_wheels
from imagebuild.build.sdist import sdist_metadata
from imagebuild.index.simple import SimpleIndex
from imagebuild.lock.model import WheelFile
from imagebuild.net.transfer import strip_credentials
from tests.fixtures.index_server import LocalIndex

BASIC = "Basic " + base64.b64encode(b"ci-bot:s3cret/+").decode()


@pytest.fixture
def private(fresh_index: LocalIndex) -> LocalIndex:
    fresh_index.add_wheel("secret-lib", "1.0", files={"secret_lib.py": "X = 1\n"})
    fresh_index.basic_auth = ("ci-bot", "s3cret/+")
    return fresh_index


@pytest.fixture
def public(tmp_path: Path) -> Iterator[LocalIndex]:
    with LocalIndex(tmp_path / "public") as index:
        index.add_wheel("open-lib", "1.0")
        yield index


def _with_userinfo(url: str) -> str:
    return url.replace("http://", "http://ci-bot:s3cret%2F%2B@")


def _files(http: httpx.Client, index: LocalIndex, name: str) -> tuple[object, ...]:
    with SimpleIndex(http, [index.url], cache_dir=None, sdist_metadata=sdist_metadata) as simple:
        return simple.files(name)  # type: ignore[arg-type]


def test_named_uv_index_takes_its_credentials_from_the_environment(private: LocalIndex) -> None:
    auth = IndexCredentials(
        [IndexEntry(url=private.url, name="corp-private")],
        environ={
            "UV_INDEX_CORP_PRIVATE_USERNAME": "ci-bot",
            "UV_INDEX_CORP_PRIVATE_PASSWORD": "s3cret/+",
        },
        netrc_path=Path("/nonexistent"),
    )
    with httpx.Client(auth=auth) as http:
        assert len(_files(http, private, "secret-lib")) == 1
    assert private.authorizations[-1] == BASIC
    assert env_name("corp-private") == "CORP_PRIVATE"


def test_without_credentials_the_error_says_where_to_put_them(private: LocalIndex) -> None:
    auth = IndexCredentials(
        [IndexEntry(url=private.url, name="corp")], environ={}, netrc_path=Path("/nonexistent")
    )
    with httpx.Client(auth=auth) as http, pytest.raises(PackageIndexError) as caught:
        _files(http, private, "secret-lib")
    assert str(caught.value) == (
        f"project secret-lib: GET {private.url}secret-lib/ answered 401 Unauthorized; " + AUTH_HINT
    )


def test_credentials_in_the_index_url_reach_files_whose_urls_have_none(
    private: LocalIndex, tmp_path: Path
) -> None:
    """The lock keeps the file URL without credentials; the download finds them again."""
    auth = IndexCredentials(
        [IndexEntry(url=_with_userinfo(private.url))], environ={}, netrc_path=Path("/nonexistent")
    )
    (served,) = private.files_for("secret-lib")
    wheel = WheelFile(
        filename=served.filename,
        url=strip_credentials(private.file_url(served.filename)),
        sha256=f"sha256:{served.sha256}",
    )
    with httpx.Client(auth=auth) as http:
        paths = fetch_wheels(http, [wheel], WheelCache(tmp_path / "wheels"))
    assert paths[wheel].read_bytes() == served.path.read_bytes()
    assert set(private.authorizations) == {BASIC}


def test_a_wheel_download_refused_for_want_of_credentials_says_so(
    private: LocalIndex, tmp_path: Path
) -> None:
    (served,) = private.files_for("secret-lib")
    wheel = WheelFile(
        filename=served.filename,
        url=private.file_url(served.filename),
        sha256=f"sha256:{served.sha256}",
    )
    auth = IndexCredentials([], environ={}, netrc_path=Path("/nonexistent"))
    with httpx.Client(auth=auth) as http, pytest.raises(FetchError) as caught:
        fetch_wheels(http, [wheel], WheelCache(tmp_path / "wheels"))
    assert caught.value.hint == AUTH_HINT
    assert "answered 401" in str(caught.value)
    assert not list((tmp_path / "wheels").rglob("*.whl"))


def test_netrc_supplies_credentials_by_host(private: LocalIndex, tmp_path: Path) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login ci-bot password s3cret/+\n")
    netrc.chmod(0o600)
    auth = IndexCredentials([IndexEntry(url=private.url)], environ={}, netrc_path=netrc)
    with httpx.Client(auth=auth) as http:
        _files(http, private, "secret-lib")
    assert private.authorizations[-1] == BASIC


def test_credentials_stay_with_their_realm(private: LocalIndex, public: LocalIndex) -> None:
    """Two indexes on one host but other ports: only the private one sees the password."""
    auth = IndexCredentials(
        [IndexEntry(url=_with_userinfo(private.url)), IndexEntry(url=public.url)],
        environ={},
        netrc_path=Path("/nonexistent"),
    )
    with httpx.Client(auth=auth) as http:
        _files(http, private, "secret-lib")
        _files(http, public, "open-lib")
        # A header set by the caller (a registry's token) is left as it is.
        http.get(private.url, headers={"Authorization": "Bearer token"})
    assert public.authorizations == [None]
    assert private.authorizations == [BASIC, "Bearer token"]


def test_authenticated_urls_for_the_installer_carry_quoted_credentials() -> None:
    auth = IndexCredentials(
        [IndexEntry(url="https://pkgs.example.test/simple/", name="corp")],
        environ={"UV_INDEX_CORP_USERNAME": "ci bot", "UV_INDEX_CORP_PASSWORD": "p@ss:w/rd"},
        netrc_path=Path("/nonexistent"),
    )
    assert auth.authenticated("https://pkgs.example.test/simple/") == (
        "https://ci%20bot:p%40ss%3Aw%2Frd@pkgs.example.test/simple/"
    )
    # Another realm, or a URL that already has credentials, is left as it is.
    assert auth.authenticated("https://pypi.org/simple/") == "https://pypi.org/simple/"
    assert (
        auth.authenticated("https://u:p@pkgs.example.test/x/") == "https://u:p@pkgs.example.test/x/"
    )
