"""Benchmark imgbuild against the anchor: uv's documented multi-stage Dockerfile.

Run on demand (not part of the test suite), with the private engine and registry up
(``dev/infra.sh up``):

    .venv/bin/python benchmarks/build.py [--project NAME]... [--keep]

Projects (all three by default): ``fastapi-service`` (the example, 17 packages),
``scientific-stack`` (numpy, pandas, scipy, matplotlib, scikit-learn: 19 packages, a venv of
hundreds of MB) and ``data-platform`` (a notebook server, a task queue and cloud clients:
a lock of 173 packages); on demand, ``ml-stack`` (PyTorch from PyPI with its CUDA stack:
31 packages, 3.2 GB). Both tools build the same copy of each project on the same base
(``127.0.0.1:5055/library/python:3.11-slim-bookworm``), and the script prints one table:

1. cold build time: empty caches (a fresh imgbuild --cache-dir and uv cache;
   ``docker builder prune -af`` for the anchor), measured on two clean builds;
2. warm rebuild time after a one-line change in the project's source; for imgbuild also
   through its resident server, as a terminal gets it by default (``IMGBUILD_SERVER=1``
   here: started, two earlier changes built through it, then the change, against the
   anchor's same warm rebuild); the other rows run without it (``IMGBUILD_SERVER=0``), as
   scripts and CI do;
3. bytes that would be re-pushed after that change: the summed (compressed) sizes of the
   layers whose digest is not in the image built before the change;
4. peak memory of the cold and the warm builds: resident, and charged with the page cache
   (cgroup v1 memory controllers, see MEMORY_CGROUPS below);
5. whether the two clean builds give the same image digest;
6. the CI scenario: a runner with empty local caches whose registry holds an earlier run's
   cache (imgbuild: ``--cache-to``/``--cache-from``; the anchor: BuildKit's inline cache,
   ``BUILDKIT_INLINE_CACHE=1`` and ``--cache-from``), after the same one-line change: time,
   and the layers (and bytes) that are new to the registry; then the same run as a CI
   pipeline that publishes its image has it: the image pushed to the repository that
   holds the earlier run's (imgbuild: ``--push`` alone; the anchor: ``docker build``,
   then ``docker push``), timed to the end of the push;
7. one locked dependency bumped (``uv lock --upgrade-package``) and one added: how many
   layers change, and their bytes.

See benchmarks/README.md for what is and is not measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import httpx

REPO = Path(__file__).resolve().parent.parent
INFRA_ENV = Path("/run/imgbuild-infra/env")
DOCKER = "/usr/bin/docker"  # the engine's own client (the first `docker` on PATH wants buildx)
BASE_REF = "{registry}/library/python:3.11-slim-bookworm"
TOOLS_TAG = "imgbuild-bench-tools:latest"
REGISTRY_CACHE = "{registry}/imgbuild-bench/cache"
ANCHOR_REPO = "imgbuild-bench-anchor"


@dataclass(frozen=True)
class Project:
    path: Path  # relative to the repository
    script: str  # the console script the image runs
    self_test: tuple[str, ...]  # its arguments for a run that proves the image works
    source: Path  # the file the one-line change edits
    change: tuple[str, str]  # that line, before and after
    bump: tuple[str, str]  # a locked package, and an older version both tools start from
    add: str = "tabulate"  # a dependency added to the project


PROJECTS = {
    "fastapi-service": Project(
        Path("examples/fastapi-service"), "hello-api", ("--self-test",),
        Path("src/hello_api/main.py"),
        ('"message": f"Hello, {name}!"', '"message": f"Hi there, {name}!"'),
        ("idna", "3.6"),
    ),
    "scientific-stack": Project(
        Path("benchmarks/projects/scientific-stack"), "sciapp", (),
        Path("src/sciapp/cli.py"), ('print(f"slope', 'print(f"fitted slope'),
        ("packaging", "24.2"),
    ),
    "data-platform": Project(
        Path("benchmarks/projects/data-platform"), "dataplat", (),
        Path("src/dataplat/cli.py"), ('print(" ".join(', 'print("clients:", " ".join('),
        ("idna", "3.6"),
    ),
    # Not in the default run: about 3 GB of wheels per cold build, for each tool.
    "ml-stack": Project(
        Path("benchmarks/projects/ml-stack"), "mlapp", (),
        Path("src/mlapp/cli.py"), ('print("mlapp"', 'print("model server"'),
        ("fsspec", "2025.9.0"),
    ),
}  # fmt: skip
DEFAULT_PROJECTS = ("fastapi-service", "scientific-stack", "data-platform")

# uv's "Using uv in Docker" guide, multi-stage with intermediate layers. The only departures:
# uv and the host's CA bundle (the TLS-intercepting PyPI proxy) come from a local image
# (TOOLS_TAG, standing in for ghcr.io/astral-sh/uv, which is unreachable here), the base is
# the local registry's, and there is no `# syntax=` line (it would pull a frontend image).
ANCHOR_DOCKERFILE = """\
FROM {base} AS builder
COPY --from={tools} /uv /bin/uv
COPY --from={tools} /ca-certificates.crt /etc/ssl/certs/host-ca-certificates.crt
ENV SSL_CERT_FILE=/etc/ssl/certs/host-ca-certificates.crt
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=0
WORKDIR /app
RUN --mount=type=cache,target=/root/.cache/uv \\
    --mount=type=bind,source=uv.lock,target=uv.lock \\
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \\
    uv sync --locked --no-install-project --no-dev
