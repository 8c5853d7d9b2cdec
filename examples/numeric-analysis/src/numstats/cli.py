"""The `numstats` console script: per-station statistics for the bundled measurements."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

DATA_FILE = "measurements.csv"


def load_measurements() -> pd.DataFrame:
    """Read the CSV shipped inside the package (works from a wheel or a zip too)."""
    with resources.files("numstats").joinpath("data", DATA_FILE).open("r", encoding="utf-8") as f:
        return pd.read_csv(f)


def summarise(frame: pd.DataFrame) -> dict[str, Any]:
    """Statistics as plain, rounded Python values so the JSON never changes between runs."""
    stations = {}
    for name, group in frame.groupby("station", sort=True):
        temperature = group["temperature_c"].to_numpy()
        stations[str(name)] = {
            "temperature_mean": round(float(temperature.mean()), 3),
            "temperature_std": round(float(temperature.std(ddof=1)), 3),
            "temperature_min": round(float(temperature.min()), 3),
            "temperature_max": round(float(temperature.max()), 3),
            "rainfall_total": round(float(group["rainfall_mm"].sum()), 3),
            "warmest_month": int(group.loc[group["temperature_c"].idxmax(), "month"]),
        }
    correlation = np.corrcoef(frame["temperature_c"], frame["rainfall_mm"])[0, 1]
    return {
        "rows": len(frame),
        "stations": stations,
        "temperature_median": round(float(np.median(frame["temperature_c"])), 3),
        "temperature_rainfall_correlation": round(float(correlation), 3),
        "numpy": np.__version__,
        "pandas": pd.__version__,
    }


def render_report(summary: dict[str, Any]) -> str:
    lines = [
        f"numstats: {summary['rows']} rows from {DATA_FILE}",
        f"{'station':<10} {'mean C':>8} {'std':>6} {'min':>6} {'max':>6} {'rain mm':>8} {'warmest':>7}",
    ]
    for name, s in summary["stations"].items():
        lines.append(
            f"{name:<10} {s['temperature_mean']:>8.2f} {s['temperature_std']:>6.2f}"
            f" {s['temperature_min']:>6.1f} {s['temperature_max']:>6.1f}"
            f" {s['rainfall_total']:>8.1f} {s['warmest_month']:>7}"
        )
    lines.append(f"median temperature: {summary['temperature_median']:.2f} C")
    lines.append(f"corr(temperature, rainfall): {summary['temperature_rainfall_correlation']:+.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="numstats", description=__doc__)
    parser.parse_args(argv)
    summary = summarise(load_measurements())
    print(render_report(summary))
    print(json.dumps(summary, sort_keys=True, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
