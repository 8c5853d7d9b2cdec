"""Secrets stay out of the project's wheel (``build.secrets``).

Patterns follow ``.dockerignore``; a wheel member that looks like a secret is refused in one
line unless ``allow-secrets`` names it. The builds here run a real PEP 517 backend served
by a local index: like hatchling on a project without a ``.gitignore``, it packs everything
under the package directory, dot files included.
"""

from __future__ import annotations

import textwrap
import zipfile
from pathlib import Path

import httpx
import pytest

from imagebuild.build.pep517 import BuildEnvironments, build_project_wheel
from imagebuild.build.secrets import (
    SourcePolicy,
    is_ignored,
    parse_ignore,
    source_policy,
    wheel_secrets,
)
from imagebuild.errors import ProjectError, RegistryError
from imagebuild.image.name import ImageReference
from imagebuild.image.store import BlobStore
from imagebuild.project.settings import parse_settings
from imagebuild.sinks.remote import RegistryClient
from tests.fixtures.index_server import LocalIndex, make_wheel

# .dockerignore lines, a path relative to the context, whether Docker leaves it out.
IGNORE_CASES = [
    (["*.env"], ".env", True),  # * may match nothing, and a leading dot is not special
    (["*.env"], "a.env", True),
    (["*.env"], "src/a.env", False),  # a pattern without a slash matches at the top only
    (["**/*.env"], "src/a.env", True),
    (["**/.env"], ".env", True),
    (["**/.env"], "src/pkg/.env", True),
    (["src/pkg/.env"], "src/pkg/.env", True),
    (["/src/pkg/.env"], "src/pkg/.env", True),  # a leading slash changes nothing
    (["./src/pkg/.env"], "src/pkg/.env", True),
    (["tests"], "tests/unit/test_x.py", True),  # a directory takes everything under it
    (["tests/"], "tests/unit/test_x.py", True),
    (["tests"], "src/tests/x.py", False),
    (["**/id_rsa"], "src/pkg/keys/id_rsa", True),
    (["**/id_rsa"], "src/pkg/keys/id_rsa.pub", False),
    (["src/*/secret?.txt"], "src/pkg/secret1.txt", True),
    (["src/*/secret?.txt"], "src/pkg/deep/secret1.txt", False),
    (["src/pkg/[a-c].key"], "src/pkg/b.key", True),
    (["src/pkg/[!a-c].key"], "src/pkg/b.key", False),
    (["src/pkg/[!a-c].key"], "src/pkg/d.key", True),
    (["**/.env*", "!**/.env.example"], "src/pkg/.env.local", True),
    (["**/.env*", "!**/.env.example"], "src/pkg/.env.example", False),
    (["!**/.env.example", "**/.env*"], "src/pkg/.env.example", True),  # the last match wins
    (["docs", "!docs/keep.md"], "docs/keep.md", False),
    (["# a comment", "", "  "], "# a comment", False),
    (["\\#literal"], "#literal", True),
    (["**"], "anything/at/all", True),
]


@pytest.mark.parametrize(("lines", "path", "ignored"), IGNORE_CASES)
def test_dockerignore_patterns(lines: list[str], path: str, ignored: bool) -> None:
    assert is_ignored(parse_ignore(lines), path) is ignored


PEM_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk=\n-----END OPENSSH PRIVATE KEY-----\n"
)
PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

# Wheel members, and why each looks like a secret (None: it does not).
MEMBER_CASES = [
    ("pkg/.env", "", "an environment file"),
    ("pkg/.env.production", "", "an environment file"),
    ("pkg/.env.example", "", None),
    ("pkg/.env.sample", "", None),
    ("pkg/.envrc_notes.txt", "", None),
    ("pkg/keys/id_rsa", PEM_KEY, "an SSH private key"),
    ("pkg/keys/id_ed25519", PEM_KEY, "an SSH private key"),
    ("pkg/keys/id_rsa.pub", "ssh-rsa AAAA", None),
    ("pkg/tls/server.pem", PEM_KEY, "a private key"),
    ("pkg/tls/server.key", PEM_KEY, "a private key"),
    ("pkg/tls/ca.pem", PEM_CERT, None),
    ("pkg/.npmrc", "//registry.npmjs.org/:_authToken=x", "an npm login file"),
    ("pkg/.pypirc", "[pypi]\npassword = x", "a PyPI login file"),
    ("pkg/.netrc", "machine x login y password z", "a netrc login file"),
    ("pkg/.git-credentials", "https://u:p@example.com", "git credentials"),
    ("pkg/.aws/credentials", "[default]\naws_secret_access_key = x", "AWS credentials"),
    ("pkg/credentials", "not aws", None),
    (
        "pkg/credentials.json",
        '{"type": "service_account", "private_key": "x"}',
        "Google credentials",
    ),
    ("pkg/credentials.json", '{"installed": {"client_secret": "x"}}', "Google credentials"),
    ("pkg/credentials.json", '{"schema": "public"}', None),
    ("pkg-1.0.data/data/etc/.env", "", "an environment file"),
]


