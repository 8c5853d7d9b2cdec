"""The locked wheels of a platform, fetched when something reads them and not before.

A wheel's layer key, its place in the plan and its line in the SBOM come from the lock
(name, version, sha256, size), so they need no file. The file is fetched only by what
reads it: staging a layer the caches do not hold, scanning ELF files no record describes,
listing scripts, reading licences. A CI runner whose registry cache holds every layer and
record downloads no wheel at all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import httpx

from imagebuild.cache import mark_used
from imagebuild.install.fetch import WheelCache, fetch_wheels
from imagebuild.install.plan import PlannedWheel
from imagebuild.lock.model import LockedPackage, WheelFile
from imagebuild.report import Reporter


class LazyWheels:
    """Locked wheels planned from the lock, each fetched into the cache on first need."""

    def __init__(self, http: httpx.Client, cache: WheelCache, reporter: Reporter) -> None:
        self._http, self._cache, self._reporter = http, cache, reporter
        self._files: dict[str, WheelFile] = {}  # by the planned path
        self._fetching: dict[str, threading.Event] = {}  # by path: set when fetched (or not)
        self._guard = threading.Lock()

    def plan(self, chosen: Sequence[tuple[LockedPackage, WheelFile]]) -> list[PlannedWheel]:
        """The planned wheels of ``chosen``; those whose size the lock lacks are fetched now.

        A wheel's size decides its layer, so a lock without sizes costs the download first.
        """
        self.ensure_files([wheel for _, wheel in chosen if wheel.size is None])
        planned = []
        for pkg, wheel in chosen:
            path = self._cache.final_path(wheel)
            self._files[str(path)] = wheel
            mark_used(path)  # in the cache or not: its time is its last use (cache prune)
            size = wheel.size if wheel.size is not None else path.stat().st_size
            planned.append(
                PlannedWheel(
                    name=pkg.name,
                    version=str(pkg.version),
                    path=path,
                    size=size,
                    # Checked against the file when it is fetched: no need to hash it again.
                    sha256=wheel.sha256,
                )
            )
        return planned

    def ensure(self, wheels: Iterable[PlannedWheel]) -> None:
        """Fetch those of ``wheels`` that are locked and not in the cache yet."""
        self.ensure_files([self._files[str(w.path)] for w in wheels if str(w.path) in self._files])

    def ensure_files(self, files: Sequence[WheelFile]) -> None:
        """Fetch ``files`` that are not in the cache yet (all at once, in parallel).

        Threads of a build ask at once (the link check, the layers): a wheel another one is
        fetching is waited for, not fetched twice; if that fetch failed, it is fetched here.
        """
        done = threading.Event()
        with self._guard:
            missing = [w for w in files if self._cache.path_for(w) is None]
            waits = {
                self._fetching[self._name(w)] for w in missing if self._name(w) in self._fetching
            }
            mine = [w for w in missing if self._name(w) not in self._fetching]
            for wheel in mine:
                self._fetching[self._name(wheel)] = done
        try:
            if mine:
                fetch_wheels(self._http, mine, self._cache, reporter=self._reporter)
        finally:
            with self._guard:
                for wheel in mine:
                    del self._fetching[self._name(wheel)]
            done.set()
        for other in waits:
            other.wait()
        if waits:
            self.ensure_files([w for w in missing if self._cache.path_for(w) is None])

    def _name(self, wheel: WheelFile) -> str:
        return str(self._cache.final_path(wheel))
