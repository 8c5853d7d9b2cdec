"""The SBOM on a real registry (Debian's docker-registry 2.8: no referrers API, so the
fallback tag), and ``imgbuild verify`` against a pushed image and an OCI layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.fixtures.docker_engine import TestInfra
from tests.integration.conftest import MakeProject, imgbuild

pytestmark = pytest.mark.docker

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _get(registry: str, repo: str, what: str, accept: str = MANIFEST) -> httpx.Response:
    return httpx.get(f"http://{registry}/v2/{repo}/{what}", headers={"Accept": accept})


def test_a_pushed_image_carries_its_sbom_as_a_referrer_by_the_fallback_tag(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    registry, repo = docker_env.registry, "imgbuild-test/sbom-app"
    ref = f"{registry}/{repo}:1"
    args = ("build", project, "--tag", ref, "--output", "registry", "--cache-dir", tmp_path / "c")
    built = imgbuild(*args)
    assert built.exit_code == 0, built.stderr
    image = _get(registry, repo, "manifests/1")
    subject = image.headers["Docker-Content-Digest"]
    assert "attached SBOM sha256:" in built.stdout
    assert f"(tag sha256-{subject[7:]})" in built.stdout

    # The registry has no referrers API; the spec's fallback tag lists the SBOM.
    assert _get(registry, repo, f"referrers/{subject}").status_code == 404
    fallback = _get(registry, repo, f"manifests/sha256-{subject[7:]}", INDEX)
    assert fallback.status_code == 200, fallback.text
    (entry,) = fallback.json()["manifests"]
    assert entry["artifactType"] == "application/vnd.cyclonedx+json"
    artifact = _get(registry, repo, f"manifests/{entry['digest']}").json()
    assert artifact["subject"]["digest"] == subject
    (layer,) = artifact["layers"]
    sbom = httpx.get(f"http://{registry}/v2/{repo}/blobs/{layer['digest']}").json()
    names = {c["name"] for c in sbom["components"]}
    assert names == {"demo-app", "colours", "greeting"}

    # Pushing the same image again: the same digest, and still one referrer.
    again = imgbuild(*args)
    assert again.exit_code == 0, again.stderr
    assert _get(registry, repo, "manifests/1").headers["Docker-Content-Digest"] == subject
    fallback = _get(registry, repo, f"manifests/sha256-{subject[7:]}", INDEX)
    assert [m["digest"] for m in fallback.json()["manifests"]] == [entry["digest"]]
    # The same document is in the image, at the documented path.
    out = docker_env.client.containers.run(
        ref,
        ["-c", "import sys; print(open(sys.prefix + '/sbom.cdx.json').read())"],
        entrypoint="/app/.venv/bin/python",
        network_mode="none",
        remove=True,
    )
    assert json.loads(bytes(out)) == sbom
    docker_env.client.images.remove(ref, force=True)


def test_verify_passes_on_the_unchanged_project_and_names_the_changed_file(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    ref = f"{docker_env.registry}/imgbuild-test/verify-app:1"
    cache = tmp_path / "cache"
    built = imgbuild("build", project, "--tag", ref, "--push", "--cache-dir", cache)
    assert built.exit_code == 0, built.stderr
    digest = _get(docker_env.registry, "imgbuild-test/verify-app", "manifests/1").headers[
        "Docker-Content-Digest"
    ]

    # In-process, against the registry, from a fresh cache: identical.
    same = imgbuild("verify", ref, project, "--cache-dir", tmp_path / "fresh")
    assert same.exit_code == 0, same.stderr
    assert same.stdout == f"identical: {ref} is {digest}, and so is the rebuild\n"

    # A real subprocess, after a one-line change: exit 1, the project layer and the file.
    source = project / "src" / "demo_app" / "__init__.py"
    source.write_text(source.read_text().replace('"image"', '"verifier"'))
    env = {**os.environ, "DOCKER_HOST": docker_env.docker_host}
    proc = subprocess.run(
        [sys.executable, "-m", "imagebuild", "verify", ref, str(project), "--cache-dir", cache],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"differs: {ref} is {digest}, the rebuild is sha256:")
    assert "(imgbuild: project demo-app 0.1.0)" in lines[1]
    changed = [line.removeprefix("  changed: ") for line in lines[2:]]
    site = "app/.venv/lib/python3.13/site-packages"  # distroless's Python
    # The source, its bytecode (the pyc holds the source's hash) and the RECORD that hashes
    # the source; nothing else.
    assert changed == [
        f"{site}/demo_app-0.1.0.dist-info/RECORD",
        f"{site}/demo_app/__init__.py",
        f"{site}/demo_app/__pycache__/__init__.cpython-313.pyc",
    ]


def test_verify_reads_an_oci_layout_and_refuses_what_is_not_one(
    docker_env: TestInfra, make_project: MakeProject, tmp_path: Path
) -> None:
    project = make_project()
    layout = tmp_path / "layout"
    cache = tmp_path / "cache"
    built = imgbuild("build", project, "--output", f"oci:{layout}", "--cache-dir", cache)
    assert built.exit_code == 0, built.stderr
    same = imgbuild("verify", f"oci:{layout}", project, "--cache-dir", cache)
    assert same.exit_code == 0 and same.stdout.startswith("identical: "), same.stderr
    bad = imgbuild("verify", f"oci:{tmp_path / 'nothing'}", project, "--cache-dir", cache)
    assert bad.exit_code == 1
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith(f"error: oci:{tmp_path / 'nothing'}: not an OCI image layout")
