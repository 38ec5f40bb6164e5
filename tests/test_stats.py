"""SRCC / PLCC / logistic fit / bootstrap against scipy.stats and known curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as sst

from grefine_curate.pipelines import stats


@pytest.fixture
def known():
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, 200)
    y = 3.0 * x + rng.normal(0, 0.4, 200)
    return x, y


def test_srcc_plcc_match_scipy(known):
    x, y = known
    assert stats.srcc(x, y) == pytest.approx(sst.spearmanr(x, y).statistic, abs=1e-12)
    assert stats.plcc(x, y) == pytest.approx(sst.pearsonr(x, y).statistic, abs=1e-12)


def test_srcc_with_ties_matches_scipy():
    x = np.array([1, 2, 2, 3, 4, 4, 4, 5, 6, 7], dtype=float)
    y = np.array([2, 1, 3, 3, 5, 4, 6, 8, 7, 9], dtype=float)
    assert stats.srcc(x, y) == pytest.approx(sst.spearmanr(x, y).statistic, abs=1e-12)


def test_negative_and_constant():
    x = np.arange(10.0)
    assert stats.srcc(x, -x) == pytest.approx(-1.0)
    assert np.isnan(stats.plcc(np.ones(10), x))


def test_input_validation_names_the_problem():
    with pytest.raises(ValueError, match="at least 3"):
        stats.srcc([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="pair up"):
        stats.plcc([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        stats.plcc([1.0, np.nan, 3.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("b", [(5.0, 1.0, 0.4, 0.08), (1.0, 4.0, 0.6, 0.1)])
def test_logistic_fit_recovers_known_curve(b):
    rng = np.random.default_rng(1)
    x = np.sort(rng.uniform(0, 1, 400))
    y = stats.logistic4(x, *b) + rng.normal(0, 0.01, x.size)
    fit = stats.fit_logistic4(x, y)
    assert fit.converged
    assert np.allclose(fit.params, b, rtol=0.05, atol=0.02), fit.params
    # the mapped scores are almost perfectly linear in the MOS, the raw ones are not; the sign
    # follows the curve's direction (the second curve falls), as SRCC's does
    sign = 1.0 if b[0] > b[1] else -1.0
    assert sign * stats.plcc_fitted(x, y, fit) > 0.999
    assert sign * stats.plcc_fitted(x, y, fit) > sign * stats.plcc(x, y) + 0.01
    assert np.sign(stats.srcc(x, y)) == sign


def test_logistic4_matches_textbook_formula():
    x = np.linspace(-3, 3, 13)
    b1, b2, b3, b4 = 4.0, 1.0, 0.5, 0.7
    textbook = (b1 - b2) / (1 + np.exp(-(x - b3) / abs(b4))) + b2
    assert np.allclose(stats.logistic4(x, b1, b2, b3, b4), textbook)
    assert np.isfinite(stats.logistic4(np.array([-1e6, 1e6]), b1, b2, b3, 1e-6)).all()  # no overflow


def test_bootstrap_ci_contains_point_and_narrows_with_n():
    rng = np.random.default_rng(3)
    widths = []
    for n in (60, 600):
        x = rng.uniform(0, 1, n)
        y = x + rng.normal(0, 0.3, n)
        lo, hi = stats.bootstrap_ci(x, y, stats.srcc, n_boot=300, seed=0)
        assert lo <= stats.srcc(x, y) <= hi
        assert -1 <= lo < hi <= 1
        widths.append(hi - lo)
    assert widths[1] < widths[0]


def test_correlate_vectorised_bootstrap_agrees_with_generic(known):
    x, y = known
    c = stats.correlate(x, y, n_boot=200, seed=5)
    # same resamples (same seed) through the generic, loop-based helper
    assert c.srcc_ci95 == pytest.approx(stats.bootstrap_ci(x, y, stats.srcc, n_boot=200, seed=5), abs=1e-9)
    assert c.plcc_ci95 == pytest.approx(stats.bootstrap_ci(x, y, stats.plcc, n_boot=200, seed=5), abs=1e-9)
    for value, (lo, hi) in ((c.srcc, c.srcc_ci95), (c.plcc, c.plcc_ci95), (c.plcc_fitted, c.plcc_fitted_ci95)):
        assert lo <= value <= hi
    assert c.n == 200
    blob = json.loads(json.dumps(c.to_json()))
    assert set(blob) >= {"srcc", "plcc", "plcc_fitted", "srcc_ci95", "plcc_ci95", "plcc_fitted_ci95", "logistic"}


def test_correlate_constant_scores_gives_null_json():
    c = stats.correlate(np.ones(20), np.arange(20.0), n_boot=20)
    blob = json.loads(json.dumps(c.to_json()))  # strict JSON: no NaN tokens
    assert blob["srcc"] is None and blob["plcc"] is None
