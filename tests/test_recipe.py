"""The inputs of a built base: a catalog file's ``[build]`` recipe, a project's own base
definition (``base = "x.toml"``), and the settings that feed it (``system-packages``, the
Debian mirrors). Real TOML files in, values or one-line errors out."""

from __future__ import annotations

import tomllib
from pathlib import Path, PurePosixPath

import pytest

from imagebuild.errors import ImagebuildError, ProjectError, TargetError
from imagebuild.project.settings import ImageSettings, parse_settings
from imagebuild.project.spec import ProjectSpec, parse_project
from imagebuild.target.base import BUILT_REGISTRY, CATALOG_DIRS, read_entries
from imagebuild.target.choose import base_reference
from imagebuild.target.recipe import (
    DEFAULT_MIRROR,
    DEFAULT_SECURITY_MIRROR,
    Account,
    Group,
    read_recipe,
)

CATALOG = next(d for d in CATALOG_DIRS if d.is_dir())

# A project's own base: one entry on bookworm, one on trixie, a shell, its own account.
OWN_BASE = """\
name = "lab"
shell = true
user = "1000"

[build]
kind = "debian"
mirror = "http://mirror.example/debian/"
packages = ["base-files", "tzdata", "dash"]
exclude = ["dpkg"]
symlinks = { "usr/bin/python" = "python3" }
env = { LANG = "C.UTF-8" }

[[build.accounts]]
name = "lab"
uid = 1000
gid = 1000
home = "/home/lab"
shell = "/bin/sh"

[[build.groups]]
name = "lab"
gid = 1000

[[python]]
version = "3.11"
suite = "bookworm"
packages = ["python3.11-minimal", "base-files"]
interpreter = "/usr/bin/python3.11"
libc = "glibc"
libc-version = "2.36"
symlinks = { "usr/bin/python" = "python3.11", "usr/bin/python3" = "python3.11" }

[[python]]
version = "3.13"
suite = "trixie"
packages = ["python3.13-minimal"]
interpreter = "/usr/bin/python3.13"
libc = "glibc"
libc-version = "2.41"
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def one_line(exc: pytest.ExceptionInfo[ImagebuildError]) -> str:
    """The error's message, after checking the whole error (hint included) is one line."""
    assert "\n" not in str(exc.value)
    return exc.value.message


# -- the catalog's recipes --------------------------------------------------------------------


