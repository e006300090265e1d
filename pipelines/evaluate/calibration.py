"""Softmax temperature of a head, fitted on held-out probabilities, with the calibration error before and after.

A temperature corrects a head's over- or under-confidence without moving any argmax, so it is fitted after the
head is chosen and never changes a macro-F1; the ECE after it is cross-fitted so it is not measured on the rows T
was fitted on.
"""

from __future__ import annotations

import numpy as np

from pipelines.evaluate.metrics import expected_calibration_error as ece
from pipelines.evaluate.metrics import nll
from streamer.heads import temper


def fit_temperature(p: np.ndarray, y: np.ndarray) -> float:
    """The softmax temperature T (0.05–20) that minimises the negative log-likelihood of labels `y` under
    temper(p, T), rounded to 4 decimals. Fitted on held-out probabilities, it corrects a head's over- or
    under-confidence without moving any argmax."""
    from scipy.optimize import minimize_scalar

    r = minimize_scalar(
        lambda log_t: nll(temper(p, float(np.exp(log_t))), y),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return round(float(np.exp(r.x)), 4)


def crossfit_temper(p: np.ndarray, y: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Each fold's probabilities tempered by a T fitted on the other folds only, so the calibrated ECE of
    out-of-fold probabilities is not measured on the rows T was fitted on."""
    out = np.empty_like(p)
    for f in np.unique(fold):
        rest = fold != f
        out[~rest] = temper(p[~rest], fit_temperature(p[rest], y[rest]))
    return out


def calibration(p: np.ndarray, y: np.ndarray, fold: np.ndarray, fitted_on: str, tests: dict | None = None) -> dict:
    """Temperature fitted on all held-out probabilities `p`, and the 15-bin ECE and NLL before and after: on `p`
    itself with T cross-fitted over `fold`, and on each (p, y) of `tests` (other held-out sets) with T as fitted."""
    t = fit_temperature(p, y)
    after = crossfit_temper(p, y, fold)
    out = {
        "temperature": t,
        "fitted_on": fitted_on,
        "n": len(y),
        "ece15_before": round(ece(p, y), 4),
        "ece15_after_crossfit": round(ece(after, y), 4),
        "nll_before": round(nll(p, y), 4),
        "nll_after_crossfit": round(nll(after, y), 4),
    }
    for name, (pt, yt) in (tests or {}).items():
        out[name] = {
            "n": len(yt),
            "ece15_before": round(ece(pt, yt), 4),
            "ece15_after": round(ece(temper(pt, t), yt), 4),
            "nll_before": round(nll(pt, yt), 4),
            "nll_after": round(nll(temper(pt, t), yt), 4),
        }
    return out
