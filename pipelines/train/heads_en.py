"""The English words head (`text_en` of `configs/train/heads.yaml`): GoEmotions and EmoEvent en on their official
splits, chosen on dev and scored once on test.

Apart from `pipelines.train.heads` because English has official splits where Spanish has grouped folds: what is
fitted, tuned and scored on which rows differs throughout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipelines.data import corpora as D
from pipelines.evaluate.calibration import calibration
from pipelines.evaluate.metrics import estimate, heldout_summary, proba_macro_f1
from pipelines.train.linear import (
    apply_bias,
    crossfit_bias,
    fit_quiet,
    make_model,
    proba_in_label_order,
    shipped_head,
    tune_bias,
)
from pipelines.train.selection import choose, short, text_head_meta, tried
from streamer.frames import LABELS
from streamer.heads import LinearHead

log = logging.getLogger(__name__)


@dataclass
class SplitData:
    """The rows of one dataset's official split and their features (feature set name → [n, d])."""

    rows: list[D.TextRow]
    X: dict[str, np.ndarray]

    @property
    def y(self) -> np.ndarray:
        return np.array([r.label for r in self.rows])


def split_rows(name: str, dcfg: dict | None, seed: int, root, limit) -> dict[str, list[D.TextRow]]:
    """split → rows of one English dataset of the `text_en` recipe. A training split may be capped per label
    (`train_cap_per_label`): GoEmotions has 15k joy and 13k neutral rows, and embedding all of them costs more than
    they add once classes are weighted; dev and test are kept whole."""
    records = D.read_english(name, root).records
    out = {}
    for split in D.SPLITS:
        rows = [r for r in records if r.source == split]
        if split == "train":
            rows = D.cap_per_label(rows, (dcfg or {}).get("train_cap_per_label"), seed)
        out[split] = D.limit_records(rows, limit, seed)
    return out


def english_splits(cfg: dict, seed: int, root, limit, cache_dir) -> dict[str, dict[str, SplitData]]:
    """dataset → split → rows (`split_rows`) and features, for the datasets of the `text_en` recipe."""
    from pipelines.data.features import text_features

    out: dict[str, dict[str, SplitData]] = {}
    for name, dcfg in cfg["datasets"].items():
        out[name] = {}
        for split, rows in split_rows(name, dcfg, seed, root, limit).items():
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


def dev_calibration(p_dev: np.ndarray, y_dev: np.ndarray, seed: int, what: str, tests: dict) -> dict:
    """The English head's temperature, fitted on its dev probabilities (after the offsets; ECE cross-fitted over 5
    stratified folds of dev) and checked on each test set (`tests`: dataset → (p, y))."""
    dev_folds = np.zeros(len(y_dev), dtype=int)
    for k, (_, rows) in enumerate(D.grouped_folds(y_dev, np.arange(len(y_dev)).astype(str), 5, seed)):
        dev_folds[rows] = k
    fitted_on = f"dev probabilities (after the offsets) {what}"
    return calibration(p_dev, y_dev, dev_folds, fitted_on, {f"test {n}": pt for n, pt in tests.items()})


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
                log.info("text_en %-26s C=%-5g %s", r["variant"], C, short(r))
    y_dev, dev_set = stack_split(data, evals, "dev", next(iter(cfg["features"])))[1:]
    select_by = cfg.get("select_by", "dev")
    best = choose(results, select_by)
    if cfg.get("bias_tuning"):
        finalists = [choose([r for r in results if r["features"] == f], select_by) for f in cfg["features"]]
        for r in finalists:
            p_b = crossfit_bias(fits[id(r)][1], y_dev, seed)
            r["estimates"]["dev_bias"] = estimate("dev_bias", y_dev, p_b, dev_set, "folds = datasets").summary()
            log.info("text_en %-26s C=%-5g + bias (cross-fitted on dev): %s", r["variant"], r["C"], short(r))
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
    calib = dev_calibration(apply_bias(p_dev, offsets), y_dev, seed, "of the train fit", tests)
    encoders = list(cfg["features"][feat])
    X, y, _ = stack_split(data, best["datasets"], "train", feat)
    meta = {
        **text_head_meta("text-en", best, encoders, X, y, cfg, seed),
        "languages": "en",
        "datasets": [f"{n}/train" for n in best["datasets"]],
        "train_cap_per_label": {n: (cfg["datasets"][n] or {}).get("train_cap_per_label") for n in best["datasets"]},
        "heldout": {
            n: {**heldout_summary(p, yt, n_boot, seed), "macro_f1_without_bias": proba_macro_f1(raw_test[n][0], yt)}
            for n, (p, yt) in tests.items()
        },
        "selected_by": f"{select_by} macro_f1_mean (mean over the datasets' dev sets)",
        "variants_tried": [tried(r_) for r_ in results],
        "limit": limit,
        "licence": "; ".join(D.EN_LICENCES[n] for n in best["datasets"]),
        "calibration": calib,
    }
    tuned_on = (
        "the dev probabilities of the train fit; estimate dev_bias tunes them on 2/3 of dev and scores the other"
        " third (3 folds)"
    )
    offsets = offsets if cfg.get("bias_tuning") else None
    return shipped_head(X, y, best["C"], cfg, seed, meta, offsets, tuned_on, calib), results, best
