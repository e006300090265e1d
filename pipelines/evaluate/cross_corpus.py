"""Leave-one-corpus-out scoring of voice recipes: train on every speech corpus but one, test on that one.

    .venv/bin/python -m pipelines.evaluate.cross_corpus [--recipes NAME ...]

In-corpus speaker folds of one acted corpus rewarded what did not transfer to unseen speakers and rooms (issue #18),
so this protocol chooses the shipped voice head: for each corpus (UEM, EmoDB, Urdu), the recipe is refitted as
`--ship` would (`fit_final`) on the other corpora and the resulting runtime `VoiceModel` predicts the held-out
corpus's clips, scored on the labels the two sides share (the probabilities of the other labels are ignored).

Two ways to meet a held-out corpus:
- cold: every clip alone, as `analyze` on one file sees it (a stream-normalised head uses its prior);
- causal: each speaker is a stream whose clips come in a random order, each normalised by that speaker's earlier
  clips, as `run` on a microphone would.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from pipelines.data import corpora as D
from pipelines.evaluate.metrics import shared_label_f1
from pipelines.evaluate.report import read_table
from pipelines.train.voice.inputs import FrameSource, VoiceData
from pipelines.train.voice.recipes import DEFAULT_CONFIG
from pipelines.train.voice.recipes import DEFAULT_OUT as VOICE_RECIPES_OUT
from pipelines.train.voice.ship import fit_final, recipe_closure
from streamer.adaptation import StreamHistory
from streamer.frames import LABELS
from streamer.prosody import PROSODY_NAMES
from streamer.voice_heads import VoiceModel

log = logging.getLogger("pipelines.cross_corpus")

CORPORA = (D.UEM, D.EMODB, D.URDU)
DEFAULT_OUT = D.REPO_ROOT / "docs" / "models" / "cross_corpus.md"
PROBA_CACHE = D.REPO_ROOT / ".cache" / "features" / "cross_corpus"
CV_COLUMN = "CV macro-F1 mean ± sd"  # of voice_recipes.md
HELDOUT_COLUMN = "held-out test1+test2 macro-F1 [95 % CI]"


@dataclass(frozen=True)
class HeldOut:
    """One held-out corpus's scores: macro-F1 over the shared labels, cold and causal, and per-class F1 (cold)."""

    corpus: str
    labels: tuple[str, ...]
    n: int
    cold: float
    causal: float
    per_class: dict[str, float]


@dataclass(frozen=True)
class Probabilities:
    """Every held-out clip's probabilities ([n, 6], LABELS order), cold and causal, its label and its corpus: what
    `pipelines.train.heads --calibrate-voice` fits the shipped head's temperature on."""

    cold: np.ndarray
    causal: np.ndarray
    y: np.ndarray
    corpus: np.ndarray

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, cold=self.cold, causal=self.causal, y=self.y, corpus=self.corpus)

    @classmethod
    def load(cls, path: Path) -> Probabilities:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["cold"], z["causal"], z["y"], z["corpus"])


def loco_config(cfg: dict, name: str, train: list[str]) -> dict:
    """The config with `name` (and its members) trained on the `train` corpora only: `fit_final` trains on the
    config's `eval_dataset` plus the recipe's `datasets`."""
    out = copy.deepcopy(cfg)
    out["eval_dataset"] = train[0]
    for member in recipe_closure(name, cfg):
        if "datasets" in out["recipes"][member]:
            out["recipes"][member]["datasets"] = list(train)
    return out


def prosody_rows(model: VoiceModel, data: VoiceData, corpus: str) -> np.ndarray | None:
    """The raw prosody vectors of the clips in the model's columns (None for a head that reads no prosody)."""
    if model.prosody is None:
        return None
    columns = [PROSODY_NAMES.index(n) for n in model.prosody.names]
    return data.prosody(corpus)[:, columns]


