"""Shared pytest configuration: fixtures live in tests/fixtures/*, registered here."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagebuild.cache import memory_scratch_root

pytest_plugins = [
    "tests.fixtures.index_server",
    "tests.fixtures.registry_server",
    "tests.fixtures.docker_engine",
    "tests.fixtures.git_server",
]

_BEHAVIOUR_ENV = (
    "SOURCE_DATE_EPOCH",
    "DOCKER_HOST",
    "PIP_INDEX_URL",
    "UV_INDEX_URL",
    "IMGBUILD_CACHE_DIR",
    "IMGBUILD_REGISTRY_MIRRORS",
    "IMGBUILD_SERVER",
)


@pytest.fixture(scope="session")
def shared_debian_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Debian archive cache for the session: every build on a built base (the default)
    reads the same indexes and .debs, as users' caches do, instead of one download per test."""
    return tmp_path_factory.mktemp("debian-archive")


@pytest.fixture(scope="session", autouse=True)
def memory_trees_left_as_found() -> Iterator[None]:
    """The bases the session's builds unpack in memory (``cache.rootfs_home``) and the
    build environments its caches make there (``cache.build_envs_memory``) are removed
    when it ends: they would hold the machine's memory until it restarts."""
    memory = memory_scratch_root()
    homes = [memory / "rootfs", memory / "build-envs"] if memory is not None else []
    before = {home: set(home.iterdir()) if home.is_dir() else set() for home in homes}
    yield
    for home in homes:
        if home.is_dir():
            for tree in set(home.iterdir()) - before[home]:
                shutil.rmtree(tree, ignore_errors=True)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, shared_debian_cache: Path) -> None:
    """Tests start without variables that change imgbuild's behaviour (httpx's clean_environ)."""
    for name in _BEHAVIOUR_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IMGBUILD_DEBIAN_CACHE", str(shared_debian_cache))