def test_the_default_base_reads_as_a_recipe_per_python() -> None:
    entries = read_entries(CATALOG / "debian.toml")
    assert [(e.python_version, e.built) for e in entries] == [((3, 11), True), ((3, 13), True)]
    bookworm = entries[0]
    assert bookworm.reference == f"{BUILT_REGISTRY}/debian:3.11-bookworm"
    assert bookworm.interpreter == PurePosixPath("/usr/bin/python3.11")
    recipe = bookworm.recipe
    assert recipe is not None
    assert recipe.suite == "bookworm"
    # The entry's own packages first, then the ones every entry shares.
    assert recipe.packages[:2] == ("python3.11-minimal", "libpython3.11-stdlib")
    assert {"base-files", "ca-certificates", "tzdata", "libstdc++6"} <= set(recipe.packages)
    assert "dpkg" in recipe.exclude and "perl-base" in recipe.exclude
    assert (recipe.mirror, recipe.security_mirror) == (DEFAULT_MIRROR, DEFAULT_SECURITY_MIRROR)
    assert Account(name="nonroot", uid=65532, gid=65532, home="/home/nonroot") in recipe.accounts
    assert Group(name="nonroot", gid=65532) in recipe.groups
    assert all(a.shell == "/sbin/nologin" for a in recipe.accounts)
    assert ("usr/bin/python3", "python3.11") in recipe.symlinks
    assert list(recipe.symlinks) == sorted(recipe.symlinks)
    assert dict(recipe.env)["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"
    trixie = entries[1].recipe
    assert trixie is not None and trixie.suite == "trixie"
    assert ("usr/bin/python3", "python3.13") in trixie.symlinks


def test_a_pulled_flavor_has_no_recipe() -> None:
    entries = read_entries(CATALOG / "distroless.toml")
    assert entries and all(e.recipe is None and not e.built for e in entries)
    assert entries[0].reference.startswith("gcr.io/distroless/")


def test_an_own_definition_merges_shared_and_entry_values(tmp_path: Path) -> None:
    path = write(tmp_path / "base.toml", OWN_BASE)
    first, second = read_entries(path)
    recipe = first.recipe
    assert recipe is not None
    # Duplicates drop out, the entry's order first.
    assert recipe.packages == ("python3.11-minimal", "base-files", "tzdata", "dash")
    assert recipe.mirror == "http://mirror.example/debian"  # no trailing slash
    assert recipe.security_mirror == DEFAULT_SECURITY_MIRROR
    # The entry's link wins over the shared one of the same path.
    assert recipe.symlinks == (("usr/bin/python", "python3.11"), ("usr/bin/python3", "python3.11"))
    assert recipe.accounts == (
        Account(name="lab", uid=1000, gid=1000, home="/home/lab", shell="/bin/sh"),
    )
    assert second.recipe is not None
    assert second.recipe.symlinks == (("usr/bin/python", "python3"),)
    assert second.reference == f"{BUILT_REGISTRY}/lab:3.13-trixie"


def test_with_mirrors_replaces_what_is_given_and_keeps_the_rest(tmp_path: Path) -> None:
    recipe = read_entries(write(tmp_path / "base.toml", OWN_BASE))[0].recipe
    assert recipe is not None
    assert recipe.with_mirrors(None, None) == recipe
    moved = recipe.with_mirrors("https://snapshot.example/debian/20260101T000000Z/", None)
    assert moved.mirror == "https://snapshot.example/debian/20260101T000000Z"
    assert moved.security_mirror == recipe.security_mirror
    both = recipe.with_mirrors("file:///srv/debian", "file:///srv/security/")
    assert (both.mirror, both.security_mirror) == ("file:///srv/debian", "file:///srv/security")
    assert (both.suite, both.packages, both.accounts) == (
        recipe.suite,
        recipe.packages,
        recipe.accounts,
    )
    assert recipe.mirror == "http://mirror.example/debian"  # the original is unchanged


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ('kind = "debian"', 'kind = "alpine"', "build.kind: unknown kind 'alpine'"),
        ("uid = 1000", "uid = -1", "build.accounts[0].uid: must be an integer id"),
        ("uid = 1000", "uid = true", "build.accounts[0].uid: must be an integer id"),
        ("gid = 1000\n\n[[python]]", 'gid = "x"\n\n[[python]]', "build.groups[0].gid"),
        ('home = "/home/lab"\n', "", "build.accounts[0].home: must be a string"),
        ('"tzdata", "dash"]', '"tzdata", 7]', "build.packages[2]: must be a string"),
        ('suite = "trixie"', "suite = 13", "python[1].suite: must be a string"),
        ('packages = ["python3.13-minimal"]', 'packages = "x"', "python[1].packages"),
        ('env = { LANG = "C.UTF-8" }', "env = { LANG = 1 }", "build.env.LANG"),
        ('"usr/bin/python3" = "python3.11"', '"usr/bin/python3" = 3', "python[0].symlinks"),
    ],
)
def test_a_malformed_recipe_is_one_line_naming_the_key(
    tmp_path: Path, old: str, new: str, where: str
) -> None:
    assert old in OWN_BASE
    path = write(tmp_path / "base.toml", OWN_BASE.replace(old, new, 1))
    with pytest.raises(TargetError) as exc:
        read_entries(path)
    assert one_line(exc).startswith(f"{path}: {where}")


def test_accounts_that_are_not_an_array_are_refused(tmp_path: Path) -> None:
    text = OWN_BASE.replace("[[build.accounts]]", "[build.accounts]", 1)
    path = write(tmp_path / "base.toml", text)
    assert isinstance(tomllib.loads(text)["build"]["accounts"], dict)
    with pytest.raises(TargetError, match=r"build\.accounts"):
        read_entries(path)


def test_a_mirror_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "base.toml", OWN_BASE.replace('"http://mirror.example/debian/"', "5"))
    with pytest.raises(TargetError, match=r"build\.mirror"):
        read_entries(path)


def test_a_recipe_entry_without_build_is_none() -> None:
    python: dict[str, object] = {"version": "3.11", "suite": "bookworm"}
    data: dict[str, object] = {"name": "x", "python": [python]}
    assert read_recipe(data, python, path=Path("x.toml"), index=0) is None


def test_an_unreadable_or_empty_definition_is_one_line(tmp_path: Path) -> None:
    broken = write(tmp_path / "broken.toml", 'name = "lab"\n[build\n')
    with pytest.raises(TargetError) as exc:
        read_entries(broken)
    assert one_line(exc).startswith(f"{broken}: cannot read the base definition")
    empty = write(tmp_path / "empty.toml", 'name = "lab"\nshell = false\nuser = "0"\n')
    with pytest.raises(TargetError, match=r"no \[\[python\]\] entry"):
        read_entries(empty)
    no_libc = write(tmp_path / "nolibc.toml", OWN_BASE.replace('libc-version = "2.41"\n', ""))
    with pytest.raises(TargetError) as exc:
        read_entries(no_libc)
    assert one_line(exc).startswith(f"{no_libc}: python[1]: invalid catalog entry")


# -- base = "x.toml": the project's own definition ----------------------------------------------


