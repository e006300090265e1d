"""Evaluation reports from per-fold predictions: classification report, macro-F1 with a bootstrap CI, confusion PNG,
and one markdown table that compares recipes scored on the same folds.

    .venv/bin/python -m pipelines.evaluate.report PRED.csv [PRED.csv ...] --out docs/models/NAME.md

A predictions CSV has the columns `fold,y_true,y_pred` (one row per test item, out-of-fold); the recipe name is
the file stem. `pipelines.train.voice` writes such files and calls `write_report` directly; any other recipe
script (text, fusion) can do the same with its out-of-fold predictions.

Why a bootstrap CI as well as mean ± sd over folds: the fold sd says how much a score moves from speaker to
speaker, the CI says how sure we are of the pooled score itself. The CI resamples test items (clips) with
replacement; clips of one speaker are not independent, so it is narrower than a speaker-level interval would be.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.evaluate.metrics import bootstrap_ci, macro_f1
from streamer.frames import LABELS

log = logging.getLogger(__name__)


@dataclass
class Predictions:
    """Out-of-fold predictions of one recipe on one evaluation (`cv` folds, or a single `heldout` split)."""

    y_true: np.ndarray
    y_pred: np.ndarray
    fold: np.ndarray  # fold number of each test item
    proba: np.ndarray | None = None  # [n, 6] in LABELS order, when the recipe gives probabilities (for ensembles)

    def __post_init__(self) -> None:
        self.y_true, self.y_pred, self.fold = np.asarray(self.y_true), np.asarray(self.y_pred), np.asarray(self.fold)
        if not len(self.y_true) == len(self.y_pred) == len(self.fold):
            raise ValueError("y_true, y_pred and fold differ in length")
        unknown = sorted(set(self.y_true.tolist()) - set(LABELS))
        if unknown:
            raise ValueError(f"unknown labels in y_true: {unknown}")

    def fold_f1(self) -> list[float]:
        return [macro_f1(self.y_true[self.fold == f], self.y_pred[self.fold == f]) for f in np.unique(self.fold)]

    def fold_accuracy(self) -> list[float]:
        hit = self.y_true == self.y_pred
        return [float(np.mean(hit[self.fold == f])) for f in np.unique(self.fold)]


@dataclass
class RecipeResult:
    """One row of the comparison table: a recipe, its estimates, and what it costs."""

    name: str
    description: str
    cv: Predictions
    heldout: Predictions | None = None
    extras: dict[str, str] = field(default_factory=dict)  # more table columns (cost, settings), in order
    more: dict[str, Predictions] = field(default_factory=dict)  # more evaluations: a "macro-F1 mean ± sd" column each


def classification_report(pred: Predictions) -> str:
    from sklearn.metrics import classification_report as sk_report

    return sk_report(pred.y_true, pred.y_pred, labels=list(LABELS), digits=3, zero_division=0)


def confusion_png(pred: Predictions, path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (true label → predicted), counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(pred.y_true, pred.y_pred, labels=list(LABELS))
    rows = cm.sum(axis=1, keepdims=True)
    share = cm / np.where(rows == 0, 1, rows)
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=100)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(LABELS)), LABELS, rotation=45, ha="right")
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for i in range(len(LABELS)):
        for j in range(len(LABELS)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})  # no version/date stamp: reruns give the same bytes
    plt.close(fig)
    return path


def summarise(pred: Predictions, n_boot: int, seed: int) -> dict:
    f1s, accs = pred.fold_f1(), pred.fold_accuracy()
    lo, hi = bootstrap_ci(pred.y_true, pred.y_pred, n_boot, seed)
    return {
        "folds": len(f1s),
        "n": len(pred.y_true),
        "f1_mean": float(np.mean(f1s)),
        "f1_sd": float(np.std(f1s)),
        "acc_mean": float(np.mean(accs)),
        "pooled_f1": macro_f1(pred.y_true, pred.y_pred),
        "ci": (lo, hi),
    }


def slug(name: str) -> str:
    """A file name for a recipe: ASCII letters, digits and -_. only (α and the like become _)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in name)


def write_predictions(pred: Predictions, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["fold", "y_true", "y_pred"])
        w.writerows(zip(pred.fold.tolist(), pred.y_true.tolist(), pred.y_pred.tolist(), strict=True))
    return path


def read_predictions(path: Path) -> Predictions:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("fold", "y_true", "y_pred") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}")
        rows = list(reader)
    return Predictions(
        y_true=np.array([r["y_true"] for r in rows]),
        y_pred=np.array([r["y_pred"] for r in rows]),
        fold=np.array([int(r["fold"]) for r in rows]),
    )