COPY . /app
RUN --mount=type=cache,target=/root/.cache/uv \\
    uv sync --locked --no-dev

FROM {base}
COPY --from=builder /app /app
ENV PATH="/app/.venv/bin:$PATH"
WORKDIR /app
ENTRYPOINT ["{script}"]
"""


@dataclass(frozen=True)
class Layer:
    digest: str  # what a registry would name the pushed blob (imgbuild) / the diff ID (anchor)
    size: int  # bytes a push would send (compressed)


@dataclass(frozen=True)
class Build:
    seconds: float
    digest: str  # imgbuild: manifest digest; anchor: image ID (config digest; no manifest locally)
    layers: tuple[Layer, ...]
    memory: int | None = None  # peak bytes charged to the build's memory cgroup, if measurable
    resident: int | None = None  # peak resident bytes in that cgroup, sampled every 10 ms


# Memory is read from cgroup v1 memory controllers: the peak charged (resident memory and the
# page cache of files written) while the build's own processes run. imgbuild runs in a fresh
# cgroup of its own; the anchor's RUN steps run in BuildKit's (docker/buildkit), emptied
# before each build. Outside both: the engine itself, and imgbuild's compile container.
MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")
BUILDKIT_CGROUP = MEMORY_CGROUPS / "docker" / "buildkit"


def reset_peak(cgroup: Path) -> None:
    """Reclaim what the cgroup holds from earlier builds, then restart its peak."""
    for name in ("memory.force_empty", "memory.max_usage_in_bytes"):
        try:
            (cgroup / name).write_text("0")
        except OSError:
            pass  # busy or absent: the peak then includes what is left


def read_peak(cgroup: Path) -> int | None:
    try:
        return int((cgroup / "memory.max_usage_in_bytes").read_text())
    except (OSError, ValueError):
        return None


class ResidentSampler(threading.Thread):
    """The largest resident memory (anonymous plus mapped files) of a cgroup's processes,
    read from ``memory.stat`` every 10 ms while a build runs. cgroup v1 keeps no peak of
    this part, and the charged peak also counts the page cache of every file written."""

    def __init__(self, cgroup: Path) -> None:
        super().__init__(daemon=True)
        self.cgroup = cgroup
        self.peak: int | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.01):
            try:
                stat = dict(
                    line.split() for line in (self.cgroup / "memory.stat").read_text().splitlines()
                )
            except (OSError, ValueError):
                continue
            now = int(stat.get("total_rss", 0)) + int(stat.get("total_mapped_file", 0))
            self.peak = max(self.peak or 0, now)

    def stop(self) -> int | None:
        self._done.set()
        self.join()
        return self.peak


@dataclass(frozen=True)
class Change:
    build: Build  # the rebuild after the change
    new: tuple[Layer, ...]  # its layers the image before it did not have (what a push sends)


@dataclass(frozen=True)
class Result:
    cold: tuple[Build, Build]  # two clean builds of the unchanged project
    warm: Build  # rebuild after the one-line change, caches from cold[1]
    repushed: tuple[Layer, ...]  # layers of `warm` that `cold[1]` does not have
    ci: Change  # the one-line change again, on a runner with empty caches, registry cache
    published: Build  # that CI run again, its image pushed (build and push, timed together)
    bump: Change  # one locked dependency moved to its newest version
    add: Change  # one dependency added
    notes: tuple[str, ...] = ()
    served: Build | None = None  # imgbuild: the change again, through the resident server


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None, quiet: bool = True) -> str:
    """Run ``cmd`` (check=True) and return its stdout; show stderr only when it fails."""
    try:
        proc = subprocess.run(list(cmd), env=env, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        sys.stderr.write(f"$ {' '.join(cmd)}\n{exc.stdout}{exc.stderr}")
        raise
    if not quiet:
        sys.stderr.write(proc.stderr)
    return proc.stdout


def timed(cmd: Sequence[str], *, env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    out = run(cmd, env=env)
    return time.perf_counter() - start, out


def compile_imgbuild(env: dict[str, str]) -> None:
    """Give imgbuild's environment its bytecode, as ``pip install`` would.

    A shell with ``PYTHONDONTWRITEBYTECODE`` set (this one has it) would otherwise compile
    every module imgbuild imports on every run, which no installed tool does.
    """
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    site = next((REPO / ".venv/lib").glob("python3.*/site-packages"))
    run([sys.executable, "-m", "compileall", "-q", "-j0", str(site), str(REPO / "imagebuild")])


def infra_env() -> dict[str, str]:
    """os.environ plus /run/imgbuild-infra/env (``export K=V`` lines) and DOCKER_HOST."""
    env = dict(os.environ)
    if INFRA_ENV.exists():
        for line in INFRA_ENV.read_text().splitlines():
            key, sep, value = line.removeprefix("export ").partition("=")
            if sep and key.strip() not in env:
                env[key.strip()] = value.strip().strip("'\"")
    for key in ("IMGBUILD_TEST_DOCKER_HOST", "IMGBUILD_TEST_REGISTRY", "IMGBUILD_REGISTRY_MIRRORS"):
        if key not in env:
            sys.exit(f"{key} is not set: start the engine and registry with 'dev/infra.sh up'")
    env["DOCKER_HOST"] = env["IMGBUILD_TEST_DOCKER_HOST"]
    return env


def uv_binary() -> Path:
    """The real uv executable (PATH may hold a pyenv shim script instead)."""
    found = shutil.which("uv")
    if found is None:
        sys.exit("uv is not on PATH ('pip install uv')")
    path = Path(found).resolve()
    if path.read_bytes()[:4] != b"\x7fELF":
        path = Path(run(["pyenv", "which", "uv"]).strip()).resolve()
    return path


def copy_project(example: Path, dest: Path) -> Path:
    shutil.copytree(
        example,
        dest,
        ignore=shutil.ignore_patterns(".venv", "__pycache__", ".pytest_cache", "*.egg-info"),
    )
    return dest


def make_one_line_change(project: Path, spec: Project) -> None:
    path = project / spec.source
    old, new = spec.change
    text = path.read_text()
    if text.count(old) != 1:
        sys.exit(f"{path}: expected exactly one {old!r} to change")
    path.write_text(text.replace(old, new))


def digest_and_gzip_size(stream: IO[bytes]) -> tuple[str, int]:
    """The sha256 of ``stream``, and its size gzipped at level 6, as `docker push` (Go's
    default level) would; read a piece at a time (an ML stack's layer is gigabytes)."""
    digest = hashlib.sha256()
    deflate = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: with a gzip header and trailer
    size = 0
    while piece := stream.read(1 << 20):
        digest.update(piece)
        size += len(deflate.compress(piece))
    return "sha256:" + digest.hexdigest(), size + len(deflate.flush())


# -- imgbuild ----------------------------------------------------------------------------------


def forget_memory_trees() -> None:
    """Remove the bases imgbuild keeps unpacked in memory (``cache.rootfs_home``), and the
    build environments its caches keep there (``cache.build_envs_memory``).

    The bases are kept outside the cache directory, by base, for every later build of the
    user: a cold build, or a fresh CI runner, starts without them. The environments are
    each cache's own (a new cache directory has none): removed so memory does not fill.
    """
    memory = Path("/dev/shm") / f"imgbuild-{os.getuid()}"
    for name in ("rootfs", "build-envs"):
        shutil.rmtree(memory / name, ignore_errors=True)


class Imgbuild:
    """imgbuild with its own cache directory (and uv cache, for the project's wheel build)."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.runs = 0
        self.cache: Path | None = None

    def build(
        self,
        project: Path,
        *,
        cold: bool,
        extra: Sequence[str] = (),
        served: bool = False,
        server: Path | None = None,
        pushed: str | None = None,
    ) -> Build:
        """``cold``: a new, empty cache (kept for the builds after it). ``served``: through
        the resident server (``served``); ``server``: its cgroup, whose memory is then the
        build's. ``pushed``: the image is only pushed there (``--push``), no layout written."""
        self.runs += 1
        if cold or self.cache is None:
            self.cache = self.workdir / f"imgbuild-cache-{self.runs}"
            forget_memory_trees()
        out = self.workdir / f"imgbuild-oci-{self.runs}"
        # The project's wheel is built through `build` with uv installing hatchling: keep that
        # cache next to imgbuild's, so a cold build really starts from nothing.
        env = {**self.env, "UV_CACHE_DIR": str(self.cache / "uv"), **self.server_env(served)}
        output = ["--output", f"oci:{out}"] if pushed is None else ["--push", "--tag", pushed]
        cmd = [
            str(REPO / ".venv/bin/imgbuild"), "build", str(project),
            "--base", "debian-slim", "--python", "3.11", "--locked",
            "--cache-dir", str(self.cache), *output, *extra,
        ]  # fmt: skip
        cgroup = MEMORY_CGROUPS / f"imgbuild-bench-{os.getpid()}-{self.runs}"
        try:
            cgroup.mkdir()
            # The shell joins the cgroup, then becomes imgbuild: every child is counted.
            cmd = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *cmd]
        except OSError:
            cgroup = None  # type: ignore[assignment]  # no cgroup v1 memory controller here
        # Served, the build runs in the server's processes: its memory is counted there.
        measured = server if server is not None else cgroup
        if server is not None:
            reset_peak(server)
        sampler = ResidentSampler(measured) if measured is not None else None
        if sampler is not None:
            sampler.start()
        seconds, stdout = timed(cmd, env=env)
        memory = resident = None
        if measured is not None and sampler is not None:
            resident = sampler.stop()
            memory = read_peak(measured)
        if cgroup is not None:
            reset_peak(cgroup)
            cgroup.rmdir()
        digest = stdout.strip().splitlines()[-1].removeprefix("digest: ")
        layers = self.layers(out, digest) if pushed is None else pushed_layers(pushed, digest)
        return Build(seconds, digest, layers, memory, resident)

    def server_env(self, served: bool) -> dict[str, str]:
        """What sends builds to the resident server (its directory in the work directory)."""
        if not served:
            return {"IMGBUILD_SERVER": "0"}
        return {"IMGBUILD_SERVER": "1", "IMGBUILD_SERVER_DIR": str(self.workdir / "server")}

    def served(self, project: Path, spec: Project) -> Build:
        """A one-line change built through the resident server (``IMGBUILD_SERVER=1``), as a
        developer rebuilding in a terminal has it: started, then two earlier changes built
        through it (the first starts the backend's resident process, the second teaches it
        what the backend imports). The project is left as it was."""
        cgroup = MEMORY_CGROUPS / f"imgbuild-bench-server-{os.getpid()}"
        env = {**self.env, **self.server_env(True)}
        imgbuild = str(REPO / ".venv/bin/imgbuild")
        try:
            cgroup.mkdir()
            # The server joins the cgroup, with every process a build of its starts.
            start = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup)]
        except OSError:
            cgroup, start = None, []  # type: ignore[assignment]
        run([*start, imgbuild, "server", "start"], env=env)
        source = project / spec.source
        text = source.read_text()
        try:
            for n in (1, 2):
                source.write_text(f"{text}# an earlier change, {n}\n")
                self.build(project, cold=False, served=True, server=cgroup)
            old, new = spec.change
            source.write_text(text.replace(new, old))  # the same line, changed back
            return self.build(project, cold=False, served=True, server=cgroup)
        finally:
            source.write_text(text)
            run([imgbuild, "server", "stop"], env=env)
            if cgroup is not None:
                deadline = time.monotonic() + 30
                while (cgroup / "cgroup.procs").read_text().strip():
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                try:
                    cgroup.rmdir()
                except OSError:
                    pass

    @staticmethod
    def layers(layout: Path, digest: str) -> tuple[Layer, ...]:
        index = json.loads((layout / "index.json").read_text())
        assert index["manifests"][0]["digest"] == digest, "index.json and stdout disagree"
        blob = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
        manifest = json.loads(blob.read_text())
        return tuple(Layer(layer["digest"], layer["size"]) for layer in manifest["layers"])


