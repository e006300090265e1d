"""Fine-tuned e5 for the English words head: does training the encoder pay on GoEmotions, where the Spanish folds
said it does not? (issue #17, item 5.)

    .venv/bin/python -m pipelines.train.finetune_e5_en [--out docs/models/text_recipes.md] [--limit N]

Rows: the English head's (`text_en` of `configs/train/heads.yaml`: GoEmotions' official splits, train capped per
label). The recipe named under `english:` in `configs/train/text_finetune.yaml` trains on train and keeps its best
epoch by dev macro-F1 (dev plays the Spanish recipe's 10 % validation split); it is scored as shipped (its trained
layers in the monitor's int8 onnxruntime graph) on test, once, beside the frozen probe on the same layers and the
shipped English recipe. Every row is given raw and with per-class offsets tuned on dev, as the English head ships.
Writes its own section of `docs/models/text_recipes.md`.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np
import yaml

from pipelines.data import corpora as D
from pipelines.train.finetune_e5 import load_config, recipe_of
from pipelines.train.finetune_e5_model import Encoder, engine_proba, train
from pipelines.train.finetune_e5_report import per_class_cell, pooled_cell, summary
from pipelines.train.heads_en import split_rows
from pipelines.train.linear import apply_bias, proba_in_label_order, tune_bias
from streamer.frames import LABELS

log = logging.getLogger("pipelines.train.finetune_e5_en")

CONFIG = D.REPO_ROOT / "configs" / "train" / "text_finetune.yaml"
HEADS = D.REPO_ROOT / "configs" / "train" / "heads.yaml"
DEFAULT_OUT = D.REPO_ROOT / "docs" / "models" / "text_recipes.md"
SECTION = "## English: fine-tuned e5 on GoEmotions"
FROZEN_FEATURES = {"e5layers": ["e5layers"], "use": ["use"], "e5layers+use": ["e5layers", "use"]}


def frozen_proba(X: dict[str, np.ndarray], y_train: np.ndarray, y_dev: np.ndarray, grid, seed: int):
    """Per frozen feature set: the logistic regression whose C (from the English head's grid) scores best on dev;
    its dev and test probabilities."""
    from pipelines.evaluate.metrics import macro_f1
    from pipelines.train.text import fit_embedding

    names = np.array(LABELS)
    out = {}
    for feat, (train_X, dev_X, test_X) in X.items():
        fits = [fit_embedding(C, train_X, names[y_train], None, seed) for C in grid]
        dev = [proba_in_label_order(m, dev_X) for m in fits]
        best = int(np.argmax([macro_f1(y_dev, p.argmax(1)) for p in dev]))
        out[feat] = (dev[best], proba_in_label_order(fits[best], test_X), grid[best])
    return out


def table(y_dev: np.ndarray, y_test: np.ndarray, probas: dict[str, tuple[np.ndarray, np.ndarray]], about) -> list[str]:
    """One row per recipe: test scores raw and with dev-tuned offsets, and the dev macro-F1 that chose it."""
    from pipelines.evaluate.metrics import macro_f1

    names = np.array(LABELS)
    one_fold = np.zeros(len(y_test), int)
    lines = [
        "| recipe | what | test macro-F1 [95 % CI] | with dev offsets [95 % CI] | accuracy (offsets) | "
        "per-class F1 with offsets (ang/dis/fea/joy/neu/sad) | dev macro-F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (p_dev, p_test) in probas.items():
        raw = summary(y_test, p_test, one_fold)
        tuned = summary(y_test, apply_bias(p_test, tune_bias(p_dev, names[y_dev])), one_fold)
        lines.append(
            f"| `{name}` | {about[name]} | {pooled_cell(raw)} | {pooled_cell(tuned)} | {tuned['accuracy']:.3f} | "
            f"{per_class_cell(tuned)} | {macro_f1(y_dev, p_dev.argmax(1)):.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    from pipelines.data.features import DEFAULT_CACHE, text_features
    from pipelines.train.text import write_section

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None, help="at most N rows of each split (tiny runs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_config(args.config)
    heads_cfg = yaml.safe_load(HEADS.read_text())["text_en"]
    name = cfg["english"]["recipe"]
    recipe = recipe_of(cfg, name)
    seed = int(cfg["seed"])
    rows = split_rows(D.GOEMOTIONS, heads_cfg["datasets"][D.GOEMOTIONS], seed, args.data_dir, args.limit)
    texts = {split: [r.text for r in rs] for split, rs in rows.items()}
    y = {split: np.array([LABELS.index(r.label) for r in rs]) for split, rs in rows.items()}

    X = {
        feat: tuple(text_features(texts[s], enc, DEFAULT_CACHE, f"goemotions {s}") for s in D.SPLITS)
        for feat, enc in FROZEN_FEATURES.items()
    }
    frozen = frozen_proba(X, y["train"], y["dev"], heads_cfg["C"], seed)

    t0 = time.perf_counter()
    encoder = Encoder(recipe.threads)
    all_texts = texts["train"] + texts["dev"] + texts["test"]
    all_y = np.concatenate([y[s] for s in D.SPLITS])
    n_train, n_dev = len(texts["train"]), len(texts["dev"])
    trained = train(
        encoder, recipe, all_texts, all_y, np.arange(n_train), np.arange(n_train, n_train + n_dev), seed
    )  # fmt: skip
    tuned = {s: engine_proba(encoder, recipe, [trained], texts[s], recipe.threads) for s in ("dev", "test")}
    minutes = (time.perf_counter() - t0) / 60
    log.info("%s: best epoch %d, %.0f min", name, trained.best_epoch, minutes)

    probas = {
        "e5layers": frozen["e5layers"][:2],
        "e5layers+use": frozen["e5layers+use"][:2],
        name: (tuned["dev"], tuned["test"]),
        f"avg({name},use)": ((tuned["dev"] + frozen["use"][0]) / 2, (tuned["test"] + frozen["use"][1]) / 2),
    }
    about = {
        "e5layers": f"frozen: e5's layers 6, 9, 12 pooled → logistic regression (C {frozen['e5layers'][2]:g}, by dev)",
        "e5layers+use": "frozen: the shipped English recipe's features, e5layers ⊕ USE → logistic regression "
        f"(C {frozen['e5layers+use'][2]:g}, by dev)",
        name: f"fine-tuned: {cfg['recipes'][name]['about']}; best epoch {trained.best_epoch} of {recipe.epochs} by dev",
        f"avg({name},use)": f"mean of `{name}` and frozen USE (C {frozen['use'][2]:g}): the fine-tuned "
        "counterpart of `e5layers+use`",
    }
    limit = f" --limit {args.limit}" if args.limit else ""
    lines = [
        SECTION,
        "",
        "Reproduce (2 CPU cores; frozen embeddings cached):",
        "",
        "```sh",
        f".venv/bin/python -m pipelines.train.finetune_e5_en{limit}",
        "```",
        "",
        f"The English head's rows: GoEmotions train {n_train} (capped per label as in `text_en` of "
        f"`configs/train/heads.yaml`), dev {n_dev}, test {len(y['test'])}. The fine-tuned recipe is `{name}` of "
        "`configs/train/text_finetune.yaml` (the best Spanish fine-tuning), trained on train, its epoch picked by "
        "dev macro-F1, scored as shipped (its layers in the monitor's int8 onnxruntime graph). Offsets: per-class, "
        "tuned on dev for macro-F1 (as the English head ships). Test is scored once; CI: 1,000 bootstrap resamples.",
        "",
        *table(y["dev"], y["test"], probas, about),
        "",
        f"Fine-tuning time (training and scoring dev and test as shipped): {minutes:.0f} min.",
        "",
    ]
    write_section(args.out, SECTION, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
