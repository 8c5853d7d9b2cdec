"""``imgbuild init``: a commented ``[tool.imgbuild]`` table added to pyproject.toml.

The table is appended as text: everything already in the file stays byte for byte.
tomlkit reads the file first (to refuse a second table) and renders the new one.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError

from imagebuild.cache import atomic_writer
from imagebuild.errors import ProjectError

# (key, example value, what it does): every setting, commented out, at its default or an
# example; the README's settings reference says the same.
_SETTINGS: tuple[tuple[str, str, str], ...] = (
    (
        "base",
        '"debian"',
        "debian (default), debian-shell, distroless, debian-slim, alpine, a reference",
    ),
    ("python", '"3.12"', "else .python-version, else the base's newest"),
    ("entrypoint", '["my-app"]', "default: the one [project.scripts] entry"),
    ("cmd", "[]", "arguments to the entrypoint"),
    ("user", '"65532"', 'non-root by default; "0" runs as root'),
    ("workdir", '"/app"', ""),
    ("env", '{ LOG_LEVEL = "info" }', ""),
    ("labels", '{ "org.example.team" = "web" }', ""),
    ("ports", "[8000]", ""),
    ("groups", "[]", "dependency groups to install (default none)"),
    ("extras", "[]", "extras of the project to install"),
    ("index-url", '"https://pypi.org/simple/"', "for imgbuild lock (else [[tool.uv.index]])"),
    ("extra-index-urls", "[]", ""),
    ("platforms", '["linux/amd64", "linux/arm64"]', "what imgbuild lock covers"),
    ("prereleases", "false", ""),
    ("max-layers", "100", "layers in the image, the base's included"),
    ("exclude", '["tests/**"]', "source left out of the project's wheel"),
    ("allow-secrets", "[]", "wheel paths that may ship though they look like secrets"),
    ("cache-from", '"ghcr.io/org/app-cache"', "registry repository to take built layers from"),
    ("cache-to", '"ghcr.io/org/app-cache"', "registry repository to keep built layers in"),
    ("system-packages", "[]", 'Debian packages for a built base, e.g. ["libmagic1"]'),
    ("debian-mirror", '"http://deb.debian.org/debian"', "a snapshot mirror rebuilds old locks"),
    ("debian-security-mirror", '"http://deb.debian.org/debian-security"', ""),
)


def render_settings_table() -> str:
    """The ``[tool.imgbuild]`` table: a heading comment and every setting commented out."""
    table = tomlkit.table()
    table.add(tomlkit.comment("imgbuild settings; every key is optional (uncomment to set)."))
    for key, value, note in _SETTINGS:
        line = f"{key} = {value}"
        table.add(tomlkit.comment(f"{line:<44}# {note}" if note else line))
    tool = tomlkit.table(is_super_table=True)
    tool.add("imgbuild", table)
    doc = tomlkit.document()
    doc.add("tool", tool)
    return doc.as_string()


def add_settings_table(text: str, where: str) -> str:
    """``text`` (a pyproject.toml) with the settings table appended; the rest unchanged."""
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise ProjectError(f"{where}: not valid TOML: {exc}", hint="fix the file first") from None
    tool = doc.get("tool")
    if isinstance(tool, dict) and "imgbuild" in tool:
        raise ProjectError(
            f"{where}: [tool.imgbuild] is already there; nothing was changed",
            hint="edit it by hand (the README's settings reference lists every key)",
        )
    newline = "\r\n" if "\r\n" in text else "\n"
    gap = "" if not text else newline if text.endswith("\n") else newline * 2
    result = text + gap + render_settings_table().replace("\n", newline)
    try:
        tomllib.loads(result)
    except tomllib.TOMLDecodeError as exc:
        # e.g. `tool` written as an inline table, which a [tool.imgbuild] header cannot extend.
        raise ProjectError(
            f"{where}: a [tool.imgbuild] table cannot be added to this file ({exc})",
            hint="add the table by hand",
        ) from None
    return result


def init_settings(project_dir: Path) -> Path:
    """Append the settings table to ``project_dir/pyproject.toml``; return the file's path."""
    path = project_dir / "pyproject.toml"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ProjectError(
            f"{project_dir}: no pyproject.toml", hint="run it in a project (uv init makes one)"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProjectError(f"{path}: not UTF-8 text") from None
    result = add_settings_table(text, str(path))
    mode = path.stat().st_mode & 0o7777
    with atomic_writer(path) as out:
        out.write(result.encode("utf-8"))
    path.chmod(mode)  # the temporary file was private; the project's file keeps its mode
    return path