# -- anchor: uv's Dockerfile through BuildKit --------------------------------------------------


class Anchor:
    """`docker build` (BuildKit, the engine's builtin Dockerfile frontend) of ANCHOR_DOCKERFILE."""

    def __init__(self, env: dict[str, str], workdir: Path, spec: Project) -> None:
        self.env = {**env, "DOCKER_BUILDKIT": "1"}
        self.spec = spec
        self.docker = [DOCKER, "-H", env["DOCKER_HOST"]]
        self.workdir = workdir
        self.base = BASE_REF.format(registry=env["IMGBUILD_TEST_REGISTRY"])
        self.dockerfile = workdir / "anchor.Dockerfile"
        self.dockerfile.write_text(
            ANCHOR_DOCKERFILE.format(base=self.base, tools=TOOLS_TAG, script=spec.script)
        )
        self.tags: list[str] = []
        self.runs = 0
        self.last_tag = ""
        self.gzipped: dict[str, int] = {}  # diff ID -> gzipped size, of the layers seen
        self.base_was_present = self._exists(self.base)
        self.forget_imgbuild_bases()
        self.build_tools_image()

    def forget_imgbuild_bases(self) -> None:
        """Untag the bases imgbuild loaded into the engine (``imgbuild-base:*``).

        ``--output docker`` (``bash dev/demo``, the tests) leaves the base there under that
        tag, and then the anchor's cold and CI builds found its layers without pulling them:
        an empty runner has no such image. imgbuild's builds here never use the engine, and a
        later ``--output docker`` build loads the base again.
        """
        listed = run([*self.docker, "images", "--format", "{{.Repository}}:{{.Tag}}"], env=self.env)
        ours = sorted(ref for ref in listed.split() if ref.startswith("imgbuild-base:"))
        if ours:
            run([*self.docker, "rmi", *ours], env=self.env)
            print(
                f"anchor: untagged {', '.join(ours)} (imgbuild's bases in the engine)",
                file=sys.stderr,
            )

    def _exists(self, ref: str) -> bool:
        proc = subprocess.run(
            [*self.docker, "image", "inspect", ref], env=self.env, capture_output=True, check=False
        )
        return proc.returncode == 0

    def build_tools_image(self) -> None:
        """A FROM-scratch image with uv and the host's CA bundle: our ghcr.io/astral-sh/uv."""
        context = self.workdir / "tools"
        context.mkdir(exist_ok=True)
        shutil.copy2(uv_binary(), context / "uv")
        shutil.copy2(self.env.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
                     context / "ca-certificates.crt")  # fmt: skip
        (context / "Dockerfile").write_text(
            "FROM scratch\nCOPY uv /uv\nCOPY ca-certificates.crt /ca-certificates.crt\n"
        )
        run([*self.docker, "build", "-q", "-t", TOOLS_TAG, str(context)], env=self.env)
        self.tags.append(TOOLS_TAG)

    def make_cold(self) -> None:
        """Empty BuildKit's cache (layers, cache mounts, the pulled base) and unused images."""
        for tag in [t for t in self.tags if t.startswith(ANCHOR_REPO)]:
            run([*self.docker, "rmi", tag], env=self.env)
            self.tags.remove(tag)
        if not self.base_was_present and self._exists(self.base):  # never someone else's tag
            run([*self.docker, "rmi", self.base], env=self.env)
        run([*self.docker, "builder", "prune", "-af"], env=self.env)

    def build(self, project: Path, *, cold: bool, extra: Sequence[str] = ()) -> Build:
        self.runs += 1
        tag = self.last_tag = f"{ANCHOR_REPO}:{self.runs}"
        if cold:
            self.make_cold()
        cmd = [
            *self.docker, "build", "--network", "host", "--progress", "plain",
            "-f", str(self.dockerfile), "-t", tag, *extra, str(project),
        ]  # fmt: skip
        reset_peak(BUILDKIT_CGROUP)
        sampler = ResidentSampler(BUILDKIT_CGROUP)
        sampler.start()
        seconds, _ = timed(cmd, env=self.env)
        resident = sampler.stop()
        memory = read_peak(BUILDKIT_CGROUP)
        self.tags.append(tag)
        image_id = run([*self.docker, "image", "inspect", "-f", "{{.Id}}", tag], env=self.env)
        return Build(seconds, image_id.strip(), self.layers(tag), memory, resident)

    def layers(self, tag: str) -> tuple[Layer, ...]:
        """The image's layers: diff IDs, and sizes gzipped as a push would.

        Only layers not seen before in this run are read (from `docker save`).
        """
        fmt = "{{json .RootFS.Layers}}"
        diff_ids = json.loads(run([*self.docker, "image", "inspect", "-f", fmt, tag], env=self.env))
        if any(diff_id not in self.gzipped for diff_id in diff_ids):
            archive = self.workdir / "anchor-save.tar"
            run([*self.docker, "save", "-o", str(archive), tag], env=self.env)
            with tarfile.open(archive) as tar:
                manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
                for name, diff_id in zip(manifest[0]["Layers"], diff_ids, strict=True):
                    if diff_id in self.gzipped:
                        continue
                    layer = tar.extractfile(name)
                    assert layer is not None
                    digest, size = digest_and_gzip_size(layer)
                    if digest != diff_id:
                        sys.exit(f"{tag}: docker save's {name} is not layer {diff_id}")
                    self.gzipped[diff_id] = size
            archive.unlink()
        return tuple(Layer(diff_id, self.gzipped[diff_id]) for diff_id in diff_ids)

    def push(self, tag: str, ref: str) -> None:
        """Tag ``tag`` as ``ref`` and push it (the registry then holds its inline cache)."""
        run([*self.docker, "tag", tag, ref], env=self.env)
        run([*self.docker, "push", ref], env=self.env)
        self.tags.append(ref)

    def build_and_push(self, project: Path, ref: str, extra: Sequence[str]) -> Build:
        """A build, then its image pushed as ``ref``: the time is the two together."""
        built = self.build(project, cold=False, extra=extra)
        start = time.perf_counter()
        self.push(self.last_tag, ref)
        seconds = built.seconds + time.perf_counter() - start
        self.forget(ref)  # (the tag held the base in the engine: the notes would count it)
        return replace(built, seconds=seconds)

    def forget(self, ref: str) -> None:
        """Drop ``ref`` from the engine (a CI runner starts without it)."""
        if self._exists(ref):
            run([*self.docker, "rmi", ref], env=self.env)
        if ref in self.tags:
            self.tags.remove(ref)

    def images_sharing_base(self, build: Build) -> list[str]:
        """Other local images holding the base layer: then a cold build does not pull it."""
        out = run([*self.docker, "images", "--format", "{{.Repository}}:{{.Tag}}"], env=self.env)
        refs = [
            ref for ref in out.split() if not ref.startswith(ANCHOR_REPO) and "<none>" not in ref
        ]
        if not refs:
            return []
        fmt = "{{json .RootFS.Layers}}"
        layers = run([*self.docker, "image", "inspect", "-f", fmt, *refs], env=self.env)
        base_layer = build.layers[0].digest
        return [
            ref for ref, line in zip(refs, layers.splitlines(), strict=True) if base_layer in line
        ]

    def self_test(self, tag: str) -> None:
        """The anchor image really serves (a broken Dockerfile would flatter it)."""
        run(
            [*self.docker, "run", "--rm", "--network", "none", tag, *self.spec.self_test],
            env=self.env,
        )

    def cleanup(self) -> None:
        for tag in reversed(self.tags):
            run([*self.docker, "rmi", tag], env=self.env)
        if not self.base_was_present and self._exists(self.base):
            run([*self.docker, "rmi", self.base], env=self.env)
        run([*self.docker, "builder", "prune", "-af"], env=self.env)


