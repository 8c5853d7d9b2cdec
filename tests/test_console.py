"""Progress and the summary: the reporters' output, and what the pipeline reports to them."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

from rich.console import Console

from imagebuild.commands.console import (
    PlainReporter,
    Verbosity,
    open_reporter,
    summary_line,
)
from imagebuild.commands.live import LiveReporter
from imagebuild.pipeline.requests import BuildResult
from tests.test_pipeline_build import World, world  # noqa: F401  (the fixture)


def test_plain_output_is_one_line_per_step_and_per_finished_phase() -> None:
    out = io.StringIO()
    reporter = PlainReporter(Verbosity(), out)
    reporter.step("fetch: 2 wheels")
    reporter.progress("download", 0, 3_000_000, "B")
    reporter.progress("download", 1_500_000, 3_000_000, "B")
    reporter.progress("download", 3_000_000, 3_000_000, "B")
    reporter.progress("install", 2, 2, "layers")
    reporter.warn("the lock is stale")
    assert out.getvalue() == (
        "· fetch: 2 wheels\n"
        "· download: 3.0 MB\n"
        "· install: 2 layers\n"
        "warning: the lock is stale\n"
    )
    quiet = io.StringIO()
    reporter = PlainReporter(Verbosity(quiet=True), quiet)
    reporter.step("hidden")
    reporter.progress("install", 2, 2, "layers")
    reporter.warn("shown")
    assert quiet.getvalue() == "warning: shown\n"


def test_live_output_draws_bars_with_bytes_rates_and_counts() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system="standard")
    live = LiveReporter(console)
    live.start()
    live.step("fetch: 2 wheels")
    live.progress("download", 0, 4_000_000, "B")
    live.progress("download", 4_000_000, 4_000_000, "B")
    live.progress("install", 0, 3, "layers")
    live.progress("install", 3, 3, "layers")
    live.progress("install", 0, 2, "layers")  # the next platform: a bar of its own
    live.progress("install", 2, 2, "layers")
    # A phase whose size is known only at its end (compile) gets a bar of its own too.
    live.progress("compile", 0, None, "modules")
    live.progress("compile", 365, 365, "modules")
    live.progress("compile", 0, None, "modules")  # the project's layer
    live.progress("compile", 2, 2, "modules")
    live.warn("careful")
    live.stop()
    text = out.getvalue()
    assert "\x1b[" in text  # a terminal gets escape codes
    final = text.rsplit("\x1b[?25h", 1)[0]  # up to where the cursor comes back
    assert "4.0 MB/4.0 MB" in final
    assert re.search(r"4.0 MB/4.0 MB [\d.]+ [kMG]?B/s", final)  # the average rate
    assert "3/3 layers" in final and "2/2 layers" in final
    assert "365/365 modules" in final and "2/2 modules" in final
    assert "warning: careful" in text
    # The step line is transient: the last frame has the bars, not the status.
    last = final.rsplit("\x1b[2K", 1)[-1] if "\x1b[2K" in final else final
    assert "fetch: 2 wheels" not in last


def test_open_reporter_is_plain_when_stderr_is_no_terminal() -> None:
    assert not sys.stderr.isatty()
    with open_reporter(Verbosity()) as reporter:
        assert isinstance(reporter, PlainReporter)


def test_summary_line() -> None:
    result = BuildResult(
        manifest_digest="sha256:" + "a" * 64,
        written=(),
        tag="docker.io/library/app:latest",
        size=45_200_000,
        layers=12,
        layers_built=3,
    )
    assert summary_line(result, 4.06) == (
        f"built app:latest sha256:{'a' * 64} (45.2 MB, 12 layers: 3 new, 9 reused) in 4.1s"
    )


def test_a_build_reports_each_phase_to_its_end_and_counts_new_layers(world: World) -> None:
    world.lock()
    world.host = Path(sys.executable)
    first = world.build(compile_bytecode=True)
    ends = {(task, unit) for task, done, total, unit in world.reporter.progressed if done == total}
    assert ends == {
        ("download", "B"),
        ("install", "layers"),
        ("compile", "modules"),
        ("compress", "layers"),
    }
    downloads = [(d, t) for task, d, t, _ in world.reporter.progressed if task == "download"]
    assert downloads[-1][0] == downloads[-1][1] > 0
    assert [d for d, _ in downloads] == sorted(d for d, _ in downloads)
    (image,) = (finished.image for _, finished in world.log)
    assert first.layers == len(image.layers)
    assert 0 < first.layers_built < first.layers
    assert first.tag == "docker.io/library/app:latest"
    assert first.size >= sum(layer.size for layer in image.layers)  # type: ignore[union-attr]

    # Built again: every layer from the cache, nothing downloaded, installed or compressed.
    world.reporter.progressed.clear()
    again = world.build(compile_bytecode=True)
    assert again.manifest_digest == first.manifest_digest
    assert again.layers_built == 0
    assert world.reporter.progressed == []