def predict_corpus(
    model: VoiceModel, info: dict, data: VoiceData, corpus: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of every clip of `corpus`, cold (no history) and causal (per speaker, a random order)."""
    source = FrameSource.of_info(info)
    frames = [np.asarray(f, np.float32) for f in data.frames(corpus, source)]
    prosody = prosody_rows(model, data, corpus)
    cold = np.stack([model.predict(f, None, None if prosody is None else prosody[i]) for i, f in enumerate(frames)])
    if not model.adapts:
        return cold, cold
    causal = np.zeros_like(cold)
    speakers = np.array([c.speaker for c in data.clips[corpus]])
    rng = np.random.default_rng(seed)
    for speaker in sorted(set(speakers)):
        history = StreamHistory()
        for i in rng.permutation(np.flatnonzero(speakers == speaker)):
            p = None if prosody is None else prosody[i]
            causal[i] = model.predict(frames[i], history, p)
            history = history.add(frames[i], p)
    return cold, causal


def held_out(name: str, cfg: dict, data: VoiceData, corpus: str) -> tuple[HeldOut, Probabilities]:
    train = [c for c in CORPORA if c != corpus]
    data.load([*train, corpus])
    model, info = fit_final(name, loco_config(cfg, name, train), data)
    y = data.labels(corpus)
    trained = {c.label for t in train for c in data.clips[t]}
    shared = [label for label in LABELS if label in set(y) and label in trained]
    keep = np.isin(y, shared)
    cold, causal = predict_corpus(model, info, data, corpus, int(cfg["seed"]))
    f_cold, per = shared_label_f1(y[keep], cold[keep], shared)
    f_causal, _ = shared_label_f1(y[keep], causal[keep], shared)
    scores = HeldOut(
        corpus, tuple(shared), int(keep.sum()), f_cold, f_causal, dict(zip(shared, per.round(3).tolist(), strict=True))
    )
    return scores, Probabilities(cold[keep], causal[keep], y[keep], np.full(int(keep.sum()), corpus))


def evaluate(name: str, cfg: dict, data: VoiceData) -> tuple[list[HeldOut], Probabilities]:
    """Each corpus held out in turn: its scores, and the probabilities of all held-out clips together."""
    runs = [held_out(name, cfg, data, corpus) for corpus in CORPORA]
    probs = [p for _, p in runs]
    joined = Probabilities(*(np.concatenate([getattr(p, f) for p in probs]) for f in ("cold", "causal", "y", "corpus")))
    return [h for h, _ in runs], joined


def result_path(out: Path, name: str) -> Path:
    return out.with_suffix("") / f"{name.replace('+', '_')}.json"


def proba_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where a run keeps the recipe's held-out probabilities (with the corpora's labels, so in the cache, not docs/)."""
    return (cache_dir or PROBA_CACHE) / f"{name.replace('+', '_')}_proba.npz"


def write_report(out: Path, names: list[str], cfg: dict) -> None:
    """The table of every recipe in `names` that has a stored result, in that order."""
    rows, per_class = [], []
    in_corpus = read_table(VOICE_RECIPES_OUT) if VOICE_RECIPES_OUT.is_file() else {}
    for name in names:
        path = result_path(out, name)
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        held = [HeldOut(**{**h, "labels": tuple(h["labels"])}) for h in res["held_out"]]
        cells = " | ".join(f"{h.cold:.3f} / {h.causal:.3f}" for h in held)
        mean_cold, mean_causal = np.mean([h.cold for h in held]), np.mean([h.causal for h in held])
        shipped = " (shipped)" if name == cfg.get("ship") else ""
        uem = in_corpus.get(name, {})
        cv = uem.get(CV_COLUMN, "–").split(" ")[0]
        heldout = uem.get(HELDOUT_COLUMN, "–").split(" ")[0]
        rows.append(
            f"| `{name}`{shipped} | {cells} | **{mean_cold:.3f}** / {mean_causal:.3f} | {cv} | {heldout} |"
            f" {res['seconds']:.0f} |"
        )
        per_class.append(
            f"| `{name}` | "
            + " | ".join(", ".join(f"{k} {v:.2f}" for k, v in h.per_class.items()) for h in held)
            + " |"
        )
    corpora = " | ".join(f"{c} held out: cold / causal" for c in CORPORA)
    out.write_text(
        "# Voice recipes across corpora (leave one corpus out)\n\n"
        "Reproduce (2 CPU cores; features cached under `.cache/features/`):\n\n"
        "```sh\n.venv/bin/python -m pipelines.evaluate.cross_corpus [--recipes NAME ...]\n```\n\n"
        + "\n\n".join(__doc__.split("\n\n")[2:]).strip()
        + "\n\n"
        "Recipes are those of `configs/train/voice_recipes.yaml` (descriptions and in-corpus scores:"
        " [voice_recipes.md](voice_recipes.md)); their `datasets` are replaced by the training corpora of each split."
        " Macro-F1 over the labels the held-out corpus shares with the training side (UEM and EmoDB: all six; Urdu:"
        " anger, joy, neutral, sadness). The mean of the cold column is what chooses the shipped voice head. The"
        " in-corpus columns are [voice_recipes.md](voice_recipes.md)'s (8 speaker-grouped UEM folds, macro-F1 mean;"
        " the authors' held-out speakers test1 + test2; stream-normalised recipes with causal histories).\n\n"
        f"| recipe | {corpora} | mean: cold / causal | in-corpus: UEM speaker CV | UEM held-out speakers |"
        " fit + predict s |\n|---|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nPer-class F1 (cold):\n\n"
        + "| recipe | "
        + " | ".join(CORPORA)
        + " |\n|---|---|---|---|\n"
        + "\n".join(per_class)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--recipes", nargs="+", help="recipes to (re)score (default: the config's `cross_corpus` list)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--limit", type=int, default=None, help="at most this many clips per corpus (smoke runs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    listed = list(cfg.get("cross_corpus", []))
    unknown = sorted(set(args.recipes or []) - set(cfg["recipes"]))
    if unknown:
        ap.error(f"unknown recipes {unknown}")
    data = VoiceData(None, D.REPO_ROOT / ".cache" / "features", int(cfg["seed"]), args.limit)
    for name in args.recipes or listed:
        t0 = time.perf_counter()
        held, probabilities = evaluate(name, cfg, data)
        path = result_path(args.out, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        probabilities.save(proba_path(name))
        res = {"recipe": name, "held_out": [asdict(h) for h in held], "seconds": time.perf_counter() - t0}
        path.write_text(json.dumps(res, indent=1) + "\n")
        log.info("%s: cold mean %.3f (%s)", name, np.mean([h.cold for h in held]), path)
    write_report(args.out, listed + [n for n in args.recipes or [] if n not in listed], cfg)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