# -- the measurements --------------------------------------------------------------------------


def measure(tool: Imgbuild | Anchor, spec: Project, workdir: Path, name: str) -> Result:
    """Two clean builds of a copy of the project, then a warm rebuild after a one-line change,
    the same change on a CI runner with empty caches and the registry as its cache, and then
    one dependency bumped and one added."""
    project = copy_project(REPO / spec.path, workdir / f"{name}-project")
    relock(project, "--upgrade-package", f"{spec.bump[0]}=={spec.bump[1]}")
    cold = (tool.build(project, cold=True), tool.build(project, cold=True))
    print(f"  {name}: cold builds {cold[0].seconds:.1f}s, {cold[1].seconds:.1f}s", file=sys.stderr)
    seeded, ci_args = seed_registry_cache(tool, project, name)
    make_one_line_change(project, spec)
    warm = tool.build(project, cold=False)
    print(f"  {name}: warm rebuild {warm.seconds:.1f}s", file=sys.stderr)
    served = tool.served(project, spec) if isinstance(tool, Imgbuild) else None
    if served is not None:
        print(f"  {name}: warm rebuild through the server {served.seconds:.2f}s", file=sys.stderr)
    ci = ci_run(tool, project, ci_args)
    print(f"  {name}: CI run with the registry cache {ci.seconds:.1f}s", file=sys.stderr)
    published = publish_run(tool, project, ci_args)
    print(f"  {name}: the CI run, publishing {published.seconds:.1f}s", file=sys.stderr)
    relock(project, "--upgrade-package", spec.bump[0])
    bumped = tool.build(project, cold=False)
    add_dependency(project, spec.add)
    added = tool.build(project, cold=False)
    notes = []
    if isinstance(tool, Anchor):
        tool.self_test(tool.last_tag)
        if sharing := tool.images_sharing_base(cold[1]):
            notes.append(
                "anchor cold builds did not pull the base: its layer is in the engine's layer"
                f" store through {', '.join(sharing)} (not ours to delete); imgbuild's cold"
                " builds do fetch it from the registry"
            )
    return Result(
        cold,
        warm,
        new_layers(warm, cold[1]),
        Change(ci, new_layers(ci, seeded)),
        published,
        Change(bumped, new_layers(bumped, ci)),
        Change(added, new_layers(added, bumped)),
        tuple(notes),
        served,
    )


