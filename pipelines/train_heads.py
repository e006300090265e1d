"""Train the shipped emotion heads (voice, Spanish text, English text) from a YAML recipe, with estimates.

    .venv/bin/python -m pipelines.train_heads --config configs/train/heads.yaml [--out streamer/models] [--limit N]
    .venv/bin/python -m pipelines.train_heads --calibrate-voice   # temperature of the voice_recipes --ship head

Voice: pooled Whisper-base encoder frames (the runtime's features) → standardise → logistic regression, scored
on UEM with speaker-grouped folds and on the authors' two held-out speakers. Text (`text`, Spanish):
multilingual-e5-small embeddings of the EmoSPeech transcripts → standardise → logistic regression, scored with
folds grouped by YouTube video. English text (`text_en`): the same recipe on GoEmotions and EmoEvent en with their
official splits: chosen on dev, scored once on test. Every (variant, C) in the recipe is scored; the best by the
recipe's `select_by` estimate is refitted and saved as a `LinearHead` (the scaler is kept as the head's mean/scale).

Text heads get a softmax temperature fitted on held-out probabilities (out-of-fold for `text`, dev for
`text_en`), with the expected calibration error before and after in their meta; `--calibrate-voice` does the same
for the shipped voice head from its recipe's speaker-grouped out-of-fold probabilities.
The saved meta holds no dates or timings, so a rerun on the same data and environment gives the same head.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from pipelines import data as D
from streamer.classifier import TEXT_ENCODERS, LinearHead, load_voice_head, temper
from streamer.frames import LABELS

log = logging.getLogger("pipelines.train_heads")

VOICE_FILE, TEXT_FILE, TEXT_EN_FILE = "voice_head.npz", "text_head.npz", "text_head_en.npz"
VOICE_LICENCES = {
    D.UEM: "UEM speech: no licence stated, research use only",
    D.EMODB: "EmoDB: free for research (TU Berlin)",
}
ESTIMATE_NAMES = {
    "cv": "grouped CV",
    "heldout": "held-out speakers",
    "cv_bias": "grouped CV + bias",
    "dev": "dev",
    "dev_bias": "dev + bias (3-fold)",
    "test": "test (official)",
}
ENCODER_TAGS = {"e5": "e5small", "use": "usem3"}
TEXT_FEATURE_SPECS = {"e5": "e5-query-prefix-384", "use": "usem3-512"}


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


def score(splits, X_eval, y_eval, X_extra, y_extra, C, cfg, seed, name) -> Estimate:
    """Fit on each split's training rows (plus the always-training `extra` rows), score on its test rows."""
    from sklearn.metrics import accuracy_score, f1_score

    f1s, accs, y_true, y_pred = [], [], [], []
    for train, test in splits:
        X = np.concatenate([X_eval[train], X_extra]) if len(X_extra) else X_eval[train]
        y = np.concatenate([y_eval[train], y_extra]) if len(y_extra) else y_eval[train]
        model = fit_quiet(make_model(C, cfg, seed), X, y)
        pred = model.predict(X_eval[test])
        f1s.append(float(f1_score(y_eval[test], pred, average="macro")))
        accs.append(float(accuracy_score(y_eval[test], pred)))
        y_true.extend(y_eval[test])
        y_pred.extend(pred)
    return Estimate(
        name=name,
        folds=len(splits),
        n_test=len(y_true),
        macro_f1=f1s,
        accuracy=accs,
        **pooled_scores(y_true, y_pred),
    )


