"""Shared pytest configuration: fixtures live in tests/fixtures/*, registered here."""

from __future__ import annotations

import pytest

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
)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start without variables that change imgbuild's behaviour (httpx's clean_environ)."""
    for name in _BEHAVIOUR_ENV:
        monkeypatch.delenv(name, raising=False)