def new_layers(after: Build, before: Build) -> tuple[Layer, ...]:
    known = {layer.digest for layer in before.layers}
    return tuple(layer for layer in after.layers if layer.digest not in known)


def relock(project: Path, *args: str) -> None:
    """``uv lock`` in the project (other pins kept), as a developer would change the lock."""
    subprocess.run(
        [str(uv_binary()), "lock", "--quiet", *args],
        cwd=project, check=True, capture_output=True, timeout=600,
    )  # fmt: skip


def add_dependency(project: Path, requirement: str) -> None:
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    if "dependencies = [\n" not in text:
        sys.exit(f"{pyproject}: expected a multi-line dependencies list")
    pyproject.write_text(
        text.replace("dependencies = [\n", f'dependencies = [\n    "{requirement}",\n', 1)
    )
    relock(project)


def seed_registry_cache(
    tool: Imgbuild | Anchor, project: Path, name: str
) -> tuple[Build, list[str]]:
    """An earlier CI run that left its cache in the registry; the arguments that use it."""
    ref = f"{REGISTRY_CACHE.format(registry=tool.env['IMGBUILD_TEST_REGISTRY'])}-{name}"
    ref += f"-{os.getpid()}"
    if isinstance(tool, Imgbuild):
        # The earlier run also published its image there, as the anchor's does.
        seeded = tool.build(project, cold=False, extra=["--cache-to", ref])
        tool.build(project, cold=False, extra=["--cache-to", ref], pushed=f"{ref}:seed")
        return seeded, ["--cache-from", ref]
    inline = ["--build-arg", "BUILDKIT_INLINE_CACHE=1"]
    seeded = tool.build(project, cold=False, extra=inline)
    tool.push(tool.last_tag, f"{ref}:seed")
    return seeded, ["--cache-from", f"{ref}:seed", *inline]