@pytest.mark.parametrize(("member", "content", "why"), MEMBER_CASES)
def test_what_looks_like_a_secret(
    member: str, content: str, why: str | None, tmp_path: Path
) -> None:
    wheel = make_wheel(tmp_path, "pkg", "1.0", files={"pkg/__init__.py": "", member: content})
    expected = ((member, why),) if why else ()
    assert wheel_secrets(wheel, SourcePolicy()) == expected
    # Named in allow-secrets (the path, or a pattern), it may ship.
    assert wheel_secrets(wheel, SourcePolicy(allow_secrets=(member,))) == ()
    assert wheel_secrets(wheel, SourcePolicy(allow_secrets=("pkg*/*",))) == ()


def test_bad_inputs_tried() -> None:
    print(f"secrets: {len(IGNORE_CASES)} ignore patterns, {len(MEMBER_CASES)} wheel members")


# ---------------------------------------------------------------------------------------------
# Real builds

# A backend that packs src/<dist>/ whole (dot files too), as hatchling does without .gitignore.
_BACKEND = """\
import base64, hashlib, os, tomllib, zipfile


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open("pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    dist = project["name"].replace("-", "_")
    version = project["version"]
    info = f"{dist}-{version}.dist-info"
    files = {}
    for root, dirs, names in os.walk(os.path.join("src", dist)):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, "src").replace(os.sep, "/")] = f.read()
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\\nName: {project['name']}\\nVersion: {version}\\n"
    ).encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
    lines = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(data)}\\n")
    files[f"{info}/RECORD"] = ("".join(lines) + f"{info}/RECORD,,\\n").encode()
    name = f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
        for path, data in files.items():
            # A fixed time, as a reproducible backend writes (a name alone takes the clock).
            zf.writestr(zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return name
"""


@pytest.fixture(scope="module")
def backend_index(tmp_path_factory: pytest.TempPathFactory) -> LocalIndex:
    with LocalIndex(tmp_path_factory.mktemp("secrets-index")) as index:
        index.add_wheel("ib-tree-backend", "1.0", files={"ib_tree_backend.py": _BACKEND})
        yield index


@pytest.fixture(scope="module")
def envs(backend_index: LocalIndex, tmp_path_factory: pytest.TempPathFactory) -> BuildEnvironments:
    return BuildEnvironments(indexes=(backend_index.url,), root=tmp_path_factory.mktemp("envs"))


def secret_project(root: Path, tool: str = "") -> Path:
    """A project whose package directory holds .env, id_rsa and .npmrc next to its code."""
    package = root / "src" / "demo_app"
    package.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        textwrap.dedent("""\
        [project]
        name = "demo-app"
        version = "0.1.0"

        [build-system]
        requires = ["ib-tree-backend"]
        build-backend = "ib_tree_backend"
        """)
        + tool
    )
    (package / "__init__.py").write_text("VALUE = 1\n")
    (package / "data.txt").write_text("shipped\n")
    (package / ".env").write_text("DATABASE_PASSWORD=hunter2\n")
    (package / "id_rsa").write_text(PEM_KEY)
    (package / ".npmrc").write_text("//registry.npmjs.org/:_authToken=npm_secret\n")
    return root


