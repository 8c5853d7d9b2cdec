"""Draw the comparison with uv's Dockerfile from ``benchmarks/build.py``'s report, as an SVG.

    .venv/bin/python benchmarks/build.py > report.txt
    .venv/bin/python benchmarks/plot.py report.txt -o benchmarks/comparison.svg

One group of bars per project and measurement (cold build, one-line change, the CI run
with the registry as cache), imgbuild's beside the anchor's, in seconds. The SVG is
written by hand (no plotting library), with sorted, fixed output for the same report.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

METRICS = (
    ("cold build, s (mean of 2)", "cold build"),
    ("warm rebuild after 1-line change (no server), s", "1-line change, no server"),
    ("  the same, at a terminal (resident server), s", "1-line change, at a terminal"),
    ("CI run (empty caches, registry cache), s", "CI run, registry cache"),
)
WIDTH, BAR, GAP, LEFT, SCALE_WIDTH = 760, 12, 10, 230, 470
COLOURS = {"imgbuild": "#2b6cb0", "uv's Dockerfile": "#c05621"}


def parse(report: str) -> dict[str, dict[str, tuple[float, float]]]:
    """Project -> measurement -> (imgbuild seconds, anchor seconds)."""
    found: dict[str, dict[str, tuple[float, float]]] = {}
    project = None
    for line in report.splitlines():
        if line.startswith("## "):
            project = line[3:].strip()
            found[project] = {}
            continue
        for label, short in METRICS:
            if project is not None and line.startswith(label):
                numbers = re.findall(r"\d+\.\d+", line[len(label) :])
                found[project][short] = (float(numbers[0]), float(numbers[1]))
    return {name: rows for name, rows in found.items() if rows}


def svg(results: dict[str, dict[str, tuple[float, float]]]) -> str:
    """Grouped horizontal bars, one scale per measurement row (seconds)."""
    rows = [(p, m, v) for p, metrics in results.items() for m, v in metrics.items()]
    height = 60 + len(rows) * (2 * BAR + GAP) + 20 * len(results)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        '<text x="10" y="20" font-size="14" font-weight="bold">'
        "imgbuild and uv's documented Dockerfile, seconds (shorter is better)</text>",
    ]
    for i, (name, colour) in enumerate(COLOURS.items()):
        x = LEFT + i * 140
        out.append(f'<rect x="{x}" y="30" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{x + 18}" y="40">{name}</text>')
    y, current = 60, None
    for project, metric, (ours, theirs) in rows:
        if project != current:
            out.append(f'<text x="10" y="{y + 10}" font-weight="bold">{project}</text>')
            y, current = y + 18, project
        scale = SCALE_WIDTH / max(ours, theirs, 0.01)
        out.append(f'<text x="20" y="{y + BAR + 4}">{metric}</text>')
        for offset, (value, colour) in enumerate(
            zip((ours, theirs), COLOURS.values(), strict=True)
        ):
            top = y + offset * BAR
            out.append(
                f'<rect x="{LEFT}" y="{top}" width="{value * scale:.1f}" height="{BAR - 1}" '
                f'fill="{colour}"/>'
            )
            out.append(
                f'<text x="{LEFT + value * scale + 4:.1f}" y="{top + 10}">{value:.2f}</text>'
            )
        y += 2 * BAR + GAP
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="outputs of benchmarks/build.py")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the SVG to write")
    args = parser.parse_args()
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for report in args.reports:
        results.update(parse(report.read_text()))
    if not results:
        raise SystemExit("no benchmark table found in the reports")
    args.output.write_text(svg(results))


if __name__ == "__main__":
    main()