def ci_run(
    tool: Imgbuild | Anchor, project: Path, ci_args: list[str], *, publish: str | None = None
) -> Build:
    """A runner with empty local caches and the registry cache of an earlier run.

    ``publish``: the image is pushed there too (the repository the earlier run's is in).
    """
    if isinstance(tool, Imgbuild):
        return tool.build(project, cold=True, extra=ci_args, pushed=publish)
    tool.make_cold()
    tool.forget(ci_args[1])
    if publish is not None:
        return tool.build_and_push(project, publish, ci_args)
    return tool.build(project, cold=False, extra=ci_args)


def publish_run(tool: Imgbuild | Anchor, project: Path, ci_args: list[str]) -> Build:
    """The CI run again, its image pushed to the repository the earlier run's is in.

    The builds after it go on from the CI run's caches (imgbuild's publishing runner holds
    none of the layers it mounted).
    """
    ref = f"{ci_args[1].removesuffix(':seed')}:ci"
    if not isinstance(tool, Imgbuild):
        return ci_run(tool, project, ci_args, publish=ref)
    kept = tool.cache
    try:
        return ci_run(tool, project, ci_args, publish=ref)
    finally:
        tool.cache = kept


def pushed_layers(ref: str, digest: str) -> tuple[Layer, ...]:
    """The layers of the manifest ``digest`` that ``ref``'s repository holds."""
    name, _, _ = ref.rpartition(":")
    registry, _, repository = name.partition("/")
    accept = "application/vnd.oci.image.manifest.v1+json"
    with httpx.Client(timeout=60) as http:
        answer = http.get(
            f"http://{registry}/v2/{repository}/manifests/{digest}", headers={"Accept": accept}
        )
    answer.raise_for_status()
    return tuple(Layer(layer["digest"], layer["size"]) for layer in answer.json()["layers"])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def memory_rows(
    ours: Result, anchor: Result, field: str, label: str
) -> list[tuple[str, str, str, str]]:
    """Two rows (the larger of the cold builds, the warm rebuild) for one memory figure."""

    def cold(r: Result) -> int | None:
        known = [getattr(b, field) for b in r.cold if getattr(b, field) is not None]
        return max(known) if known else None

    rows = []
    for name, mine, theirs in (
        ("cold", cold(ours), cold(anchor)),
        ("warm", getattr(ours.warm, field), getattr(anchor.warm, field)),
        *(
            [("warm, server", getattr(ours.served, field), getattr(anchor.warm, field))]
            if ours.served is not None
            else []
        ),
    ):
        rows.append((f"{label}, {name}", mib(mine), mib(theirs), ratio(mine or 0, theirs or 0)))
    return rows


