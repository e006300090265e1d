"""The standardised logistic regression behind the shipped linear heads, and what every recipe does around it:
per-class offsets tuned for macro-F1, out-of-fold probabilities, and the numpy `LinearHead` the runtime loads.

Shared by the head trainer (`pipelines.train.heads`), the text, voice and distillation recipes and the fusion
evaluation, so that a "logreg" row means the same model everywhere.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from pipelines.data import corpora as D
from streamer.frames import LABELS
from streamer.heads import LinearHead

log = logging.getLogger(__name__)


def make_model(C: float, cfg: dict, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(),
        LogisticRegression(
            C=C,
            class_weight=cfg.get("class_weight"),
            max_iter=int(cfg.get("max_iter", 5000)),
            solver="lbfgs",
            random_state=seed,
        ),
    )


def fit_quiet(model, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None):
    """Fit (with per-row weights if given); a ConvergenceWarning is logged once per fit rather than flooding the
    terminal."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    kw = {} if sample_weight is None else {"logisticregression__sample_weight": sample_weight}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X, y, **kw)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("logistic regression did not converge (C=%s, n=%d); raise max_iter", model[-1].C, len(y))
    return model


def classifier_meta(C: float, cfg: dict, seed: int) -> dict:
    import sklearn

    return {
        "type": "standardise + multinomial logistic regression (lbfgs)",
        "C": C,
        "class_weight": cfg.get("class_weight"),
        "max_iter": int(cfg.get("max_iter", 5000)),
        "seed": seed,
        "sklearn": sklearn.__version__,
    }


def final_head(X: np.ndarray, y: np.ndarray, C: float, cfg: dict, seed: int, meta: dict) -> LinearHead:
    missing = sorted(set(LABELS) - set(y))
    if missing:
        raise ValueError(f"{meta['id']}: no training examples for {missing}; use a larger --limit")
    model = fit_quiet(make_model(C, cfg, seed), X, y)
    scaler, lr = model[0], model[-1]
    order = [list(lr.classes_).index(label) for label in LABELS]
    head = LinearHead(
        labels=LABELS,
        mean=scaler.mean_.astype(np.float32),
        scale=scaler.scale_.astype(np.float32),
        coef=lr.coef_[order].astype(np.float32),
        intercept=lr.intercept_[order].astype(np.float32),
        meta=meta,
    )
    # the numpy head must reproduce sklearn's probabilities (float32 storage aside)
    check = X[: min(len(X), 64)]
    expected = model.predict_proba(check)[:, order]
    got = head.predict_proba(check)
    if not np.allclose(got, expected, atol=1e-3):
        raise AssertionError(f"{meta['id']}: LinearHead differs from sklearn by {np.abs(got - expected).max():.2e}")
    return head


def shipped_head(
    X: np.ndarray,
    y: np.ndarray,
    C: float,
    cfg: dict,
    seed: int,
    meta: dict,
    offsets: np.ndarray | None,
    tuned_on: str,
    calib: dict,
) -> LinearHead:
    """The final fit on all rows, with its per-class offsets (when tuned, `tuned_on` says on what) and temperature."""
    if offsets is not None:
        meta["bias_offsets"] = [round(float(v), 4) for v in offsets]
        meta["bias_tuning"] = (
            "per-class offsets added to the intercept (= to the log-probabilities), tuned for macro-F1 by coordinate"
            f" ascent on {tuned_on}"
        )
    head = final_head(X, y, C, cfg, seed, meta)
    if offsets is not None:
        head = dataclasses.replace(head, intercept=(head.intercept + offsets).astype(np.float32))
    return dataclasses.replace(head, temperature=calib["temperature"])


def label_counts(y) -> dict[str, int]:
    values, counts = np.unique(np.asarray(y), return_counts=True)
    found = dict(zip(values.tolist(), counts.tolist(), strict=True))
    return {label: int(found.get(label, 0)) for label in LABELS}


