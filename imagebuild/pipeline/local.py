"""Workspace members, path dependencies and git sources: wheels built from source once.

Every platform of a build installs the same wheel of a local package, so it is built the
first time a platform asks. Its backend runs on the host's Python: a wheel with extension
modules fits only an image of the host's Python and CPU (``TargetPlatform.check_built``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from imagebuild.build.pep517 import BuildEnvironments, build_project_wheel
from imagebuild.build.secrets import SourcePolicy
from imagebuild.install.plan import PlannedWheel
from imagebuild.lock.model import LockedPackage
from imagebuild.report import Reporter
from imagebuild.target.platform import TargetPlatform


class LocalWheels:
    """Workspace members and path dependencies, built from source once for every platform."""

    def __init__(
        self,
        *,
        lock_dir: Path,
        out: Path,
        epoch: int,
        envs: BuildEnvironments,
        reporter: Reporter,
        git_bucket: Path | None = None,
        policy: SourcePolicy | None = None,
    ) -> None:
        self._lock_dir, self._out, self._epoch = lock_dir, out, epoch
        self._policy = policy  # .dockerignore, exclude and the secrets check (build.secrets)
        self._envs, self._reporter = envs, reporter
        self._built: dict[str, PlannedWheel] = {}
        # Where git sources are mirrored and built (``CacheLayout.git``).
        self.git_bucket = git_bucket

    def get(self, pkg: LockedPackage) -> PlannedWheel:
        """The wheel of ``pkg`` (a local directory source), built the first time it is asked."""
        if pkg.name not in self._built and pkg.source.kind == "git":
            # (imported here: git sources bring their fetching and metadata code along)
            from imagebuild.pipeline.direct import git_package_wheel

            assert self.git_bucket is not None
            wheel = git_package_wheel(
                pkg,
                bucket=self.git_bucket,
                epoch=self._epoch,
                envs=self._envs,
                reporter=self._reporter,
            )
            self._built[pkg.name] = PlannedWheel(
                name=pkg.name, version=wheel.name.split("-")[1], path=wheel
            )
        if pkg.name not in self._built:
            source_dir = (self._lock_dir / pkg.source.location).resolve()
            self._reporter.step(f"build: {pkg.name} wheel from {pkg.source.location}")
            wheel = build_project_wheel(
                source_dir,
                self._out,
                source_date_epoch=self._epoch,
                envs=self._envs,
                policy=self._policy,
            )
            self._built[pkg.name] = PlannedWheel(
                name=pkg.name, version=wheel.name.split("-")[1], path=wheel
            )
        return self._built[pkg.name]

    def for_target(
        self, packages: Sequence[LockedPackage], target: TargetPlatform
    ) -> list[PlannedWheel]:
        """The wheels of ``packages``, each checked to be one the image can import."""
        wheels = [self.get(pkg) for pkg in packages]
        for pkg, wheel in zip(packages, wheels, strict=True):
            target.check_built(wheel.path.name, f"{pkg.name} ({pkg.source.location})")
        return wheels