def ratio(a: float, b: float) -> str:
    if not b:
        return "n/a"
    return f"{a / b:.2g} (1/{b / a:.0f})" if 0 < a / b < 0.1 else f"{a / b:.2f}"


def change_row(label: str, ours: Change, anchor: Change) -> tuple[str, str, str, str]:
    """A change's new layers: how many of the image's, and their (compressed) bytes."""

    def cell(change: Change) -> str:
        size = sum(layer.size for layer in change.new)
        return f"{len(change.new)}/{len(change.build.layers)} ({human(size)})"

    return (
        label,
        cell(ours),
        cell(anchor),
        ratio(sum(x.size for x in ours.new), sum(x.size for x in anchor.new)),
    )


def report(ours: Result, anchor: Result) -> str:
    def cold_mean(r: Result) -> float:
        return (r.cold[0].seconds + r.cold[1].seconds) / 2

    def pushed(r: Result) -> int:
        return sum(layer.size for layer in r.repushed)

    def same(r: Result) -> str:
        return "yes" if r.cold[0].digest == r.cold[1].digest else "no"

    rows = [
        ("metric", "imgbuild", "anchor", "imgbuild/anchor"),
        (
            "cold build, s (mean of 2)",
            f"{cold_mean(ours):.2f}",
            f"{cold_mean(anchor):.2f}",
            ratio(cold_mean(ours), cold_mean(anchor)),
        ),
        (
            "warm rebuild after 1-line change (no server), s",
            f"{ours.warm.seconds:.2f}",
            f"{anchor.warm.seconds:.2f}",
            ratio(ours.warm.seconds, anchor.warm.seconds),
        ),
        *(
            [
                (
                    "  the same, at a terminal (resident server), s",
                    f"{ours.served.seconds:.2f}",
                    f"{anchor.warm.seconds:.2f}",
                    ratio(ours.served.seconds, anchor.warm.seconds),
                )
            ]
            if ours.served is not None
            else []
        ),
        (
            "re-pushed after 1-line change",
            f"{human(pushed(ours))} ({len(ours.repushed)}/{len(ours.warm.layers)} layers)",
            f"{human(pushed(anchor))} ({len(anchor.repushed)}/{len(anchor.warm.layers)} layers)",
            ratio(pushed(ours), pushed(anchor)),
        ),
        (
            "CI run (empty caches, registry cache), s",
            f"{ours.ci.build.seconds:.2f}",
            f"{anchor.ci.build.seconds:.2f}",
            ratio(ours.ci.build.seconds, anchor.ci.build.seconds),
        ),
        change_row("CI run: new layers, bytes", ours.ci, anchor.ci),
        (
            "  the CI run, publishing (build and push), s",
            f"{ours.published.seconds:.2f}",
            f"{anchor.published.seconds:.2f}",
            ratio(ours.published.seconds, anchor.published.seconds),
        ),
        change_row("1 dependency bumped: new layers", ours.bump, anchor.bump),
        change_row("1 dependency added: new layers", ours.add, anchor.add),
        *memory_rows(ours, anchor, "resident", "peak resident memory"),
        *memory_rows(ours, anchor, "memory", "peak charged incl. page cache"),
        ("same digest from 2 clean builds", same(ours), same(anchor), ""),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [
        "",
        (
            f"cold builds, s: imgbuild {ours.cold[0].seconds:.2f} / {ours.cold[1].seconds:.2f},"
            f" anchor {anchor.cold[0].seconds:.2f} / {anchor.cold[1].seconds:.2f}"
        ),
        (
            f"re-pushed bytes exactly: imgbuild {pushed(ours)}, anchor {pushed(anchor)}"
            " (anchor: layer tars gzipped at level 6, as docker push would)"
        ),
        (
            "memory: from cgroup v1 memory controllers, imgbuild in a cgroup of its own, the"
            " anchor's RUN steps in BuildKit's (the engine itself and imgbuild's compile"
            " container are outside both); resident = anonymous + mapped files, sampled every"
            " 10 ms; charged = the controller's peak, which also counts the page cache of"
            " every file written (imgbuild writes the whole OCI layout each time); through the"
            " resident server, the server's cgroup (the server itself, the build it forked, the"
            " backend and compile processes it started)"
        ),
        (
            "resident server: started, two earlier one-line changes built through it (the"
            " backend's resident process starts and learns its imports), then the measured"
            " change; the caller's imgbuild process is what is timed"
        ),
        "clean-build digests:",
        f"  imgbuild (manifest) {ours.cold[0].digest}",
        f"                      {ours.cold[1].digest}",
        f"  anchor (image ID)   {anchor.cold[0].digest}",
        f"                      {anchor.cold[1].digest}",
    ]
    diff = [
        i
        for i, (a, b) in enumerate(zip(anchor.cold[0].layers, anchor.cold[1].layers, strict=False))
        if a.digest != b.digest
    ]
    lines.append(
        f"  anchor layers that differ between the clean builds: {diff or 'none'}"
        f" of {len(anchor.cold[0].layers)} (0 = base)"
    )
    lines += [f"note: {note}" for note in ours.notes + anchor.notes]
    return "\n".join(lines)


def describe_setup() -> str:
    """The imgbuild revision (working trees change under a benchmark) and the machine."""
    commit = run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
    dirty = run(["git", "-C", str(REPO), "status", "--porcelain", "--", "imagebuild"]).strip()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        "unknown CPU",
    )  # fmt: skip
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        f"{when}; imgbuild {commit}{' + uncommitted changes in imagebuild/' if dirty else ''};"
        f" {os.cpu_count()} cores, {cpu}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--project",
        action="append",
        choices=sorted(PROJECTS),
        help=f"repeatable; default: {', '.join(DEFAULT_PROJECTS)}",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    env = infra_env()
    compile_imgbuild(env)
    print(describe_setup())
    for name in args.project or DEFAULT_PROJECTS:
        print(f"\n## {name}\n")
        print(report(*measure_both(env, PROJECTS[name], keep=args.keep)))
        sys.stdout.flush()


