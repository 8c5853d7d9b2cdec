"""The package closure: every .deb a set of wanted packages needs, from Packages indexes.

A small, deterministic resolver for minimal images, not apt's. What it does and does not:

- One candidate per package name: the highest version (dpkg ordering) any index has for the
  architecture (or ``all``). Several indexes are several suites (``bookworm``,
  ``bookworm-updates``, ``bookworm-security``), so an update wins over the release.
- ``Pre-Depends`` and ``Depends`` are followed, breadth first from the wanted packages. For
  an alternatives group (``a | b``) the first alternative already chosen wins, else the first
  one that can be satisfied. Version constraints (``<< <= = >= >>``) are honoured, virtual
  packages are satisfied through ``Provides`` (a versioned dependency only by a versioned
  provide), and ``:any`` needs a ``Multi-Arch: allowed`` package, as dpkg rules. A virtual
  package with several providers and none of them chosen is refused rather than guessed:
  name the one you mean among the wanted packages (or exclude the virtual name).
- ``Essential: yes`` packages are not pulled in implicitly: only what a dependency names is.
  ``Recommends``, ``Conflicts`` and ``Breaks`` are not read.
- ``exclude`` names packages (real or virtual) that count as present but are never
  installed: a dependency one of them satisfies is dropped, whatever version it asks for.
  Definitions exclude what only maintainer scripts need (``dpkg``, ``debconf``,
  ``perl-base``), since no script ever runs in a distroless image.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from debian.debian_support import version_compare

from imagebuild.debian.model import IndexedPackage, LockedDeb
from imagebuild.errors import DebianError

_REQUESTED = "the base definition"
_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]*")
_OPS = {"<<", "<=", "=", ">=", ">>", "<", ">"}


@dataclass(frozen=True, slots=True)
class _Atom:
    """One alternative of a dependency: a name, an optional arch qualifier and version."""

    name: str
    archqual: str | None = None
    op: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        qual = f":{self.archqual}" if self.archqual else ""
        ver = f" ({self.op} {self.version})" if self.op else ""
        return f"{self.name}{qual}{ver}"


def _relations(text: str, owner: IndexedPackage) -> list[list[_Atom]]:
    """A Depends-style field of ``owner`` as groups of alternatives."""
    if not text.strip():
        return []
    from debian.deb822 import PkgRelation  # python-debian's deb822: see ``deb``

    groups = []
    for group in PkgRelation.parse_relations(text):
        atoms = []
        for rel in group:
            # python-debian hands back what it cannot parse as a "name" holding the raw text.
            if not _NAME.fullmatch(rel["name"]):
                raise DebianError(
                    f"{owner.name} {owner.version}: unreadable relation {rel['name']!r} in "
                    f"{text!r}",
                    hint="the index is damaged: fetch it again or use another mirror",
                )
            op, version = rel["version"] or (None, None)
            atoms.append(_Atom(rel["name"], rel["archqual"], op, version))
        if atoms:
            groups.append(atoms)
    return groups


def _meets(version: str, op: str | None, wanted: str | None) -> bool:
    if op is None or wanted is None:
        return True
    if op not in _OPS:
        return False
    order = version_compare(version, wanted)
    if op == "=":
        return order == 0
    if op in ("<<",):
        return order < 0
    if op in (">>",):
        return order > 0
    if op in ("<=", "<"):  # "<" and ">" are the obsolete spellings of "<=" and ">="
        return order <= 0
    return order >= 0


class _Universe:
    """The candidate of each package name, and who provides each virtual name."""

    def __init__(self, indexes: Sequence[Sequence[IndexedPackage]], arch: str) -> None:
        self.arch = arch
        self.packages: dict[str, IndexedPackage] = {}
        for index in indexes:
            for pkg in index:
                if pkg.architecture not in (arch, "all"):
                    continue
                best = self.packages.get(pkg.name)
                if best is None or version_compare(pkg.version, best.version) > 0:
                    self.packages[pkg.name] = pkg
        # Names only, cheaply; a provider's Provides is parsed in full when it is asked.
        self._providers: dict[str, list[str]] = {}
        for name, pkg in sorted(self.packages.items()):
            for item in pkg.provides.split(","):
                provided = item.strip().split(" ", 1)[0].split("(", 1)[0].split(":", 1)[0]
                if provided:
                    self._providers.setdefault(provided, []).append(name)

    def providers(self, atom: _Atom) -> Iterator[IndexedPackage]:
        """Packages whose Provides satisfy ``atom`` (a versioned atom: versioned provides)."""
        for name in self._providers.get(atom.name, ()):
            pkg = self.packages[name]
            if atom.archqual == "any" and pkg.multi_arch != "allowed":
                continue
            for group in _relations(pkg.provides, pkg):
                provided = group[0]
                if provided.name != atom.name:
                    continue
                if atom.op is None or (
                    provided.op == "="
                    and provided.version is not None
                    and _meets(provided.version, atom.op, atom.version)
                ):
                    yield pkg
                    break

    def real(self, atom: _Atom) -> IndexedPackage | None:
        """The package named by ``atom`` if its candidate satisfies it."""
        pkg = self.packages.get(atom.name)
        if pkg is None:
            return None
        if atom.archqual == "any" and pkg.multi_arch != "allowed":
            return None
        if atom.archqual not in (None, "any", "native", self.arch):
            return None
        return pkg if _meets(pkg.version, atom.op, atom.version) else None

    def satisfiers(self, atom: _Atom) -> list[IndexedPackage]:
        """Every package that satisfies ``atom``: the real one first, then providers."""
        real = self.real(atom)
        found = [real] if real is not None else []
        return found + [p for p in self.providers(atom) if p is not real]


def resolve_closure(
    indexes: Sequence[Sequence[IndexedPackage]],
    wanted: Sequence[str],
    *,
    arch: str,
    exclude: Collection[str] = (),
) -> tuple[IndexedPackage, ...]:
    """The packages ``wanted`` needs on ``arch``, themselves included, sorted by name.

    See the module doc for the rules. A wanted or needed package that no index has, or
    whose version no candidate meets, fails in one line naming it, who needs it, and a fix.
    """
    universe = _Universe(indexes, arch)
    excluded = frozenset(exclude)
    clash = sorted(excluded.intersection(wanted))
    if clash:
        raise DebianError(
            f"{', '.join(clash)}: both wanted and excluded by {_REQUESTED}",
            hint="remove it from one of the two lists",
        )
    chosen: dict[str, IndexedPackage] = {}
    pending: deque[tuple[list[_Atom], str]] = deque(([_Atom(n)], _REQUESTED) for n in wanted)
    while pending:
        group, needer = pending.popleft()
        pkg = _choose(universe, group, chosen, excluded, needer)
        if pkg is None:
            continue
        chosen[pkg.name] = pkg
        who = f"{pkg.name} {pkg.version}"
        for field in (pkg.pre_depends, pkg.depends):
            pending.extend((g, who) for g in _relations(field, pkg))
    return tuple(sorted(chosen.values(), key=lambda p: p.name))


def _choose(
    universe: _Universe,
    group: list[_Atom],
    chosen: dict[str, IndexedPackage],
    excluded: frozenset[str],
    needer: str,
) -> IndexedPackage | None:
    """The package to add for ``group``, or None when something present satisfies it."""
    options = [universe.satisfiers(atom) for atom in group]
    for atom, satisfiers in zip(group, options, strict=True):
        if atom.name in excluded or any(p.name in chosen or p.name in excluded for p in satisfiers):
            return None
    for atom, satisfiers in zip(group, options, strict=True):
        if not satisfiers:
            continue
        if len(satisfiers) == 1 or universe.real(atom) is not None:
            return satisfiers[0]
        names = ", ".join(sorted(p.name for p in satisfiers))
        raise DebianError(
            f"{atom} (needed by {needer}) is a virtual package several packages provide ({names})",
            hint=f"add the one you mean to the packages, or exclude {atom.name}",
        )
    raise _unsatisfiable(universe, group, needer)


def _unsatisfiable(universe: _Universe, group: list[_Atom], needer: str) -> DebianError:
    relation = " | ".join(str(atom) for atom in group)
    have = [
        f"{pkg.name} {pkg.version}"
        for atom in group
        if (pkg := universe.packages.get(atom.name)) is not None
    ]
    if not have:
        what = "no index has it" if len(group) == 1 else "no index has any of them"
        return DebianError(
            f"{relation} (needed by {needer}): {what}",
            hint="check the name, or add the suite or component that has it "
            "(e.g. <suite>-updates, <suite>-security, contrib), or exclude it",
        )
    return DebianError(
        f"{relation} (needed by {needer}): no candidate meets it (the indexes have "
        f"{', '.join(have)})",
        hint="add the suite that has a matching version (e.g. <suite>-updates or "
        "<suite>-security), or exclude it",
    )


def to_locked(pkg: IndexedPackage) -> LockedDeb:
    """The lock entry of an index entry: name, version, architecture, URL, sha256, size."""
    return LockedDeb(
        name=pkg.name,
        version=pkg.version,
        architecture=pkg.architecture,
        url=pkg.url,
        sha256=pkg.sha256,
        size=pkg.size,
    )
