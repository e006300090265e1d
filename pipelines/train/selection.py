"""A head recipe's grid of (variant, C): each scored on the same folds, the best chosen, the tries summarised.

Kept apart from the trainers so that the Spanish and English text heads and the voice head choose and report
alike (`pipelines.train.heads`, `pipelines.train.heads_en`).
"""

from __future__ import annotations

import numpy as np

from pipelines.evaluate.metrics import Estimate, pooled_scores
from pipelines.train.linear import classifier_meta, fit_quiet, label_counts, make_model
from streamer.frames import LABELS
from streamer.words import TEXT_ENCODERS

ESTIMATE_NAMES = {
    "cv": "grouped CV",
    "heldout": "held-out speakers",
    "cv_bias": "grouped CV + bias",
    "dev": "dev",
    "dev_bias": "dev + bias (3-fold)",
    "test": "test (official)",
}
ENCODER_TAGS = {"e5": "e5small", "e5layers": "e5small-int8-l6-9-12", "use": "usem3"}
TEXT_FEATURE_SPECS = {"e5": "e5-query-prefix-384", "e5layers": "e5-query-prefix-l6-9-12-1152", "use": "usem3-512"}


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


def text_head_meta(
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
        "classifier": classifier_meta(best["C"], cfg, seed),
        "cv": best["estimates"],
    }


def choose(results: list[dict], select_by: str) -> dict:
    """Best macro-F1 (mean over folds) on `select_by`; ties go to the earlier (simpler, smaller C) entry."""
    return max(results, key=lambda r: (r["estimates"][select_by]["macro_f1_mean"], -results.index(r)))


def tried(r: dict) -> dict:
    return {"variant": r["variant"], "C": r["C"], **{k: v["macro_f1_mean"] for k, v in r["estimates"].items()}}


def short(r: dict) -> str:
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