def measure_both(env: dict[str, str], spec: Project, *, keep: bool) -> tuple[Result, Result]:
    """imgbuild, then the anchor, on one project (one work directory)."""
    workdir = Path(tempfile.mkdtemp(prefix="imgbuild-bench-"))
    print(f"work directory: {workdir}", file=sys.stderr)
    anchor = None
    try:
        print(f"{spec.path}: imgbuild ...", file=sys.stderr)
        ours = measure(Imgbuild(env, workdir), spec, workdir, "imgbuild")
        # Measured: its caches and layouts go, so that the anchor's builds have the disk
        # (an ML stack's run holds about 20 GB of them, the anchor's about 55 GB).
        for left in workdir.glob("imgbuild-*"):
            shutil.rmtree(left, ignore_errors=True)
        forget_memory_trees()
        print(f"{spec.path}: anchor (uv's Dockerfile) ...", file=sys.stderr)
        anchor = Anchor(env, workdir, spec)
        theirs = measure(anchor, spec, workdir, "anchor")
    finally:
        if anchor is not None:
            anchor.cleanup()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
            forget_memory_trees()
            forget_pushed(env)
    return ours, theirs


MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


def forget_pushed(env: dict[str, str]) -> None:
    """Delete the manifests this run tagged in the test registry (its cache repositories).

    A run pushes gigabytes there (an ML stack's: about 7 GB), under names of its own. The
    registry frees the blobs nothing else refers to when it is collected: ``dev/infra.sh up``
    does that before it starts the registry (never while it runs: a running registry's blob
    cache would still name the blobs).
    """
    registry = env["IMGBUILD_TEST_REGISTRY"]
    repositories = [
        f"{REGISTRY_CACHE.split('/', 1)[1]}-{tool}-{os.getpid()}" for tool in ("imgbuild", "anchor")
    ]
    with httpx.Client(base_url=f"http://{registry}/v2/", timeout=60) as http:
        for repository in repositories:
            listed = http.get(f"{repository}/tags/list")
            if listed.status_code == 404:
                continue
            listed.raise_for_status()
            digests = set()
            for tag in listed.json().get("tags") or []:
                found = http.head(
                    f"{repository}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES}
                )
                if found.status_code == 200:
                    digests.add(found.headers["Docker-Content-Digest"])
            for digest in sorted(digests):
                gone = http.delete(f"{repository}/manifests/{digest}")
                if gone.status_code not in (202, 404):
                    gone.raise_for_status()
            print(f"registry: {len(digests)} manifests of {repository} deleted", file=sys.stderr)


if __name__ == "__main__":
    main()
