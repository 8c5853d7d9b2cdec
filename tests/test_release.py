"""A pulled base's release and packages, read off its layers; non-Debian bases refused."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
import pytest

from imagebuild.cache import CacheLayout
from imagebuild.debian.release import read_release
from imagebuild.errors import ProjectError
from imagebuild.image.model import BaseImage
from imagebuild.image.store import BlobStore
from imagebuild.pipeline.syspkgs import with_system_packages
from imagebuild.project.settings import ImageSettings
from imagebuild.report import NullReporter


def _layer(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


STATUS = (
    b"Package: libc6\nStatus: install ok installed\nVersion: 2.36\n\n"
    b"Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n"
    b"Package: zlib1g\nStatus: install ok installed\nVersion: 1\n"
)


def test_release_and_installed_packages_come_from_the_top_layer_that_has_them(
    tmp_path: Path,
) -> None:
    lower = _layer(
        tmp_path / "a.tar",
        {
            "usr/lib/os-release": b"ID=debian\nVERSION_CODENAME=bullseye\n",
            "var/lib/dpkg/status": STATUS,
        },
        {"etc/os-release": "../usr/lib/os-release"},
    )
    upper = _layer(
        tmp_path / "b.tar",
        {
            "usr/lib/os-release": b'NAME="Debian"\nID=debian\nVERSION_CODENAME="bookworm"\n',
            "var/lib/dpkg/status.d/libmagic1": b"Package: libmagic1\nVersion: 1\n",
            "var/lib/dpkg/status.d/libmagic1.md5sums": b"Package: not-a-package\n",
        },
    )
    release = read_release([lower, upper])
    assert (release.id, release.codename) == ("debian", "bookworm")
    assert release.packages == {"libc6", "zlib1g", "libmagic1"}


def test_system_packages_on_a_base_that_is_not_debian_are_refused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    layer = _layer(tmp_path / "alpine.tar", {"etc/os-release": b"ID=alpine\nVERSION_ID=3.20\n"})
    desc = store.put_file(layer)
    base = BaseImage(
        reference="python:3.12-alpine",
        manifest_digest=desc.digest,
        config={},
        layers=(desc,),
        diff_ids=(desc.digest,),
    )
    settings = ImageSettings(system_packages=("libmagic1",))
    with pytest.raises(ProjectError) as caught:
        with httpx.Client() as http:
            with_system_packages(
                base, arch="amd64", settings=settings, store=store,
                cache=CacheLayout(tmp_path / "cache"), http=http, reporter=NullReporter(),
            )  # fmt: skip
    text = str(caught.value)
    assert "system-packages libmagic1" in text and "python:3.12-alpine is alpine" in text
    assert 'base = "debian"' in text and "\n" not in text
    # No system packages: the base is returned as it is, nothing read.
    with httpx.Client() as http:
        same = with_system_packages(
            base, arch="amd64", settings=ImageSettings(), store=store,
            cache=CacheLayout(tmp_path / "cache"), http=http, reporter=NullReporter(),
        )  # fmt: skip
    assert same is base
