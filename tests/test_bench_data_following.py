"""The one-step test's statistic (benchmarks/_harness.py, used by bench_data_following.py) recovers a known step
fraction."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the harness is not a package
from _harness import bootstrap_se, step_fractions  # noqa: E402


def test_step_fraction_recovers_the_blend_and_its_uncertainty():
    rng = np.random.default_rng(0)
    n = 4000
    p0 = rng.normal(size=(n, 2))
    d = rng.normal(size=(n, 2)) * rng.uniform(0.5, 2.0, (n, 2))
    w = rng.uniform(0.1, 10.0, (n, 2))
    truth = np.array([0.3, -0.2])
    y = p0 + truth * d + rng.normal(size=(n, 2)) / np.sqrt(w)  # noise of variance 1/w: w is the right weight
    beta = step_fractions(y, p0, d, w)
    se = bootstrap_se(y, p0, d, w, n_boot=100)
    assert np.all(se > 0) and np.all(se < 0.05)
    assert np.all(np.abs(beta - truth) < 4 * se)
    # a net at its optimum (no component of the residual along the step) gives beta* ~ 0
    assert np.all(np.abs(step_fractions(p0 + rng.normal(size=(n, 2)), p0, d, w)) < 0.1)
    # non-finite steps (failed fits) are left out, not propagated
    d2 = d.copy()
    d2[:10] = np.nan
    assert np.all(np.isfinite(step_fractions(y, p0, d2, w)))
