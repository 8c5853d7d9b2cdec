"""The image configuration imgbuild sets over the base's: entrypoint, env, labels, ports.

Pure: project metadata and ``[tool.imgbuild]`` settings in, an ``ImageConfig`` out; and the
final assembly of one platform's image with its base annotations.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from imagebuild.errors import ProjectError
from imagebuild.image.model import BaseImage, Image, ImageConfig, Layer
from imagebuild.image.mutate import build_image
from imagebuild.image.store import BlobStore

if TYPE_CHECKING:
    from imagebuild.install.layers import VenvLayout
    from imagebuild.project.settings import ImageSettings
    from imagebuild.project.spec import ProjectSpec

_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_OCI = "org.opencontainers.image."
_SOURCE_KEYS = ("source", "repository", "source code", "code", "homepage")
_FORGES = ("github.com", "gitlab", "codeberg")


def rfc3339(epoch: int) -> str:
    """``epoch`` as the UTC timestamp image configs carry (``1970-01-01T00:00:00Z``)."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_entrypoint(
    settings: ImageSettings, project: ProjectSpec, venv: VenvLayout
) -> tuple[str, ...]:
    """The configured entrypoint (a bare name is a venv script), the one script, or python."""
    bin_dir = venv.root / "bin"
    if settings.entrypoint:
        first, *rest = settings.entrypoint
        return (first if "/" in first else str(bin_dir / first), *rest)
    scripts = sorted(project.scripts)
    if len(scripts) == 1:
        return (str(bin_dir / scripts[0]),)
    if not scripts:
        return (str(venv.python),)
    raise ProjectError(
        f"{project.root / 'pyproject.toml'}: several [project.scripts] ({', '.join(scripts)}) "
        "and no entrypoint",
        hint='set [tool.imgbuild] entrypoint = ["NAME"]',
    )


def check_entrypoint(
    settings: ImageSettings,
    project: ProjectSpec,
    venv: VenvLayout,
    installed: Callable[[], Collection[str]],
) -> None:
    """Refuse an entrypoint whose command the image will not have.

    A path (with a ``/``) is the user's to vouch for; a bare name must be one of the
    project's ``[project.scripts]``, the venv's ``python``, or a script a locked package
    installs (``installed`` lists those; it is asked only when the name is none of the
    others). Else the image would build and fail at its first start.
    """
    if not settings.entrypoint:
        return
    name = settings.entrypoint[0]
    major, minor = venv.python_version
    if (
        "/" in name
        or name in project.scripts
        or name in ("python", "python3", f"python{major}.{minor}")
    ):
        return
    if name and name in installed():
        return
    scripts = ", ".join(sorted(project.scripts)) or "none"
    raise ProjectError(
        f"{project.root / 'pyproject.toml'}: tool.imgbuild.entrypoint {name!r} is neither a "
        f"script of the project ([project.scripts]: {scripts}) or of a locked package, nor a path",
        hint=f"name a script, or give a path such as {venv.python}",
    )


def build_labels(project: ProjectSpec, settings: ImageSettings, base_ref: str) -> dict[str, str]:
    """OCI annotations from the project's metadata, then the configured labels over them."""
    labels = {f"{_OCI}title": project.name, f"{_OCI}base.name": base_ref}
    if project.version:
        labels[f"{_OCI}version"] = str(project.version)
    if project.description:
        labels[f"{_OCI}description"] = project.description[:512]
    if project.license:
        labels[f"{_OCI}licenses"] = project.license[:256]
    urls = {k.lower(): v for k, v in project.urls.items()}
    for key in _SOURCE_KEYS:
        if key in urls and any(forge in urls[key] for forge in _FORGES):
            labels[f"{_OCI}source"] = urls[key]
            break
    if "documentation" in urls:
        labels[f"{_OCI}documentation"] = urls["documentation"]
    labels.update(dict(settings.labels))
    return labels


def build_image_config(
    base: BaseImage,
    settings: ImageSettings,
    project: ProjectSpec,
    venv: VenvLayout,
    base_ref: str,
) -> ImageConfig:
    """The configuration imgbuild sets: the venv first on the base's PATH, and the settings."""
    path = f"{venv.root}/bin:" + _base_env(base).get("PATH", _DEFAULT_PATH)
    env = (("PATH", path), ("VIRTUAL_ENV", str(venv.root)), *settings.env)
    return ImageConfig(
        entrypoint=build_entrypoint(settings, project, venv),
        cmd=settings.cmd or (),
        env=env,
        user=settings.user,
        workdir=settings.workdir,
        labels=tuple(sorted(build_labels(project, settings, base_ref).items())),
        exposed_ports=tuple(f"{p}/tcp" for p in settings.ports),
    )


def build_platform_image(
    base: BaseImage,
    layers: Sequence[Layer],
    config: ImageConfig,
    *,
    epoch: int,
    base_ref: str,
    store: BlobStore,
    blobs_in_store: bool = True,
) -> Image:
    """One platform's image: ``layers`` over ``base``, annotated with the base it names.

    Not ``blobs_in_store``: some layers' blobs stay in their registry (``build_image``).
    """
    annotations = {
        f"{_OCI}base.name": base_ref,
        f"{_OCI}base.digest": base.manifest_digest,
    }
    return build_image(
        base,
        layers,
        config=config,
        created=rfc3339(epoch),
        store=store,
        annotations=annotations,
        blobs_in_store=blobs_in_store,
    )


def _base_env(base: BaseImage) -> dict[str, str]:
    config = base.config.get("config")
    env = config.get("Env") if isinstance(config, dict) else None
    pairs = (item.partition("=") for item in env or [] if isinstance(item, str))
    return {key: value for key, _, value in pairs}