def _text_head_meta(
    prefix: str, best: dict, encoders: list[str], X: np.ndarray, y: np.ndarray, cfg: dict, seed: int
) -> dict:
    """What every words head records about itself: id, features, training rows, classifier and its estimates."""
    return {
        "id": f"{prefix}-{best['sources_variant']}-{'+'.join(ENCODER_TAGS[e] for e in encoders)}"
        f"-logreg-v{cfg['version']}",
        "head": "text",
        "labels": list(LABELS),
        "feature": " ⊕ ".join(TEXT_FEATURE_SPECS[e] for e in encoders),
        "encoders": encoders,
        "input_dim": int(X.shape[1]),
        "encoder": " + ".join(TEXT_ENCODERS[e].model_id for e in encoders),
        "n_train": len(y),
        "train_label_counts": label_counts(y),
        "classifier": _classifier_meta(best["C"], cfg, seed),
        "cv": best["estimates"],
    }


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


def choose(results: list[dict], select_by: str) -> dict:
    """Best macro-F1 (mean over folds) on `select_by`; ties go to the earlier (simpler, smaller C) entry."""
    return max(results, key=lambda r: (r["estimates"][select_by]["macro_f1_mean"], -results.index(r)))


def label_counts(y) -> dict[str, int]:
    values, counts = np.unique(np.asarray(y), return_counts=True)
    found = dict(zip(values.tolist(), counts.tolist(), strict=True))
    return {label: int(found.get(label, 0)) for label in LABELS}


# --------------------------------------------------------------------------- voice


def train_voice(cfg: dict, seed: int, root, limit, cache_dir) -> tuple[LinearHead, list[dict], dict]:
    from pipelines.features import VOICE_FEATURE_SPEC, VoiceFeaturizer
    from streamer.recogniser import RecogniserOptions

    opts = RecogniserOptions()
    if float(cfg["encoder_window_s"]) != opts.encoder_window_s:
        log.warning(
            "recipe encoder_window_s %s differs from the runtime default %s: features will not match the runtime",
            cfg["encoder_window_s"],
            opts.encoder_window_s,
        )
    opts.encoder_window_s = float(cfg["encoder_window_s"])
    readers = {D.UEM: D.read_uem, D.EMODB: D.read_emodb}
    needed = sorted({name for names in cfg["variants"].values() for name in names} | {cfg["eval_dataset"]})
    unknown = [n for n in needed if n not in readers]
    if unknown:
        raise ValueError(f"voice: unknown datasets {unknown} (known: {sorted(readers)})")
    loaded = {name: readers[name](root) for name in needed}
    featurizer = VoiceFeaturizer(cache_dir, opts)
    feats, clips = {}, {}
    t0 = time.perf_counter()
    for name in needed:
        chosen = D.limit_records(loaded[name].records, limit, seed)
        feats[name], clips[name] = featurizer.many(chosen, f"voice features {name}")
    log.info(
        "voice features: %.1f s (%d cached, %d computed)", time.perf_counter() - t0, featurizer.hits, featurizer.misses
    )

    ev = cfg["eval_dataset"]
    X_ev = feats[ev]
    y_ev = np.array([c.label for c in clips[ev]])
    speakers = np.array([c.speaker for c in clips[ev]])
    cv_splits = D.grouped_folds(y_ev, speakers, int(cfg["cv_folds"]), seed)
    held = np.isin(speakers, cfg.get("heldout_speakers") or [])
    heldout_splits = [(np.flatnonzero(~held), np.flatnonzero(held))] if held.any() and (~held).any() else []

    results = []
    for variant, names in cfg["variants"].items():
        if ev not in names:
            raise ValueError(f"voice variant {variant}: must train on the evaluation dataset {ev}")
        others = [n for n in names if n != ev]
        X_extra = np.concatenate([feats[n] for n in others]) if others else np.zeros((0, X_ev.shape[1]), np.float32)
        y_extra = np.array([c.label for n in others for c in clips[n]])
        for C in cfg["C"]:
            est = {"cv": score(cv_splits, X_ev, y_ev, X_extra, y_extra, C, cfg, seed, "cv")}
            if heldout_splits:
                est["heldout"] = score(heldout_splits, X_ev, y_ev, X_extra, y_extra, C, cfg, seed, "heldout")
            results.append(
                {
                    "head": "voice",
                    "variant": variant,
                    "datasets": names,
                    "C": C,
                    "estimates": {k: v.summary() for k, v in est.items()},
                }
            )
            log.info("voice %-10s C=%-5g %s", variant, C, _short(results[-1]))

    best = choose(results, cfg.get("select_by", "cv"))
    names = best["datasets"]
    X = np.concatenate([feats[n] for n in names])
    y = np.array([c.label for n in names for c in clips[n]])
    r = featurizer.recogniser
    meta = {
        "id": f"voice-{best['variant']}-whisperbase-w{opts.encoder_window_s:g}-meanstd-logreg-v{cfg['version']}",
        "head": "voice",
        "labels": list(LABELS),
        "feature": VOICE_FEATURE_SPEC,
        "input_dim": int(X.shape[1]),
        "encoder": r.model_id,
        "encoder_device": r.device,
        "encoder_compute_type": r.compute_type,
        "encoder_window_s": opts.encoder_window_s,
        "datasets": names,
        "n_train": len(y),
        "train_label_counts": label_counts(y),
        "classifier": _classifier_meta(best["C"], cfg, seed),
        "cv": best["estimates"],
        "selected_by": f"{cfg.get('select_by', 'cv')} macro_f1_mean",
        "variants_tried": [_tried(r_) for r_ in results],
        "limit": limit,
        "licence": "; ".join(VOICE_LICENCES[n] for n in names),
    }
    return final_head(X, y, best["C"], cfg, seed, meta), results, best


