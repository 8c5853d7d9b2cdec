"""The image's software bill of materials: a CycloneDX JSON document of every Python package.

Each package installed into the image is listed with its name, version, purl
(``pkg:pypi/name@version``), the sha256 the lock recorded for the file installed (the wheel,
or the sdist a wheel was built from; local packages have none) and its licence as its wheel's
METADATA states it (``License-Expression``, else a short ``License``, else the
``License ::`` classifiers). The project is the document's subject and is listed too.

The document is deterministic: components are sorted, the timestamp is
``SOURCE_DATE_EPOCH`` and the serial number is derived from the document's own content, so
the same lock gives the same bytes. It goes into the image at ``<venv>/sbom.cdx.json`` (by
default ``/app/.venv/sbom.cdx.json``), in a small layer of its own just below the project's.
"""

from __future__ import annotations

import hashlib
import json
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cyclonedx.contrib.license.factories import LicenseFactory
from cyclonedx.model import HashAlgorithm, HashType
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import DisjunctiveLicense, License
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL
from packaging.metadata import parse_email
from packaging.utils import canonicalize_name

from imagebuild import __version__
from imagebuild.digest import Digest
from imagebuild.errors import LayerError
from imagebuild.image.descriptor import canonical_json
from imagebuild.install.plan import PlannedWheel
from imagebuild.lock.model import Lock

_LONG_LICENSE = 100  # a License field longer than this is the licence's text, not its name


@dataclass(frozen=True, kw_only=True, slots=True)
class SbomPackage:
    """One Python package in the image, as the SBOM lists it."""

    name: str
    """Canonical distribution name."""
    version: str
    """Version as installed."""
    sha256: Digest | None = None
    """The lock's sha256 of the file installed (wheel, or the sdist built); ``None`` for
    local packages, which the lock records as directories."""
    licenses: tuple[str, ...] = ()
    """An SPDX expression alone, or licence names (classifiers), from the wheel's METADATA."""

    @property
    def purl(self) -> str:
        """The package URL, ``pkg:pypi/<name>@<version>``."""
        return str(PackageURL(type="pypi", name=self.name, version=self.version))


def load_sbom_packages(lock: Lock, wheels: Iterable[PlannedWheel]) -> tuple[SbomPackage, ...]:
    """Every wheel installed, with the lock's hash and the licence its METADATA states."""
    found = {}
    for wheel in wheels:
        name = canonicalize_name(wheel.name)
        found[name] = SbomPackage(
            name=name,
            version=wheel.version,
            sha256=locked_sha256(lock, name, wheel),
            licenses=wheel_licenses(wheel.path),
        )
    return tuple(found[name] for name in sorted(found))


def locked_sha256(lock: Lock, name: str, wheel: PlannedWheel) -> Digest | None:
    """The lock's sha256 of the wheel file installed, else of the sdist it was built from."""
    for pkg in lock.packages:
        if pkg.name != name or str(pkg.version) != wheel.version:
            continue
        for locked in pkg.wheels:
            if locked.filename == wheel.path.name:
                return locked.sha256
        if pkg.sdist is not None:
            return pkg.sdist.sha256
    return None


def wheel_licenses(path: Path) -> tuple[str, ...]:
    """The licence a wheel's METADATA states: an SPDX expression, a short name, classifiers."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(
                (
                    n
                    for n in archive.namelist()
                    if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
                ),
                None,
            )
            if name is None:
                raise LayerError(f"wheel {path.name}: no .dist-info/METADATA")
            raw, _ = parse_email(archive.read(name))
    except (OSError, zipfile.BadZipFile) as exc:
        raise LayerError(f"wheel {path}: cannot read its METADATA: {exc}") from exc
    expression = raw.get("license_expression")
    if expression:
        return (expression.strip(),)
    text = (raw.get("license") or "").strip()
    if text and "\n" not in text and len(text) <= _LONG_LICENSE:
        return (text,)
    prefix = "License :: "
    names = [c.rpartition(" :: ")[2] for c in raw.get("classifiers", []) if c.startswith(prefix)]
    return tuple(sorted(set(names)))


def render_sbom(packages: Sequence[SbomPackage], *, subject: str, epoch: int) -> bytes:
    """The CycloneDX 1.6 JSON document for ``packages``; ``subject`` (the project) is described.

    Same inputs, same bytes: the serial number is a UUID made from the rest of the document.
    """
    by_name = {p.name: p for p in packages}
    if subject not in by_name:
        raise LayerError(f"SBOM: the project {subject} is not among the packages installed")
    root = _component(by_name[subject], ComponentType.APPLICATION)
    components = [_component(p, ComponentType.LIBRARY) for p in packages]
    metadata = BomMetaData(component=root, timestamp=datetime.fromtimestamp(epoch, tz=UTC))
    metadata.tools.components.add(
        Component(name="imgbuild", version=__version__, type=ComponentType.APPLICATION)
    )
    bom = Bom(components=components, metadata=metadata, serial_number=uuid.UUID(int=0))
    bom.register_dependency(root, components)
    draft = json.loads(JsonV1Dot6(bom).output_as_string())
    serial = uuid.UUID(bytes=hashlib.sha256(canonical_json(draft)).digest()[:16], version=5)
    draft["serialNumber"] = serial.urn
    return canonical_json(draft) + b"\n"


def _component(package: SbomPackage, kind: ComponentType) -> Component:
    hashes = []
    if package.sha256 is not None:
        hashes.append(
            HashType(alg=HashAlgorithm.SHA_256, content=package.sha256.removeprefix("sha256:"))
        )
    purl = PackageURL(type="pypi", name=package.name, version=package.version)
    ref = package.purl if kind == ComponentType.LIBRARY else f"{package.purl}#image"
    return Component(
        name=package.name,
        version=package.version,
        type=kind,
        purl=purl,
        bom_ref=ref,
        hashes=hashes,
        licenses=_licenses(package.licenses),
    )


def _licenses(values: Sequence[str]) -> list[License]:
    if not values:
        return []
    factory = LicenseFactory()
    if len(values) == 1:
        return [factory.make_from_string(values[0])]
    # Several classifiers: names side by side (CycloneDX takes a list of licences, or one
    # expression, never both).
    return [DisjunctiveLicense(name=value) for value in values]
