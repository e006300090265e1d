"""Train the shipped emotion heads (voice, Spanish text, English text) from a YAML recipe, with estimates.

    .venv/bin/python -m pipelines.train.heads --config configs/train/heads.yaml [--out streamer/models] [--limit N]
    .venv/bin/python -m pipelines.train.heads --calibrate-voice   # temperature of the voice --ship head

Voice: pooled Whisper-base encoder frames (the runtime's features) → standardise → logistic regression, scored
on UEM with speaker-grouped folds and on the authors' two held-out speakers. Text (`text`, Spanish):
multilingual-e5-small embeddings of the EmoSPeech transcripts → standardise → logistic regression, scored with
folds grouped by YouTube video. English text (`text_en`): the same recipe on GoEmotions and EmoEvent en with their
official splits: chosen on dev, scored once on test (`pipelines.train.heads_en`). Every (variant, C) in the
recipe is scored; the best by the recipe's `select_by` estimate is refitted and saved as a `LinearHead` (the
scaler is kept as the head's mean/scale).

Text heads get a softmax temperature fitted on held-out probabilities (out-of-fold for `text`, dev for
`text_en`), with the expected calibration error before and after in their meta; `--calibrate-voice` does the same
for the shipped voice head from its recipe's speaker-grouped out-of-fold probabilities.
The saved meta holds no dates or timings, so a rerun on the same data and environment gives the same head.
The model and its offsets are `pipelines.train.linear`; the grid of (variant, C) is `pipelines.train.selection`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from pipelines.data import corpora as D
from pipelines.evaluate.calibration import calibration
from pipelines.evaluate.metrics import estimate
from pipelines.train.heads_en import train_text_en
from pipelines.train.linear import classifier_meta, final_head, inner_bias, label_counts, oof_proba, shipped_head
from pipelines.train.selection import choose, score, short, table, text_head_meta, tried
from streamer.classifier import LinearHead, load_voice_head
from streamer.frames import LABELS

log = logging.getLogger("pipelines.train.heads")

VOICE_FILE, TEXT_FILE, TEXT_EN_FILE = "voice_head.npz", "text_head.npz", "text_head_en.npz"


# --------------------------------------------------------------------------- voice


def train_voice(cfg: dict, seed: int, root, limit, cache_dir) -> tuple[LinearHead, list[dict], dict]:
    from pipelines.data.features import VOICE_FEATURE_SPEC, VoiceFeaturizer
    from streamer.recogniser import RecogniserOptions

    opts = RecogniserOptions()
    if float(cfg["encoder_window_s"]) != opts.encoder_window_s:
        log.warning(
            "recipe encoder_window_s %s differs from the runtime default %s: features will not match the runtime",
            cfg["encoder_window_s"],
            opts.encoder_window_s,
        )
    opts.encoder_window_s = float(cfg["encoder_window_s"])
    readers = D.VOICE_READERS
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
            log.info("voice %-10s C=%-5g %s", variant, C, short(results[-1]))

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
        "classifier": classifier_meta(best["C"], cfg, seed),
        "cv": best["estimates"],
        "selected_by": f"{cfg.get('select_by', 'cv')} macro_f1_mean",
        "variants_tried": [tried(r_) for r_ in results],
        "limit": limit,
        "licence": "; ".join(D.VOICE_LICENCES[n] for n in names),
    }
    return final_head(X, y, best["C"], cfg, seed, meta), results, best


# --------------------------------------------------------------------------- text


def train_text(cfg: dict, seed: int, root, limit, cache_dir) -> tuple[LinearHead, list[dict], dict]:
    from pipelines.data.features import text_features

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
    splits_all = D.text_folds(rows, int(cfg["cv_folds"]), seed)

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
                log.info("text  %-20s C=%-5g %s", results[-1]["variant"], C, short(results[-1]))

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
                short({"estimates": {"cv_bias": r["estimates"]["cv_bias"]}}),
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
        **text_head_meta("text-emospeech", best, encoders, X, y, cfg, seed),
        "datasets": best["datasets"],
        "cv_grouping": "youtube_key, folds over train+extra; every variant scored on the same rows",
        "selected_by": f"{select_by} macro_f1_mean",
        "variants_tried": [tried(r_) for r_ in results],
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


# --------------------------------------------------------------------------- the shipped voice head's temperature


def calibrate_voice(config: Path, path: Path, root, cache_dir) -> Path:
    """Fit the temperature of the voice head at `path` (the `ship` recipe of `config`) on that recipe's
    leave-one-corpus-out probabilities (`pipelines.evaluate.cross_corpus`, cold) when that run has stored them, else
    on its out-of-fold probabilities over the speaker-grouped UEM folds (cached by pipelines.train.voice when they
    have been computed before), and write it into the file; ECE before/after cross-fitted over the folds and on the
    held-out speakers test1 + test2 go into its meta. A stream-adapted head (`norm.*`, `prosody.norm.*` arrays) is
    calibrated on the causal-history predictions (order 0), also scored on the mostly-neutral histories, and keeps
    its normalisation and prosody arrays."""
    from pipelines.evaluate import cross_corpus
    from pipelines.train.voice.inputs import VoiceData
    from pipelines.train.voice.norm import SKEWED
    from pipelines.train.voice.recipes import evaluate
    from streamer.classifier import VoiceModel

    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    name, seed = cfg["ship"], int(cfg["seed"])
    model = VoiceModel.load(path)
    head = model.head
    shipped = head.meta.get("recipe", {}).get("name")
    if shipped != name:
        raise ValueError(f"{path} was shipped from recipe {shipped!r}, {config} ships {name!r}: ship it first")
    data = VoiceData(root, cache_dir, seed, head.meta.get("limit"))
    result = evaluate(name, cfg["recipes"][name], data, cfg, cache_dir)
    tests = {"heldout test1+test2": (result.heldout.proba, result.heldout.y_true)} if result.heldout else {}
    view = ""
    if model.adapts:
        view = " (causal stream histories, order 0)"
        for kind, label in (("cv", "cv"), ("heldout", "heldout test1+test2")):
            skewed = result.more.get(f"{kind}|{SKEWED} 0")
            if skewed is not None:
                tests[f"{label}, mostly-neutral history"] = (skewed.proba, skewed.y_true)
    loco = cross_corpus.proba_path(name, Path(cache_dir) / "cross_corpus" if cache_dir else None)
    if loco.is_file():  # fitted where the head meets corpora it never saw; the in-corpus folds become a test
        held = cross_corpus.Probabilities.load(loco)
        tests = {f"cv{view}": (result.cv.proba, result.cv.y_true), **tests}
        calib = calibration(
            held.cold,
            held.y,
            held.corpus,
            f"leave-one-corpus-out probabilities of recipe {name}, each clip alone (cold), on"
            f" {', '.join(dict.fromkeys(held.corpus))} ({D.repo_relative(loco)}); cross-fitted over the corpora",
            tests,
        )
    else:
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


# --------------------------------------------------------------------------- main

HEADS = {
    "voice": (train_voice, VOICE_FILE),
    "text": (train_text, TEXT_FILE),
    "text_en": (train_text_en, TEXT_EN_FILE),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.train.heads", description=__doc__.split("\n\n")[0])
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
        help="only fit the temperature of <out>/voice_head.npz (shipped by pipelines.train.voice --ship)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.data.features import DEFAULT_CACHE

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
        head.meta["recipe"] = {"config": D.repo_relative(args.config), **cfg[name], "seed": seed}
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
    shipped by `pipelines.train.voice --ship`, is not overwritten by this LR recipe (it goes beside it)."""
    from streamer.models import VOICE_HEAD

    path = out / filename
    shipped = filename == VOICE_FILE and path.is_file() and path.resolve() == VOICE_HEAD.resolve()
    if shipped and not isinstance(load_voice_head(path), LinearHead):
        alt = out / "voice_head_logreg.npz"
        log.warning(
            "%s is shipped by pipelines.train.voice (configs/train/voice_recipes.yaml `ship`): not overwriting"
            " it; this LR voice head goes to %s",
            path,
            alt,
        )
        return alt
    return path


if __name__ == "__main__":
    sys.exit(main())