# --------------------------------------------------------------------------- per-class bias (macro-F1)


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


# --------------------------------------------------------------------------- calibration


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


def nll(p: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of labels `y` under probabilities `p` (LABELS order)."""
    idx = np.array([LABELS.index(v) for v in y])
    return float(-np.mean(np.log(np.clip(p[np.arange(len(idx)), idx], 1e-12, 1.0))))


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
    from pipelines.report import expected_calibration_error as ece

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


# --------------------------------------------------------------------------- text


def text_folds(rows, n_splits: int, seed: int):
    """The text head's folds: one set over all EmoSPeech rows (train + extra), grouped by YouTube video."""
    return D.grouped_folds([r.label for r in rows], [r.youtube_key for r in rows], n_splits, seed)


def train_text(cfg: dict, seed: int, root, limit, cache_dir) -> tuple[LinearHead, list[dict], dict]:
    from pipelines.features import text_features

    loaded = D.read_emospeech(root, include_extra=True)
    rows = D.limit_records(loaded.records, limit, seed)
    feature_sets = cfg.get("features") or {"e5": ["e5"]}
    t0 = time.perf_counter()
    X_sets = {
        name: text_features([r.text for r in rows], encoders, cache_dir, "emospeech")
        for name, encoders in feature_sets.items()
    }
    log.info("text features: %.1f s", time.perf_counter() - t0)
    y_all = np.array([r.label for r in rows])
    source = np.array([r.source for r in rows])
    # one set of folds over all rows, grouped by video; each variant trains on its sources, all score the same rows
    splits_all = text_folds(rows, int(cfg["cv_folds"]), seed)

    results = []
    for feat_name, X_all in X_sets.items():
        for variant, sources in cfg["variants"].items():
            unknown = set(sources) - {"train", "extra"}
            if unknown:
                raise ValueError(f"text variant {variant}: unknown sources {sorted(unknown)}")
            use = np.isin(source, sources)
            splits = [(train[use[train]], test) for train, test in splits_all]
            for C in cfg["C"]:
                est = score(splits, X_all, y_all, np.zeros((0, X_all.shape[1])), np.array([]), C, cfg, seed, "cv")
                results.append(
                    {
                        "head": "text",
                        "variant": f"{variant} {feat_name}",
                        "sources_variant": variant,
                        "features": feat_name,
                        "datasets": [f"{D.EMOSPEECH}/{s}.csv" for s in sources],
                        "sources": list(sources),
                        "C": C,
                        "estimates": {"cv": est.summary()},
                    }
                )
                log.info("text  %-20s C=%-5g %s", results[-1]["variant"], C, _short(results[-1]))

    select_by = cfg.get("select_by", "cv")
    best = choose(results, select_by)
    videos = np.array([r.youtube_key for r in rows])
    bias_groups = videos if cfg.get("bias_tuning") else None
    oof = {}  # id(result) → its out-of-fold probabilities and folds, for the temperature

    def held_out(r: dict) -> tuple[np.ndarray, np.ndarray]:
        use = np.isin(source, r["sources"])
        splits = [(train[use[train]], test) for train, test in splits_all]
        return oof_proba(splits, X_sets[r["features"]], y_all, r["C"], cfg, seed, bias_groups)

    if cfg.get("bias_tuning"):
        # per-class log-probability offsets for macro-F1, tuned on inner grouped folds of each training side only.
        # The best (variant, C) of every feature set gets a nested estimate on the same outer folds; the shipped
        # head is the best of those by that estimate.
        finalists = [choose([r for r in results if r["features"] == f], select_by) for f in X_sets]
        for r in finalists:
            oof[id(r)] = held_out(r)
            r["estimates"]["cv_bias"] = estimate("cv_bias", y_all, *oof[id(r)]).summary()
            log.info(
                "text  %-20s C=%-5g + bias (nested): %s",
                r["variant"],
                r["C"],
                _short({"estimates": {"cv_bias": r["estimates"]["cv_bias"]}}),
            )
        select_by = "cv_bias"
        best = choose(finalists, select_by)
    p_oof, fold = oof[id(best)] if id(best) in oof else held_out(best)
    calib = calibration(p_oof, y_all, fold, f"out-of-fold probabilities of the {len(splits_all)} video-grouped folds")
    use = np.isin(source, best["sources"])
    X, y = X_sets[best["features"]][use], y_all[use]
    offsets = inner_bias(X, y, videos[use], best["C"], cfg, seed) if cfg.get("bias_tuning") else None
    encoders = list(feature_sets[best["features"]])
    meta = {
        **_text_head_meta("text-emospeech", best, encoders, X, y, cfg, seed),
        "datasets": best["datasets"],
        "cv_grouping": "youtube_key, folds over train+extra; every variant scored on the same rows",
        "selected_by": f"{select_by} macro_f1_mean",
        "variants_tried": [_tried(r_) for r_ in results],
        "limit": limit,
        "licence": "CC BY-NC 4.0 (inherited from the EmoSPeech 2024 / MEACorpus 2023 text): non-commercial use only",
        "languages": "es, and every language without a head of its own",
        "calibration": calib,
    }
    tuned_on = (
        "out-of-fold probabilities of 3 video-grouped folds of the training rows; estimate cv_bias is nested"
        " (offsets tuned inside each outer training side)"
    )
    return shipped_head(X, y, best["C"], cfg, seed, meta, offsets, tuned_on, calib), results, best


# --------------------------------------------------------------------------- English text (official splits)

EN_LICENCES = {
    D.GOEMOTIONS: "GoEmotions: CC BY 4.0 (Google; credit Demszky et al., ACL 2020)",
    D.EMOEVENT: "EmoEvent: no licence stated, research use only (cite Plaza-del-Arco et al., LREC 2020)",
}


def read_english(name: str, root) -> D.Loaded[D.TextRow]:
    """The English rows of an English-capable text dataset, with their official split in `source`."""
    if name == D.GOEMOTIONS:
        return D.read_goemotions(root)
    if name == D.EMOEVENT:
        return D.read_emoevent_splits(root, "en")
    raise ValueError(f"no English reader for {name} (known: {D.GOEMOTIONS}, {D.EMOEVENT})")


@dataclass
class SplitData:
    """The rows of one dataset's official split and their features (feature set name → [n, d])."""

    rows: list[D.TextRow]
    X: dict[str, np.ndarray]

    @property
    def y(self) -> np.ndarray:
        return np.array([r.label for r in self.rows])


def english_splits(cfg: dict, seed: int, root, limit, cache_dir) -> dict[str, dict[str, SplitData]]:
    """dataset → split → rows and features, for the datasets of the `text_en` recipe. A training split may be
    capped per label (`train_cap_per_label`): GoEmotions has 15k joy and 13k neutral rows, and embedding all of
    them costs more than they add once classes are weighted; dev and test are kept whole."""
    from pipelines.features import text_features

    out: dict[str, dict[str, SplitData]] = {}
    for name, dcfg in cfg["datasets"].items():
        records = read_english(name, root).records
        out[name] = {}
        for split in D.SPLITS:
            rows = [r for r in records if r.source == split]
            if split == "train":
                rows = D.cap_per_label(rows, (dcfg or {}).get("train_cap_per_label"), seed)
            rows = D.limit_records(rows, limit, seed)
            texts = [r.text for r in rows]
            X = {f: text_features(texts, enc, cache_dir, f"{name} {split}") for f, enc in cfg["features"].items()}
            out[name][split] = SplitData(rows, X)
    return out


def stack_split(data: dict[str, dict[str, SplitData]], names, split: str, feat: str):
    """Features, labels and dataset index (the "fold" of per-dataset scores) of `split` over datasets `names`."""
    parts = [data[n][split] for n in names]
    return (
        np.concatenate([d.X[feat] for d in parts]),
        np.concatenate([d.y for d in parts]),
        np.concatenate([np.full(len(d.rows), k) for k, d in enumerate(parts)]),
    )


def crossfit_bias(p: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """`p` with per-class offsets tuned on the other two thirds of the rows (3 stratified folds): an estimate of
    bias tuning on held-out rows that is not tuned on the rows it scores."""
    out = np.empty_like(p)
    for tune, score_rows in D.grouped_folds(y, np.arange(len(y)).astype(str), 3, seed + 1):
        out[score_rows] = apply_bias(p[score_rows], tune_bias(p[tune], y[tune]))
    return out


def _macro_f1(p: np.ndarray, y: np.ndarray) -> float:
    return round(pooled_scores(y, np.array(LABELS)[p.argmax(axis=1)])["pooled_macro_f1"], 4)


def heldout_summary(p: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> dict:
    """Macro-F1 with its bootstrap 95 % CI, accuracy and per-class F1 on one held-out set."""
    from pipelines.report import bootstrap_ci

    pred = np.array(LABELS)[p.argmax(axis=1)]
    s = pooled_scores(y, pred)
    return {
        "n": len(y),
        "macro_f1": round(s["pooled_macro_f1"], 4),
        "macro_f1_ci95": [round(v, 4) for v in bootstrap_ci(y, pred, n_boot, seed)],
        "accuracy": round(s["pooled_accuracy"], 4),
        "per_class_f1": s["pooled_per_class_f1"],
    }


def train_text_en(cfg: dict, seed: int, root, limit, cache_dir) -> tuple[LinearHead, list[dict], dict]:
    """The English words head: the Spanish head's recipe (sentence embeddings → standardise → balanced logistic
    regression → per-class offsets → temperature) on the official splits. Each (features, variant, C) is fitted on
    train and scored on dev (mean macro-F1 over the datasets); offsets and temperature are tuned on dev; test is
    scored once, for the head that ships, which is the train fit itself (not refitted on dev)."""
    data = english_splits(cfg, seed, root, limit, cache_dir)
    evals = list(data)
    n_boot = int(cfg.get("n_boot", 1000))
    results, fits = [], {}
    for feat in cfg["features"]:
        X_dev, y_dev, dev_set = stack_split(data, evals, "dev", feat)
        for variant, names in cfg["variants"].items():
            unknown = set(names) - set(evals)
            if unknown:
                raise ValueError(f"text_en variant {variant}: datasets {sorted(unknown)} not under `datasets`")
            X, y, _ = stack_split(data, names, "train", feat)
            for C in cfg["C"]:
                model = fit_quiet(make_model(C, cfg, seed), X, y)
                p_dev = proba_in_label_order(model, X_dev)
                r = {
                    "head": "text_en",
                    "variant": f"{variant} {feat}",
                    "sources_variant": variant,
                    "features": feat,
                    "datasets": list(names),
                    "C": C,
                    "estimates": {"dev": estimate("dev", y_dev, p_dev, dev_set, "folds = datasets").summary()},
                }
                fits[id(r)] = (model, p_dev)
                results.append(r)
                log.info("text_en %-26s C=%-5g %s", r["variant"], C, _short(r))
    y_dev, dev_set = stack_split(data, evals, "dev", next(iter(cfg["features"])))[1:]
    select_by = cfg.get("select_by", "dev")
    best = choose(results, select_by)
    if cfg.get("bias_tuning"):
        finalists = [choose([r for r in results if r["features"] == f], select_by) for f in cfg["features"]]
        for r in finalists:
            p_b = crossfit_bias(fits[id(r)][1], y_dev, seed)
            r["estimates"]["dev_bias"] = estimate("dev_bias", y_dev, p_b, dev_set, "folds = datasets").summary()
            log.info("text_en %-26s C=%-5g + bias (cross-fitted on dev): %s", r["variant"], r["C"], _short(r))
        select_by = "dev_bias"
        best = choose(finalists, select_by)
    model, p_dev = fits[id(best)]
    feat = best["features"]
    offsets = tune_bias(p_dev, y_dev) if cfg.get("bias_tuning") else np.zeros(len(LABELS))
    raw_test = {n: (proba_in_label_order(model, data[n]["test"].X[feat]), data[n]["test"].y) for n in evals}
    tests = {n: (apply_bias(p, offsets), y) for n, (p, y) in raw_test.items()}
    y_test, test_set = stack_split(data, evals, "test", feat)[1:]
    p_test = np.concatenate([p for p, _ in tests.values()])
    best["estimates"]["test"] = estimate("test", y_test, p_test, test_set, "folds = datasets").summary()
    dev_folds = np.zeros(len(y_dev), dtype=int)
    for k, (_, rows) in enumerate(D.grouped_folds(y_dev, np.arange(len(y_dev)).astype(str), 5, seed)):
        dev_folds[rows] = k
    calib = calibration(
        apply_bias(p_dev, offsets),
        y_dev,
        dev_folds,
        "dev probabilities (after the offsets) of the train fit",
        {f"test {n}": pt for n, pt in tests.items()},
    )
    encoders = list(cfg["features"][feat])
    X, y, _ = stack_split(data, best["datasets"], "train", feat)
    meta = {
        **_text_head_meta("text-en", best, encoders, X, y, cfg, seed),
        "languages": "en",
        "datasets": [f"{n}/train" for n in best["datasets"]],
        "train_cap_per_label": {n: (cfg["datasets"][n] or {}).get("train_cap_per_label") for n in best["datasets"]},
        "heldout": {
            n: {**heldout_summary(p, yt, n_boot, seed), "macro_f1_without_bias": _macro_f1(raw_test[n][0], yt)}
            for n, (p, yt) in tests.items()
        },
        "selected_by": f"{select_by} macro_f1_mean (mean over the datasets' dev sets)",
        "variants_tried": [_tried(r_) for r_ in results],
        "limit": limit,
        "licence": "; ".join(EN_LICENCES[n] for n in best["datasets"]),
        "calibration": calib,
    }
    tuned_on = (
        "the dev probabilities of the train fit; estimate dev_bias tunes them on 2/3 of dev and scores the other"
        " third (3 folds)"
    )
    offsets = offsets if cfg.get("bias_tuning") else None
    return shipped_head(X, y, best["C"], cfg, seed, meta, offsets, tuned_on, calib), results, best


# --------------------------------------------------------------------------- report


def _classifier_meta(C: float, cfg: dict, seed: int) -> dict:
    import sklearn

    return {
        "type": "standardise + multinomial logistic regression (lbfgs)",
        "C": C,
        "class_weight": cfg.get("class_weight"),
        "max_iter": int(cfg.get("max_iter", 5000)),
        "seed": seed,
        "sklearn": sklearn.__version__,
    }


def _tried(r: dict) -> dict:
    return {"variant": r["variant"], "C": r["C"], **{k: v["macro_f1_mean"] for k, v in r["estimates"].items()}}


def _short(r: dict) -> str:
    return "  ".join(
        f"{k}: F1 {v['macro_f1_mean']:.3f}±{v['macro_f1_sd']:.3f} acc {v['accuracy_mean']:.3f}"
        for k, v in r["estimates"].items()
    )


def table(results: list[dict], chosen: dict[str, dict]) -> str:
    head = (
        f"{'head':<8}{'variant':<28}{'C':>6}  {'estimate':<20}{'folds':>5}{'n_test':>7}"
        f"  {'macro-F1 mean±sd':<17}{'pooled F1':>9}{'accuracy':>9}  sel"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        for name, e in r["estimates"].items():
            mark = "*" if chosen.get(r["head"]) is r else ""
            lines.append(
                f"{r['head']:<8}{r['variant']:<28}{r['C']:>6g}  {ESTIMATE_NAMES.get(name, name):<20}{e['folds']:>5}"
                f"{e['n_test']:>7}  {e['macro_f1_mean']:.3f} ± {e['macro_f1_sd']:.3f}    {e['pooled_macro_f1']:>9.3f}"
                f"{e['accuracy_mean']:>9.3f}  {mark}"
            )
    return "\n".join(lines)


def calibrate_voice(config: Path, path: Path, root, cache_dir) -> Path:
    """Fit the temperature of the voice head at `path` (the `ship` recipe of `config`) on that recipe's
    out-of-fold probabilities over the speaker-grouped UEM folds (cached by pipelines.voice_recipes when they have
    been computed before), and write it into the file; ECE before/after cross-fitted over the folds and on the
    held-out speakers test1 + test2 go into its meta. A stream-adapted head (`norm.*`, `prosody.norm.*` arrays) is
    calibrated on the causal-history predictions (order 0), also scored on the mostly-neutral histories, and keeps
    its normalisation and prosody arrays."""
    from pipelines import voice_recipes as V
    from streamer.classifier import VoiceModel

    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    name, seed = cfg["ship"], int(cfg["seed"])
    model = VoiceModel.load(path)
    head = model.head
    shipped = head.meta.get("recipe", {}).get("name")
    if shipped != name:
        raise ValueError(f"{path} was shipped from recipe {shipped!r}, {config} ships {name!r}: ship it first")
    data = V.VoiceData(root, cache_dir, seed, head.meta.get("limit"))
    result = V.evaluate(name, cfg["recipes"][name], data, cfg, cache_dir)
    tests = {"heldout test1+test2": (result.heldout.proba, result.heldout.y_true)} if result.heldout else {}
    view = ""
    if model.adapts:
        view = " (causal stream histories, order 0)"
        for kind, label in (("cv", "cv"), ("heldout", "heldout test1+test2")):
            skewed = result.more.get(f"{kind}|{V.SKEWED} 0")
            if skewed is not None:
                tests[f"{label}, mostly-neutral history"] = (skewed.proba, skewed.y_true)
    calib = calibration(
        result.cv.proba,
        result.cv.y_true,
        result.cv.fold,
        f"out-of-fold probabilities of recipe {name}{view} on the {len(np.unique(result.cv.fold))} speaker-grouped"
        " UEM folds; held-out: the same recipe trained without test1 + test2",
        tests,
    )
    head = dataclasses.replace(head, temperature=calib["temperature"], meta={**head.meta, "calibration": calib})
    dataclasses.replace(model, head=head).save(path)
    log.info("voice head %s: temperature %.4f → %s", head.model_id, calib["temperature"], path)
    return path


HEADS = {
    "voice": (train_voice, VOICE_FILE),
    "text": (train_text, TEXT_FILE),
    "text_en": (train_text_en, TEXT_EN_FILE),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.train_heads", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=D.REPO_ROOT / "configs" / "train" / "heads.yaml")
    p.add_argument("--out", type=Path, default=D.REPO_ROOT / "streamer" / "models")
    p.add_argument("--limit", type=int, default=None, help="use at most N records per dataset (tiny runs)")
    p.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    p.add_argument("--data-dir", type=Path, default=None, help="default: $EMOTION_DATA_DIR or <repo>/../shared/data")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default <repo>/.cache/features)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--report", type=Path, default=None, help="also write every CV result as JSON here")
    p.add_argument(
        "--calibrate-voice",
        type=Path,
        nargs="?",
        const=D.REPO_ROOT / "configs" / "train" / "voice_recipes.yaml",
        default=None,
        metavar="VOICE_RECIPES_YAML",
        help="only fit the temperature of <out>/voice_head.npz (shipped by pipelines.voice_recipes --ship)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.features import DEFAULT_CACHE

    cache_dir = None if args.no_cache else (args.cache_dir or DEFAULT_CACHE)
    if args.calibrate_voice:
        path = calibrate_voice(args.calibrate_voice, args.out / VOICE_FILE, args.data_dir, cache_dir)
        from streamer.models import sha256_of

        print(json.dumps(load_voice_head(path).meta["calibration"], indent=2))
        print(f"{path}: sha256 {sha256_of(path)}")
        return 0
    if args.limit is not None and args.limit < len(LABELS):
        p.error(f"--limit must be at least {len(LABELS)} (one example per label)")

    cfg = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    seed = int(cfg.get("seed", 0))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    all_results, chosen, saved = [], {}, []
    for name in args.heads:
        trainer, filename = HEADS[name]
        t0 = time.perf_counter()
        head, results, chosen[name] = trainer(cfg[name], seed, args.data_dir, args.limit, cache_dir)
        head.meta["recipe"] = {"config": _rel(args.config), **cfg[name], "seed": seed}
        path = _destination(args.out, filename)
        head.save(path)
        saved.append(path)
        all_results.extend(results)
        log.info("%s head %s → %s (%.1f s)", name, head.model_id, path, time.perf_counter() - t0)

    print()
    print(table(all_results, chosen))
    print()
    for path in saved:
        head = LinearHead.load(path)
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB  {head.model_id}  C={head.meta['classifier']['C']:g}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(all_results, indent=2) + "\n", encoding="utf-8")
    return 0


def _destination(out: Path, filename: str) -> Path:
    """Where a head goes: `out/filename`, except that the package's voice head, when it is a non-linear head
    shipped by `pipelines.voice_recipes --ship`, is not overwritten by this LR recipe (it goes beside it)."""
    from streamer.models import VOICE_HEAD

    path = out / filename
    shipped = filename == VOICE_FILE and path.is_file() and path.resolve() == VOICE_HEAD.resolve()
    if shipped and not isinstance(load_voice_head(path), LinearHead):
        alt = out / "voice_head_logreg.npz"
        log.warning(
            "%s is shipped by pipelines.voice_recipes (configs/train/voice_recipes.yaml `ship`): not overwriting"
            " it; this LR voice head goes to %s",
            path,
            alt,
        )
        return alt
    return path


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(D.REPO_ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
