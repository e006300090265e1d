"""Scores of out-of-fold predictions, shared by every recipe runner: macro-F1 (per fold, pooled, with a bootstrap
CI), accuracy, per-class F1, calibration error and log-likelihood.

One place for them so that every table under `docs/models/` computes a figure the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from streamer.frames import LABELS

T = TypeVar("T")


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Macro-F1 over the labels present in y_true or y_pred (sklearn's default), 0 for an empty set."""
    from sklearn.metrics import f1_score

    if len(y_true) == 0:
        return 0.0
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def shared_label_f1(y: np.ndarray, proba: np.ndarray, shared: Sequence[str]) -> tuple[float, np.ndarray]:
    """Macro-F1 over the `shared` labels after an argmax restricted to their columns of `proba` ([n, 6]), and the
    per-class F1s: a model trained on more labels than a held-out corpus has is scored on the ones they share."""
    from sklearn.metrics import f1_score

    cols = [LABELS.index(label) for label in shared]
    pred = np.array(shared)[proba[:, cols].argmax(axis=1)]
    per = f1_score(y, pred, labels=list(shared), average=None, zero_division=0)
    return float(per.mean()), per


def bootstrap_ci(
    y_true: Sequence[str], y_pred: Sequence[str], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled macro-F1 (items resampled with replacement; seeded). Macro-F1 is
    computed from confusion counts in numpy (as sklearn's, over the labels present in the whole set)."""
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    if len(yt) == 0:
        return 0.0, 0.0
    labels = sorted(set(yt.tolist()) | set(yp.tolist()))
    code = {label: i for i, label in enumerate(labels)}
    t = np.array([code[v] for v in yt])
    p = np.array([code[v] for v in yp])
    k = len(labels)
    rng = np.random.default_rng(seed)
    scores = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, len(t), len(t))
        cm = np.bincount(t[idx] * k + p[idx], minlength=k * k).reshape(k, k)
        tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
        denom = support + predicted
        scores[b] = np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
    alpha = (1 - level) / 2
    return float(np.quantile(scores, alpha)), float(np.quantile(scores, 1 - alpha))


def expected_calibration_error(proba: np.ndarray, y_true: Sequence[str], n_bins: int = 15) -> float:
    """Top-label ECE: the predictions are put in `n_bins` equal-width bins of their top probability, and
    ECE = Σ_b (n_b / n) · |accuracy_b − mean top probability_b|. 0 when confidence matches accuracy in every bin;
    the gap between how sure a head says it is and how often it is right. `proba` columns are in LABELS order."""
    p = np.asarray(proba, dtype=np.float64)
    if len(p) == 0:
        return 0.0
    conf = p.max(axis=1)
    hit = np.array(LABELS)[p.argmax(axis=1)] == np.asarray(y_true)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)  # [0, 1/n) … [(n-1)/n, 1]
    # per bin |Σ hits − Σ confidences| / n = (n_b / n) · |accuracy_b − confidence_b|
    gap = np.abs(np.bincount(bins, hit, n_bins) - np.bincount(bins, conf, n_bins))
    return float(gap.sum() / len(p))


def pooled_scores(y_true, y_pred) -> dict:
    """Macro-F1, accuracy and per-class F1 over all folds' predictions together."""
    from sklearn.metrics import accuracy_score, f1_score

    per_class = f1_score(y_true, y_pred, labels=list(LABELS), average=None, zero_division=0)
    return {
        "pooled_macro_f1": float(f1_score(y_true, y_pred, average="macro")),
        "pooled_accuracy": float(accuracy_score(y_true, y_pred)),
        "pooled_per_class_f1": {label: round(float(f), 4) for label, f in zip(LABELS, per_class, strict=True)},
    }


@dataclass
class Estimate:
    name: str  # cv | heldout
    folds: int
    n_test: int
    macro_f1: list[float]
    accuracy: list[float]
    pooled_macro_f1: float
    pooled_accuracy: float
    pooled_per_class_f1: dict[str, float]
    note: str = ""

    def summary(self) -> dict:
        return {
            "folds": self.folds,
            "n_test": self.n_test,
            "macro_f1_mean": round(float(np.mean(self.macro_f1)), 4),
            "macro_f1_sd": round(float(np.std(self.macro_f1)), 4),
            "accuracy_mean": round(float(np.mean(self.accuracy)), 4),
            "accuracy_sd": round(float(np.std(self.accuracy)), 4),
            "pooled_macro_f1": round(self.pooled_macro_f1, 4),
            "pooled_accuracy": round(self.pooled_accuracy, 4),
            "pooled_per_class_f1": self.pooled_per_class_f1,
            **({"note": self.note} if self.note else {}),
        }


def estimate(name: str, y: np.ndarray, p: np.ndarray, fold: np.ndarray, note: str = "") -> Estimate:
    """Per-fold and pooled macro-F1 / accuracy of the argmax of probabilities `p` (rows with fold < 0 unscored)."""
    from sklearn.metrics import accuracy_score, f1_score

    pred = np.array(LABELS)[p.argmax(axis=1)]
    folds = [f for f in np.unique(fold) if f >= 0]
    scored = fold >= 0
    return Estimate(
        name=name,
        folds=len(folds),
        n_test=int(scored.sum()),
        macro_f1=[float(f1_score(y[fold == f], pred[fold == f], average="macro")) for f in folds],
        accuracy=[float(accuracy_score(y[fold == f], pred[fold == f])) for f in folds],
        note=note,
        **pooled_scores(y[scored], pred[scored]),
    )


def nll(p: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of labels `y` under probabilities `p` (LABELS order)."""
    idx = np.array([LABELS.index(v) for v in y])
    return float(-np.mean(np.log(np.clip(p[np.arange(len(idx)), idx], 1e-12, 1.0))))


def proba_macro_f1(p: np.ndarray, y: np.ndarray) -> float:
    """Pooled macro-F1 of the argmax of probabilities `p` (LABELS order), rounded for a head's meta."""
    return round(pooled_scores(y, np.array(LABELS)[p.argmax(axis=1)])["pooled_macro_f1"], 4)


def heldout_summary(p: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> dict:
    """Macro-F1 with its bootstrap 95 % CI, accuracy and per-class F1 on one held-out set."""
    pred = np.array(LABELS)[p.argmax(axis=1)]
    s = pooled_scores(y, pred)
    return {
        "n": len(y),
        "macro_f1": round(s["pooled_macro_f1"], 4),
        "macro_f1_ci95": [round(v, 4) for v in bootstrap_ci(y, pred, n_boot, seed)],
        "accuracy": round(s["pooled_accuracy"], 4),
        "per_class_f1": s["pooled_per_class_f1"],
    }


def median_ms(fn: Callable[[T], object], items: Sequence[T]) -> float:
    """Median wall milliseconds of `fn` per item, after one warm-up call: the cost columns of the recipe tables."""
    fn(items[0])
    times = []
    for item in items:
        t0 = time.perf_counter()
        fn(item)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))