def project(root: Path, requires_python: str = ">=3.11") -> ProjectSpec:
    data = {"project": {"name": "app", "version": "1.0", "requires-python": requires_python}}
    return parse_project(data, root=root)


def test_an_own_base_is_read_from_the_project_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "proj"
    write(root / "bases" / "lab.toml", OWN_BASE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the path is the project's, not the working directory's
    settings = parse_settings({"base": "bases/lab.toml"})
    entry, reference = base_reference(settings, project(root))
    assert entry is not None and entry.flavor == "lab"
    # The newest Python requires-python allows.
    assert entry.python_version == (3, 13)
    assert reference == f"{BUILT_REGISTRY}/lab:3.13-trixie"
    older, _ = base_reference(settings, project(root, ">=3.11,<3.12"))
    assert older is not None and older.python_version == (3, 11)
    chosen, _ = base_reference(
        parse_settings({"base": "bases/lab.toml", "python": "3.11"}), project(root)
    )
    assert chosen is not None and chosen.recipe is not None
    assert chosen.recipe.suite == "bookworm"
    write(root / ".python-version", "3.11.9\n")
    pinned, _ = base_reference(settings, project(root))
    assert pinned is not None and pinned.python_version == (3, 11)


def test_an_own_base_that_is_missing_or_lacks_the_python_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(TargetError) as exc:
        base_reference(parse_settings({"base": "nothere.toml"}), project(tmp_path))
    assert one_line(exc).startswith(f"{tmp_path / 'nothere.toml'}: cannot read")
    write(tmp_path / "lab.toml", OWN_BASE)
    with pytest.raises(TargetError, match=r"base 'lab' has no Python 3\.12"):
        base_reference(parse_settings({"base": "lab.toml", "python": "3.12"}), project(tmp_path))
    with pytest.raises(ProjectError, match="allows no Python of base 'lab'"):
        base_reference(parse_settings({"base": "lab.toml"}), project(tmp_path, ">=3.14"))


# -- settings: system-packages and the Debian mirrors ---------------------------------------------


def test_system_packages_are_sorted_and_deduplicated() -> None:
    settings = parse_settings(
        {"system-packages": ["libgomp1", "ffmpeg", "libgomp1", "libstdc++6", "python3.11-venv"]}
    )
    assert settings.system_packages == ("ffmpeg", "libgomp1", "libstdc++6", "python3.11-venv")
    assert parse_settings({"system-packages": "libmagic1"}).system_packages == ("libmagic1",)
    assert parse_settings({}).system_packages == ()


@pytest.mark.parametrize(
    "name", ["LibGomp1", "lib gomp", "x", "-libfoo", "libfoo:amd64", "libfoo (>= 1)", "libé", ""]
)
def test_a_system_package_that_is_not_a_debian_name_is_refused(name: str) -> None:
    with pytest.raises(ProjectError) as exc:
        parse_settings({"system-packages": ["libgomp1", name]}, source="pyproject.toml")
    assert one_line(exc) == (
        f"pyproject.toml: tool.imgbuild.system-packages: {name!r} is not a Debian package name"
    )
    assert exc.value.hint is not None and "libgomp1" in exc.value.hint


def test_system_packages_that_are_not_strings_are_refused() -> None:
    with pytest.raises(ProjectError, match="system-packages: expected a list of strings"):
        parse_settings({"system-packages": ["libgomp1", 3]})


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("http://deb.debian.org/debian/", "http://deb.debian.org/debian"),
        (
            "https://snapshot.debian.org/archive/debian/20260101T000000Z",
            "https://snapshot.debian.org/archive/debian/20260101T000000Z",
        ),
        ("file:///srv/mirror/debian/", "file:///srv/mirror/debian"),
    ],
)
def test_debian_mirrors_take_http_https_and_file_urls(url: str, kept: str) -> None:
    settings = parse_settings({"debian-mirror": url, "debian-security-mirror": url})
    assert (settings.debian_mirror, settings.debian_security_mirror) == (kept, kept)


@pytest.mark.parametrize("key", ["debian-mirror", "debian-security-mirror"])
@pytest.mark.parametrize("url", ["ftp://ftp.debian.org/debian", "deb.debian.org/debian", " "])
def test_a_debian_mirror_that_is_not_a_url_is_refused(key: str, url: str) -> None:
    with pytest.raises(ProjectError) as exc:
        parse_settings({key: url})
    assert one_line(exc) == (
        f"pyproject.toml: tool.imgbuild.{key}: {url!r} is not an http(s) or file URL"
    )


def test_debian_mirrors_default_to_the_recipe() -> None:
    settings = parse_settings({})
    assert (settings.debian_mirror, settings.debian_security_mirror) == (None, None)
    assert settings == ImageSettings()
    with pytest.raises(ProjectError, match="debian-mirror: expected a string, got 5"):
        parse_settings({"debian-mirror": 5})