def tune_bias(p: np.ndarray, y: np.ndarray, grid: np.ndarray | None = None, sweeps: int = 3) -> np.ndarray:
    """Per-class offsets b on log p maximising macro-F1 of argmax(log p + b) on (p, y): coordinate ascent."""
    from sklearn.metrics import f1_score

    grid = np.round(np.arange(-1.5, 1.51, 0.1), 2) if grid is None else grid
    logp = np.log(np.clip(p, 1e-9, 1))
    labels = np.array(LABELS)
    b = np.zeros(len(LABELS))

    def f1(bias):
        pred = labels[np.argmax(logp + bias, axis=1)]
        return f1_score(y, pred, labels=list(LABELS), average="macro", zero_division=0)

    best = f1(b)
    for _ in range(sweeps):
        changed = False
        for k in range(len(LABELS)):
            for v in grid:
                trial = b.copy()
                trial[k] = v
                s = f1(trial)
                if s > best + 1e-9:
                    best, b, changed = s, trial, True
        if not changed:
            break
    return b - b.mean()


def apply_bias(p: np.ndarray, b: np.ndarray) -> np.ndarray:
    z = np.log(np.clip(p, 1e-9, 1)) + b
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def proba_in_label_order(model, X) -> np.ndarray:
    """predict_proba with columns in LABELS order; a class the model never saw (tiny runs) gets probability 0."""
    raw = model.predict_proba(X)
    out = np.zeros((raw.shape[0], len(LABELS)))
    for j, c in enumerate(model.classes_):
        out[:, LABELS.index(c)] = raw[:, j]
    return out


def inner_bias(X: np.ndarray, y: np.ndarray, groups: np.ndarray, C: float, cfg: dict, seed: int, *extra) -> np.ndarray:
    """Offsets tuned on out-of-fold probabilities of 3 grouped folds of (X, y): uses nothing outside (X, y) except
    the always-training `extra` rows (X_extra, y_extra, w_extra of `oof_proba`), so they match a model fitted with
    them."""
    p, _ = oof_proba(D.grouped_folds(y, groups, 3, seed + 1), X, y, C, cfg, seed, None, *extra)
    return tune_bias(p, y)


def oof_proba(
    splits,
    X: np.ndarray,
    y: np.ndarray,
    C: float,
    cfg: dict,
    seed: int,
    bias_groups: np.ndarray | None = None,
    X_extra: np.ndarray | None = None,
    y_extra: np.ndarray | None = None,
    w_extra: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold probabilities [n, 6] (LABELS order) and each row's fold. `X_extra` rows (weight `w_extra`) join
    every training side and are never scored. With `bias_groups`, per-class offsets tuned on inner folds of each
    training side (grouped by them, extra rows included) are applied: a nested estimate of model + bias."""
    p = np.zeros((len(y), len(LABELS)))
    fold = np.full(len(y), -1)
    for k, (train, test) in enumerate(splits):
        Xt, yt, w = X[train], y[train], None
        if X_extra is not None and len(X_extra):
            Xt, yt = np.concatenate([Xt, X_extra]), np.concatenate([yt, y_extra])
            w = np.concatenate([np.ones(len(train)), np.full(len(X_extra), w_extra)])
        model = fit_quiet(make_model(C, cfg, seed), Xt, yt, w)
        p[test] = proba_in_label_order(model, X[test])
        if bias_groups is not None:
            extra = (X_extra, y_extra, w_extra)
            p[test] = apply_bias(p[test], inner_bias(X[train], y[train], bias_groups[train], C, cfg, seed, *extra))
        fold[test] = k
    return p, fold


def crossfit_bias(p: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """`p` with per-class offsets tuned on the other two thirds of the rows (3 stratified folds): an estimate of
    bias tuning on held-out rows that is not tuned on the rows it scores."""
    out = np.empty_like(p)
    for tune, score_rows in D.grouped_folds(y, np.arange(len(y)).astype(str), 3, seed + 1):
        out[score_rows] = apply_bias(p[score_rows], tune_bias(p[tune], y[tune]))
    return out
