"""Correlation statistics of IQA evaluations: SRCC, PLCC, the VQEG 4-parameter logistic, bootstrap CIs.

How the paper reports PQ-Map and AQ-Map against human mean opinion scores (Tables 6 and 7): SROCC
(Spearman rank correlation, monotonic agreement) and PLCC (Pearson linear correlation). As usual in
IQA (VQEG FR-TV Phase II report, 2003), PLCC is also given after mapping the objective score through
a monotonic 4-parameter logistic fitted to the MOS, which removes the non-linearity between the
two scales before measuring linear agreement:

    f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2

Confidence intervals are percentile bootstrap intervals over resampled (score, MOS) pairs. Only
numpy and scipy; no model code here.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from scipy import optimize, stats

MIN_ITEMS = 3  # a correlation over fewer pairs is meaningless
BOOT_CHUNK_ELEMENTS = 2_000_000  # resampled pairs held at once by the vectorised bootstrap


def _pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Validate two paired 1-D samples; returns float64 arrays."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"scores and MOS must pair up: got {x.size} scores and {y.size} MOS values")
    if x.size < MIN_ITEMS:
        raise ValueError(f"need at least {MIN_ITEMS} (score, MOS) pairs for a correlation, got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("scores and MOS must be finite; drop NaN/inf rows before computing correlations")
    return x, y


def srcc(x, y) -> float:
    """Spearman rank-order correlation (SRCC / SROCC); NaN when either side is constant."""
    x, y = _pairs(x, y)
    return float(_pearson_rows(stats.rankdata(x)[None], stats.rankdata(y)[None])[0])


def plcc(x, y) -> float:
    """Pearson linear correlation of the raw scores; NaN when either side is constant."""
    x, y = _pairs(x, y)
    return float(_pearson_rows(x[None], y[None])[0])


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of (R, N) arrays -> (R,); NaN for a constant row."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    num = (xc * yc).sum(axis=1)
    den = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[den <= 0] = np.nan
    return np.clip(r, -1.0, 1.0)


def logistic4(x, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """VQEG 4-parameter logistic: b1/b2 the upper/lower asymptotes, b3 the centre, |b4| the scale."""
    z = -(np.asarray(x, dtype=np.float64) - b3) / max(abs(b4), 1e-12)
    return (b1 - b2) * 0.5 * (1.0 + np.tanh(-0.5 * z)) + b2  # == (b1-b2)/(1+exp(z)) + b2, overflow-free


@dataclass(frozen=True)
class LogisticFit:
    b1: float
    b2: float
    b3: float
    b4: float
    converged: bool  # False: the optimiser failed and the fit is the starting guess (PLCC falls back to raw)

    @property
    def params(self) -> tuple[float, float, float, float]:
        return (self.b1, self.b2, self.b3, self.b4)

    def __call__(self, x) -> np.ndarray:
        return logistic4(x, *self.params)

    def to_json(self) -> dict:
        return asdict(self)


def _initial_guess(x: np.ndarray, y: np.ndarray) -> list[float]:
    # Direction from the rank correlation, so a decreasing relation starts as a decreasing curve.
    rho = _pearson_rows(stats.rankdata(x)[None], stats.rankdata(y)[None])[0]
    hi, lo = float(y.max()), float(y.min())
    if np.isfinite(rho) and rho < 0:
        hi, lo = lo, hi
    scale = float(np.std(x)) / 4.0 or 1.0
    return [hi, lo, float(np.mean(x)), scale]


def fit_logistic4(x, y, p0: list[float] | tuple[float, ...] | None = None, maxfev: int = 20000) -> LogisticFit:
    """Least-squares fit of ``logistic4`` mapping scores x to MOS y."""
    x, y = _pairs(x, y)
    guess = list(p0) if p0 is not None else _initial_guess(x, y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return LogisticFit(*guess, converged=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # OptimizeWarning: covariance not estimable (we don't use it)
            params, _ = optimize.curve_fit(logistic4, x, y, p0=guess, maxfev=maxfev)
    except (RuntimeError, ValueError, FloatingPointError):
        return LogisticFit(*guess, converged=False)
    if not np.isfinite(params).all():
        return LogisticFit(*guess, converged=False)
    b1, b2, b3, b4 = (float(v) for v in params)
    return LogisticFit(b1, b2, b3, abs(b4), converged=True)


def plcc_fitted(x, y, fit: LogisticFit | None = None) -> float:
    """PLCC between the logistic-mapped scores and the MOS (raw PLCC when the fit failed).

    Signed by the direction of the fitted curve: a decreasing fit (b1 < b2, the score falls as the
    MOS rises) gives a negative value, so that it agrees in sign with SRCC and raw PLCC instead of
    hiding an inverted score behind a positive correlation.
    """
    x, y = _pairs(x, y)
    fit = fit if fit is not None else fit_logistic4(x, y)
    if not fit.converged:
        return plcc(x, y)
    r = float(_pearson_rows(fit(x)[None], y[None])[0])
    return -r if fit.b1 < fit.b2 else r


def bootstrap_ci(
    x,
    y,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(x, y)`` over resampled pairs (NaN resamples dropped)."""
    x, y = _pairs(x, y)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))  # (R, N)
    values = np.array([statistic(x[i], y[i]) for i in idx], dtype=np.float64)
    return _percentiles(values, level)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class Correlation:
    """One score against one MOS column: point estimates and bootstrap intervals."""

    n: int
    srcc: float
    srcc_ci95: tuple[float, float]
    plcc: float  # raw
    plcc_ci95: tuple[float, float]
    plcc_fitted: float  # after the 4-parameter logistic
    plcc_fitted_ci95: tuple[float, float]
    logistic: LogisticFit

    def to_json(self) -> dict:
        out = asdict(self)
        out["srcc_ci95"] = list(self.srcc_ci95)
        out["plcc_ci95"] = list(self.plcc_ci95)
        out["plcc_fitted_ci95"] = list(self.plcc_fitted_ci95)
        out["logistic"] = self.logistic.to_json()
        return {k: _json_float(v) for k, v in out.items()}