def write_report(
    results: Sequence[RecipeResult],
    out: Path,
    title: str,
    intro: str = "",
    notes: str = "",
    n_boot: int = 1000,
    seed: int = 0,
    cv_name: str = "CV",
    heldout_name: str = "held-out",
    kept: dict[str, dict[str, str]] | None = None,
    order: Sequence[str] | None = None,
) -> Path:
    """The markdown table at `out` plus, in `<out stem>/`, per recipe: classification reports (.txt), confusion
    PNGs and the predictions (.csv) the table was computed from.

    `kept`: rows of recipes not in `results` to carry over from an earlier table (`read_table`: recipe → column →
    cell; their files in `<out stem>/` stay as they are), placed by `order` (recipe names; default: the results,
    then the kept rows). Columns are matched by name and keep the earlier table's order (a new one goes after its
    left neighbour in this run's header); a column one side lacks reads "–"."""
    folder = out.parent / out.stem
    kept = kept or {}
    has_heldout = any(r.heldout is not None for r in results)
    extra_cols = list(dict.fromkeys(k for r in results for k in r.extras))
    more_cols = list(dict.fromkeys(k for r in results for k in r.more))
    head = [
        "recipe",
        "what",
        f"{cv_name} macro-F1 mean ± sd",
        f"{cv_name} pooled macro-F1 [95 % CI]",
        f"{cv_name} acc",
    ]
    if has_heldout:
        head += [f"{heldout_name} macro-F1 [95 % CI]", f"{heldout_name} acc"]
    head += [f"{k} macro-F1 mean ± sd" for k in more_cols] + [*extra_cols, "confusion"]
    columns = list(head)
    if kept:  # the earlier table's columns in their order; this run's new ones each after its left neighbour
        columns = list(dict.fromkeys(c for cells in kept.values() for c in cells))
        for i, c in enumerate(head):
            if c not in columns:
                columns.insert(columns.index(head[i - 1]) + 1 if i else 0, c)
    rows: dict[str, list[str]] = {}
    details: dict[str, str] = {}
    for r in results:
        s = slug(r.name)
        cv = summarise(r.cv, n_boot, seed)
        cells = [
            f"`{r.name}`",
            r.description,
            f"{cv['f1_mean']:.3f} ± {cv['f1_sd']:.3f}",
            f"{cv['pooled_f1']:.3f} [{cv['ci'][0]:.3f}, {cv['ci'][1]:.3f}]",
            f"{cv['acc_mean']:.3f}",
        ]
        report = [f"## {r.name}: {cv_name} ({cv['folds']} folds, {cv['n']} items, pooled)", ""]
        report.append(classification_report(r.cv))
        write_predictions(r.cv, folder / f"{s}_cv.csv")
        confusion_png(r.cv, folder / f"{s}_cv.png", f"{r.name} — {cv_name}, pooled over {cv['folds']} folds")
        if has_heldout:
            if r.heldout is None:
                cells += ["–", "–"]
            else:
                ho = summarise(r.heldout, n_boot, seed)
                cells += [f"{ho['pooled_f1']:.3f} [{ho['ci'][0]:.3f}, {ho['ci'][1]:.3f}]", f"{ho['acc_mean']:.3f}"]
                report += [f"## {r.name}: {heldout_name} ({ho['n']} items)", "", classification_report(r.heldout)]
                write_predictions(r.heldout, folder / f"{s}_heldout.csv")
        for k in more_cols:
            f1s = r.more[k].fold_f1() if k in r.more else []
            cells.append(f"{np.mean(f1s):.3f} ± {np.std(f1s):.3f}" if f1s else "–")
        cells += [r.extras.get(k, "–") for k in extra_cols]
        cells.append(f"[png]({folder.name}/{s}_cv.png)")
        by_column = dict(zip(head, cells, strict=True))
        rows[r.name] = [by_column.get(c, "–") for c in columns]
        (folder / f"{s}_report.txt").write_text("\n".join(report) + "\n", encoding="utf-8")
        details[r.name] = f"- `{r.name}`: [classification report]({folder.name}/{s}_report.txt)"
    for name, cells in kept.items():
        if name not in rows:
            rows[name] = [cells.get(c, "–") for c in columns]
            details[name] = f"- `{name}`: [classification report]({folder.name}/{slug(name)}_report.txt)"
    names = [n for n in (order or []) if n in rows] + [n for n in rows if n not in (order or [])]
    lines = [f"# {title}", "", intro.strip(), "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(rows[n]) + " |" for n in names]
    lines += ["", notes.strip(), "", "Per-recipe classification reports:", "", *(details[n] for n in names), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).replace("\n\n\n", "\n\n"), encoding="utf-8")
    return out


def read_table(path: Path) -> dict[str, dict[str, str]]:
    """The rows of the first table in a markdown file written by `write_report`: recipe name (the first cell, without
    its backticks) → column name → cell."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| recipe |")), None)
    if start is None:
        return {}

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split(" | ")]

    head = cells(lines[start])
    out = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        row = cells(line)
        if len(row) != len(head):
            raise ValueError(f"{path}: a table row has {len(row)} cells, the header {len(head)}: {line[:80]}")
        out[row[0].strip("`")] = dict(zip(head, row, strict=True))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.evaluate.report", description=__doc__.split("\n\n")[0])
    p.add_argument("predictions", nargs="+", type=Path, help="CSV files with fold,y_true,y_pred")
    p.add_argument("--out", type=Path, required=True, help="markdown file to write (PNGs go beside it)")
    p.add_argument("--title", default="Recipe comparison")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    results = [RecipeResult(path.stem, "", read_predictions(path)) for path in args.predictions]
    print(write_report(results, args.out, args.title, n_boot=args.n_boot, seed=args.seed).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