def _members(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def _policy(project: Path) -> SourcePolicy:
    import tomllib

    table = tomllib.loads((project / "pyproject.toml").read_text()).get("tool", {})
    return source_policy(parse_settings(table.get("imgbuild", {})))


def test_secrets_in_the_package_are_refused_in_one_line(
    envs: BuildEnvironments, tmp_path: Path
) -> None:
    project = secret_project(tmp_path / "project")
    out = tmp_path / "out"
    with pytest.raises(ProjectError) as info:
        build_project_wheel(project, out, source_date_epoch=0, envs=envs, policy=_policy(project))
    text = str(info.value)
    assert "\n" not in text
    assert text == (
        f"{project}: the wheel would put demo_app/.env in the image, which looks like an "
        "environment file (and 2 more: demo_app/.npmrc, demo_app/id_rsa); leave it out with "
        ".dockerignore or [tool.imgbuild] exclude in pyproject.toml, or ship it with "
        '[tool.imgbuild] allow-secrets = ["demo_app/.env"]'
    )
    assert list(out.iterdir()) == []  # the refused wheel is not left behind
    # Without a policy (other callers), the backend's wheel is taken as it is.
    wheel = build_project_wheel(project, tmp_path / "plain", source_date_epoch=0, envs=envs)
    assert "demo_app/.env" in _members(wheel)


@pytest.mark.parametrize(
    "how",
    [
        "dockerignore",
        "exclude",
    ],
)
def test_excluded_secrets_never_reach_the_backend(
    envs: BuildEnvironments, tmp_path: Path, how: str
) -> None:
    patterns = ["**/.env", "**/id_rsa", "src/demo_app/.npmrc"]
    tool = "" if how == "dockerignore" else f"\n[tool.imgbuild]\nexclude = {patterns!r}\n"
    project = secret_project(tmp_path / "project", tool=tool.replace("'", '"'))
    if how == "dockerignore":
        (project / ".dockerignore").write_text("# secrets\n" + "\n".join(patterns) + "\n")
    wheel = build_project_wheel(
        project, tmp_path / "out", source_date_epoch=0, envs=envs, policy=_policy(project)
    )
    members = _members(wheel)
    assert {"demo_app/__init__.py", "demo_app/data.txt"} <= members
    assert not {"demo_app/.env", "demo_app/id_rsa", "demo_app/.npmrc"} & members
    assert (project / "src" / "demo_app" / ".env").is_file()  # the source is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".source-")] == []


def test_allowed_by_name_it_ships(envs: BuildEnvironments, tmp_path: Path) -> None:
    tool = (
        '\n[tool.imgbuild]\nexclude = ["**/.env", "**/.npmrc"]\n'
        'allow-secrets = ["demo_app/id_rsa"]\n'
    )
    project = secret_project(tmp_path / "project", tool=tool)
    wheel = build_project_wheel(
        project, tmp_path / "out", source_date_epoch=0, envs=envs, policy=_policy(project)
    )
    assert "demo_app/id_rsa" in _members(wheel)
    assert "demo_app/.env" not in _members(wheel)


def test_a_filtered_build_is_reproducible(envs: BuildEnvironments, tmp_path: Path) -> None:
    project = secret_project(tmp_path / "project")
    (project / ".dockerignore").write_text("**/.env\n**/id_rsa\n**/.npmrc\n")
    policy = _policy(project)
    first = build_project_wheel(
        project, tmp_path / "a", source_date_epoch=0, envs=envs, policy=policy
    )
    second = build_project_wheel(
        project, tmp_path / "b", source_date_epoch=0, envs=envs, policy=policy
    )
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize(
    ("tool", "message"),
    [
        ("exclude = true", "tool.imgbuild.exclude: expected a list of strings, got True"),
        ("allow-secrets = [1]", "tool.imgbuild.allow-secrets: expected a list of strings, got [1]"),
    ],
)
def test_bad_settings(tool: str, message: str) -> None:
    import tomllib

    with pytest.raises(ProjectError) as info:
        parse_settings(tomllib.loads(tool))
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------
# Credentials in URLs never reach a message

REALM = "https://robot:s3cret-pass@auth.example/token"


def _registry_answering(token_reply: httpx.Response | Exception) -> httpx.Client:
    """A registry on registry.example whose Bearer realm carries a user and password."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            if isinstance(token_reply, Exception):
                raise token_reply
            return token_reply
        challenge = f'Bearer realm="{REALM}",service="registry.example"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    return httpx.Client(transport=httpx.MockTransport(handle))


@pytest.mark.parametrize(
    ("token_reply", "shown"),
    [
        (httpx.Response(500, text=f"upstream {REALM} failed"), "registry error pulling"),
        (httpx.Response(401, json={"errors": [{"code": "DENIED", "message": REALM}]}), "unauth"),
        (httpx.Response(200, json={"no": "token"}), "returned no token"),
        (httpx.ConnectError(f"cannot reach {REALM}"), "cannot connect"),
        (httpx.ReadError(f"reset by {REALM}"), "ReadError"),
    ],
)
def test_registry_messages_redact_credentials(
    token_reply: httpx.Response | Exception, shown: str, tmp_path: Path
) -> None:
    ref = ImageReference.parse("registry.example/team/app:1")
    with _registry_answering(token_reply) as http, pytest.raises(RegistryError) as info:
        RegistryClient(http).pull_image(ref, store=BlobStore(tmp_path / "store"))
    text = str(info.value)
    assert shown in text and "\n" not in text
    assert "s3cret-pass" not in text and "robot:" not in text
    assert "https://***@auth.example/token" in text
