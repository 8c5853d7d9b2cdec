"""The lines a link check says: the refusal of an image, the warning for what plugins lack.

Each names the wheel, the file and the library first, then how to mend the image: the
Debian package that ships a library when the base's release says, else how to find it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from imagebuild.debian.linkcheck import Missing


def missing_line(missing: Missing, provider_package: str | None) -> str:
    """The one line that refuses an image for ``missing``.

    ``provider_package`` is the Debian package that ships the library (for a missing
    library) or that installed the image's too-old one (for a symbol version), when the
    caller knows it.
    """
    head = f"{missing.wheel}: {missing.member} needs {missing.library}"
    if missing.version is None:
        if provider_package:
            fix = f'add it with [tool.imgbuild] system-packages = ["{provider_package}"]'
        else:
            fix = (
                f"find the Debian package that ships it (apt-file search {missing.library}) "
                "and add it to [tool.imgbuild] system-packages"
            )
        return f"{head}, which the image does not have; {fix}"
    owner = f" ({provider_package})" if provider_package else ""
    has = f"only up to {missing.provided}" if missing.provided else "no version of that family"
    return (
        f"{head} with symbol version {missing.version}, but the image's {missing.library}"
        f"{owner} has {has}; use a base from a newer Debian release, or a build of the "
        f"wheel made for an older {missing.library}"
    )


def refusal_line(missing: Sequence[Missing], packages: Mapping[str, str]) -> str:
    """The one line that refuses an image for ``missing`` (at least one; the first named).

    ``packages``: the Debian package that ships each missing library, as far as known.
    When every library is missing and each one's package is known, the fix names them all,
    so that one change mends the image (opencv-python's Qt needs four of them on a slim
    base); else the first's, and the others' libraries are listed.
    """
    first = missing[0]
    libraries, others = _beside_first(missing)
    also = f" (also missing: {', '.join(others)})" if others else ""
    whole = all(m.version is None and m.library in packages for m in missing)
    if others and whole:
        wanted = ", ".join(f'"{package}"' for package in sorted({packages[n] for n in libraries}))
        return (
            f"{first.wheel}: {first.member} needs {first.library}, which the image does not "
            f"have{also}; add them with [tool.imgbuild] system-packages = [{wanted}]"
        )
    owner = first.provider.package if first.provider is not None else None
    return missing_line(first, packages.get(first.library) or owner) + also


def on_demand_line(missing: Sequence[Missing]) -> str:
    """The one warning for what plugins and optional modules lack (``Missing.on_demand``)."""
    first = missing[0]
    _, others = _beside_first(missing)
    head = f"{first.wheel}: {first.member} needs {first.library}"
    if first.version is not None:
        head += f" with symbol version {first.version}"
    also = f" (and {len(others)} more: {', '.join(others)})" if others else ""
    return (
        f"{head}{also}, which the image does not have; its package loads these files only "
        "for a feature that needs them (a plugin it opens, or a module it imports inside "
        "try/except ImportError), so they fail only then: if the image uses that feature, "
        "add what ships those libraries (a wheel, or a Debian package in [tool.imgbuild] "
        "system-packages)"
    )


def _beside_first(missing: Sequence[Missing]) -> tuple[list[str], list[str]]:
    """Every library ``missing`` names, sorted; and those of them but the first's."""
    libraries = sorted({m.library for m in missing})
    return libraries, [library for library in libraries if library != missing[0].library]
