"""Fit a line to generated data and report it: touches numpy, pandas, scipy and scikit-learn."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402
from sklearn.linear_model import LinearRegression  # noqa: E402


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 10, 200)
    frame = pd.DataFrame({"x": x, "y": 3.0 * x + rng.normal(0, 1, 200)})
    fit = LinearRegression().fit(frame[["x"]], frame["y"])
    slope = stats.linregress(frame["x"], frame["y"]).slope
    print(f"slope {fit.coef_[0]:.3f} (scipy {slope:.3f})")