def _json_float(v):
    """NaN is not JSON: a constant score gives null instead."""
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, list):
        return [_json_float(e) for e in v]
    return v


def correlate(x, y, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Correlation:
    """SRCC, PLCC (raw and logistic-fitted) with percentile bootstrap intervals.

    SRCC and raw PLCC are bootstrapped vectorised (all resamples at once); the fitted PLCC refits
    the logistic on every resample, warm-started from the full-sample fit so each refit is short.
    """
    x, y = _pairs(x, y)
    fit = fit_logistic4(x, y)
    point_srcc = srcc(x, y)
    point_plcc = plcc(x, y)
    point_fitted = plcc_fitted(x, y, fit)
    if n_boot <= 0:
        nan2 = (float("nan"), float("nan"))
        return Correlation(x.size, point_srcc, nan2, point_plcc, nan2, point_fitted, nan2, fit)

    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))  # (R, N)
    warm = list(fit.params) if fit.converged else None
    boot_srcc, boot_plcc, boot_fitted = [], [], []
    chunk = max(1, BOOT_CHUNK_ELEMENTS // x.size)  # bounds memory at n = 20k (AIGIQA-20K)
    for start in range(0, n_boot, chunk):
        xs, ys = x[idx[start:start + chunk]], y[idx[start:start + chunk]]  # (r, N)
        boot_srcc.append(_pearson_rows(stats.rankdata(xs, axis=1), stats.rankdata(ys, axis=1)))
        boot_plcc.append(_pearson_rows(xs, ys))
        boot_fitted += [plcc_fitted(xr, yr, fit_logistic4(xr, yr, p0=warm, maxfev=2000)) for xr, yr in zip(xs, ys)]
    boot_srcc, boot_plcc = np.concatenate(boot_srcc), np.concatenate(boot_plcc)
    boot_fitted = np.array(boot_fitted)
    return Correlation(
        n=int(x.size),
        srcc=point_srcc,
        srcc_ci95=_percentiles(boot_srcc, level),
        plcc=point_plcc,
        plcc_ci95=_percentiles(boot_plcc, level),
        plcc_fitted=point_fitted,
        plcc_fitted_ci95=_percentiles(boot_fitted, level),
        logistic=fit,
    )
