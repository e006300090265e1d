"""The seeds' text recipe: fine-tune a local `transformers` encoder (BETO, MarIA, BERTIN, RoBERTa-BNE, …).

ITST and CogniCIC fine-tuned Spanish BERTs end to end: AdamW at lr 2e-5, batch 16, a 90/10 split, the best
epoch by macro-F1 on the 10 %. Those weights are not shipped here (and nothing is downloaded), so this path is
for users who have a model directory on disk; the package's own words heads stay the frozen-encoder ones
(`pipelines.train.text`). The 10 % is one fold of video-grouped folds, so no video is on both sides.

    .venv/bin/python -m pipelines.train.finetune_text --model-dir /models/beto --out runs/beto [--epochs 4]

Writes the best epoch's model (safetensors) and tokenizer to `--out`, and `metrics.json` (F1 per epoch).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipelines.data import corpora as D
from pipelines.evaluate.metrics import macro_f1
from streamer.frames import LABELS

log = logging.getLogger(__name__)


@dataclass
class FinetuneOptions:
    lr: float = 2e-5
    batch_size: int = 16
    epochs: int = 4
    val_folds: int = 10  # the validation share is one of this many video-grouped folds: 10 % for 10
    max_length: int = 128
    seed: int = 0
    threads: int = 2


def _batches(n: int, size: int, rng: np.random.Generator | None = None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, size):
        yield order[start : start + size]


def finetune(rows: list[D.TextRow], model_dir: str | Path, out: str | Path, opts: FinetuneOptions) -> dict:
    """Fine-tune the model in `model_dir` (local files only) on `rows`; keep and save the best epoch."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # a model name that is not a local directory must fail, not download
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads)
    train_idx, val_idx = D.grouped_folds(
        [r.label for r in rows], [r.youtube_key for r in rows], opts.val_folds, opts.seed
    )[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        local_files_only=True,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
        ignore_mismatched_sizes=True,  # a checkpoint with another classification head gets a new one
    )
    y = torch.tensor([LABELS.index(r.label) for r in rows])

    def encode(idx: np.ndarray) -> dict:
        texts = [rows[i].text for i in idx]
        return tokenizer(texts, padding=True, truncation=True, max_length=opts.max_length, return_tensors="pt")

    def evaluate() -> float:
        model.eval()
        predicted = []
        with torch.no_grad():
            for batch in _batches(len(val_idx), 64):
                logits = model(**encode(val_idx[batch])).logits
                predicted += [LABELS[i] for i in logits.argmax(-1).tolist()]
        return macro_f1([rows[i].label for i in val_idx], predicted)

    optimiser = torch.optim.AdamW(model.parameters(), lr=opts.lr)
    rng = np.random.default_rng(opts.seed)
    history, best = [], (-1.0, 0)
    for epoch in range(1, opts.epochs + 1):
        model.train()
        for batch in _batches(len(train_idx), opts.batch_size, rng):
            idx = train_idx[batch]
            loss = model(**encode(idx), labels=y[idx]).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        f1 = evaluate()
        history.append({"epoch": epoch, "val_macro_f1": round(f1, 4)})
        log.info("epoch %d: validation macro-F1 %.3f", epoch, f1)
        if f1 > best[0]:
            best = (f1, epoch)
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
    metrics = {
        "model_dir": str(model_dir),
        "train_rows": len(train_idx),
        "val_rows": len(val_idx),
        "best_epoch": best[1],
        "best_val_macro_f1": round(best[0], 4),
        "epochs": history,
        "options": asdict(opts),
    }
    Path(out, "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a local transformers model directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=FinetuneOptions.epochs)
    parser.add_argument("--no-extra", action="store_true", help="EmoSPeech train rows only (no extra.csv)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = D.read_emospeech(include_extra=not args.no_extra).records
    print(json.dumps(finetune(rows, args.model_dir, args.out, FinetuneOptions(epochs=args.epochs)), indent=2))


if __name__ == "__main__":
    main()
