"""Benchmark: `imgbuild lock` against `uv lock` and `pip-compile`, cold and warm, in one run.

    .venv/bin/python benchmarks/lock.py [--runs N] [PROJECT ...]

For each project (default: every directory under examples/, and
benchmarks/projects/sdist-only, whose one sdist-only dependency needs a PEP 517 build for
its metadata; a name is looked up in examples/, then in benchmarks/projects/), each tool
locks a fresh copy of the project:

- cold: an empty cache directory of its own (nothing on disk; the network is the same);
- warm: the cache left by the cold run, with the lock file deleted before every run, so
  the tool resolves again from cached index pages.

uv locks universally (every platform); imgbuild locks its image targets (the base's
Python on linux/amd64 and linux/arm64); pip-compile resolves for the host only. Timings
are wall-clock medians, memory the largest peak resident set over all runs; the ratios are
imgbuild's over uv's and pip-compile's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECTS = (ROOT / "examples", ROOT / "benchmarks" / "projects")
# Run by default beside the examples: the heavy benchmark projects are asked for by name.
DEFAULT_EXTRA = ("sdist-only",)
IMGBUILD = [sys.executable, "-m", "imagebuild"]


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run ``command`` once; return (seconds, peak RSS in MiB). A failure stops the run.

    The peak is the largest resident set of the process or any descendant it waited for
    (``wait4``'s ``ru_maxrss``): the tool itself for uv and imgbuild, the Python that uvx
    starts for pip-compile.
    """
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"failed: {' '.join(command)}\n{err.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024


def project_dir(name: str) -> Path:
    """The project called ``name``: examples/NAME, else benchmarks/projects/NAME."""
    for parent in PROJECTS:
        if (parent / name / "pyproject.toml").is_file():
            return parent / name
    sys.exit(f"no project {name!r} in examples/ or benchmarks/projects/")


def fresh_copy(example: Path, into: Path) -> Path:
    """A copy of the project without its lock files or virtual environment."""
    target = into / example.name
    shutil.copytree(example, target, ignore=shutil.ignore_patterns(".venv", "*.lock", "pylock*"))
    return target


def measure(
    name: str,
    example: Path,
    work: Path,
    runs: int,
    command: Callable[[Path, Path], list[str]],
    lock_file: str,
) -> tuple[float, float, float]:
    """(cold seconds, median warm seconds, largest peak RSS in MiB) for one tool."""
    project = fresh_copy(example, work / name)
    cache = work / name / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PIP_"))}
    cold, cold_peak = timed(command(project, cache), project, env)
    warm, peaks = [], [cold_peak]
    for _ in range(runs):
        (project / lock_file).unlink(missing_ok=True)
        seconds, peak = timed(command(project, cache), project, env)
        warm.append(seconds)
        peaks.append(peak)
    return cold, statistics.median(warm), max(peaks)


def uv_lock(project: Path, cache: Path) -> list[str]:
    uv = shutil.which("uv")
    assert uv, "uv is not installed (pip install uv)"
    return [uv, "lock", "--cache-dir", str(cache), "--quiet"]


def imgbuild_lock(project: Path, cache: Path) -> list[str]:
    return [*IMGBUILD, "lock", str(project), "--cache-dir", str(cache), "--quiet"]


def pip_compile(project: Path, cache: Path) -> list[str]:
    uvx = shutil.which("uvx")
    assert uvx, "uvx is not installed (pip install uv)"
    return [
        uvx,
        "--from",
        "pip-tools",
        "pip-compile",
        "--quiet",
        "--cache-dir",
        str(cache),
        "--output-file",
        "requirements.txt",
        "pyproject.toml",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "examples", nargs="*", help="project names (examples/ or benchmarks/projects/)"
    )
    parser.add_argument("--runs", type=int, default=3, help="warm runs per tool (median)")
    parser.add_argument("--no-pip-compile", action="store_true", help="skip pip-compile")
    args = parser.parse_args()
    names = args.examples or [
        *sorted(p.name for p in (ROOT / "examples").iterdir() if p.is_dir()),
        *DEFAULT_EXTRA,
    ]
    projects = {name: project_dir(name) for name in names}
    # An installed tool has its bytecode (pip and `uv sync --compile-bytecode` write it); this
    # machine sets PYTHONDONTWRITEBYTECODE, so compile ours once rather than on every run.
    import compileall
    import sysconfig

    compileall.compile_dir(sysconfig.get_paths()["purelib"], quiet=1)
    compileall.compile_dir(ROOT / "imagebuild", quiet=1)
    # Installing pip-tools once keeps uvx's own setup out of the first timing.
    if not args.no_pip_compile:
        subprocess.run(
            ["uvx", "--from", "pip-tools", "pip-compile", "--version"],
            check=True,
            capture_output=True,
        )
    tools: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
        ("uv lock", uv_lock, "uv.lock"),
        ("imgbuild lock", imgbuild_lock, "pylock.toml"),
    ]
    if not args.no_pip_compile:
        tools.append(("pip-compile", pip_compile, "requirements.txt"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="imgbuild-bench-") as tmp:
        for name in names:
            results = {}
            for label, command, lock_file in tools:
                work = Path(tmp) / name / label.replace(" ", "-")
                work.mkdir(parents=True)
                results[label] = measure(label, projects[name], work, args.runs, command, lock_file)
            rows.append((name, results))

    print(f"{'example':<20} {'tool':<15} {'cold s':>8} {'warm s':>8} {'peak MiB':>9}")
    for name, results in rows:
        for label, (cold, warm, peak) in results.items():
            print(f"{name:<20} {label:<15} {cold:>8.2f} {warm:>8.2f} {peak:>9.0f}")
    print()
    print(f"{'example':<20} {'ratio':<28} {'cold':>6} {'warm':>6} {'memory':>7}")
    for name, results in rows:
        ours = results["imgbuild lock"]
        for other in ("uv lock", "pip-compile"):
            if other in results:
                theirs = results[other]
                print(
                    f"{name:<20} {'imgbuild / ' + other:<28} "
                    f"{ours[0] / theirs[0]:>6.2f} {ours[1] / theirs[1]:>6.2f} "
                    f"{ours[2] / theirs[2]:>7.2f}"
                )


if __name__ == "__main__":
    main()
