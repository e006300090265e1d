"""Compare voice-head recipes on the speaker-grouped UEM folds of the shipped head; write docs/models/voice_recipes.md.

    .venv/bin/python -m pipelines.train.voice [--config configs/train/voice_recipes.yaml] [--recipes NAME ...]
    .venv/bin/python -m pipelines.train.voice --ship     # refit the config's `ship` recipe on all data

Every recipe is scored on the same 8 folds (UEM, grouped by speaker, `data.grouped_folds` with the seed and clip
list of `pipelines.train.heads`) and on the authors' held-out speakers test1 + test2 (trained on the other 14).
EmoDB is only ever added to training sides. Recipes (see `configs/train/voice_recipes.yaml`):

- `logreg`: mean+std of the encoder frames → standardise → logistic regression (`pipelines.train.linear`, the floor);
- `attention`: BSC-UPC attention pooling over the standardised encoder frames (w_t = softmax(h_t·u/√E)) →
  Linear + Dropout + LayerNorm + GELU → Linear, class-weighted cross-entropy, AdamW, random crops with repeat
  padding; `stats: true` appends the attention-weighted std; `augment: true` swaps each training clip for its
  cached augmented copy (speed / noise / reverberation, re-encoded by Whisper) with p = 0.3 per epoch;
- `mfcc_mlp`: CogniCIC's voice branch, MFCC mean → MLP;
- `window`: the encoder input padded to 10 s (the runtime), 30 s (Whisper's training length) or unpadded (0);
- `stream_norm: true`: the frames normalised per speaker (CMVN; training side: each speaker's own statistics; test
  side: each speaker is a stream, and a clip is normalised by the statistics of that speaker's *earlier* clips,
  shrunk toward the training side's global ones), scored also on mostly-neutral and transductive histories;
  `--ship` of such a recipe writes the runtime's `streamer.adaptation.StreamNorm` (the prior) into the head file;
- `prosody: true` (logreg only): the 15 prosody statistics of `streamer.prosody` (F0, energy, spectral tilt, zero
  crossings, rhythm; cached under `.cache/features/prosody/`) appended to the mean+std pooled frames, or alone with
  `frames: false`; with `stream_norm` the prosody vectors are normalised per speaker as the frames are (each block by
  its own moments, the same histories); `prosody_drop` leaves columns out. `--ship` of such a recipe writes the
  runtime's `streamer.prosody.ProsodyReader` (the columns and their normalisation prior) into the head file, and the
  engine computes the utterance's prosody once, from the segmenter's cut.

Training uses one torch thread and is deterministic for a seed. The frames are those of `Recogniser._encode`, the
single encoder pass the runtime makes; they are cached (float16) under `.cache/features/`.

This module is the runner (a recipe → its out-of-fold predictions, cached); beside it in `pipelines.train.voice`:
`inputs` (clips, folds, a recipe's rows), `models` (torch heads), `norm` (stream normalisation), `costs`, `ship`,
`report` (the page's prose) and `cli` (the command line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from pipelines.data import corpora as D
from pipelines.evaluate.report import Predictions, RecipeResult
from pipelines.train.voice.inputs import (
    AUG_VIEW,
    MAIN,
    FrameSource,
    VoiceData,
    plain_splits,
    prosody_columns,
    recipe_inputs,
    splits_for,
)
from pipelines.train.voice.models import fitter
from pipelines.train.voice.norm import stream_norm_splits
from streamer.frames import LABELS

log = logging.getLogger(__name__)


DEFAULT_CONFIG = D.REPO_ROOT / "configs" / "train" / "voice_recipes.yaml"
DEFAULT_OUT = D.REPO_ROOT / "docs" / "models" / "voice_recipes.md"


AUG_TEST = f"CV, {AUG_VIEW}"
RESULTS_VERSION = 2  # bump when a change to the training code should invalidate cached recipe results


def _robust(name: str, rc: dict, cfg: dict) -> bool:
    """Whether `name` is also scored on the augmented copies of its test clips (10 s window, encoder recipes)."""
    return name in cfg.get("robustness", []) and rc["model"] in ("logreg", "attention") and rc.get("window", 10) == 10


def result_key(rc: dict, data: VoiceData, cfg: dict, robust: bool = False) -> str:
    """Hash of everything a recipe's predictions depend on: its settings, the shared settings, the clips."""
    shared = {k: cfg[k] for k in ("seed", "eval_dataset", "cv_folds", "heldout_speakers", "logreg", "attention", "mlp")}
    if rc.get("stream_norm"):
        shared["stream_norm"] = cfg["stream_norm"]
    if rc.get("prosody"):
        from streamer.prosody import PROSODY_SPEC

        shared["prosody"] = PROSODY_SPEC
    parts = [RESULTS_VERSION, rc, shared] + ([{"robust": True}] if robust else [])
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for name in sorted(rc["datasets"]):
        for c in data.clips[name]:
            digest.update(f"|{c.path.name}:{c.label}:{c.speaker}:{c.path.stat().st_size}".encode())
    return digest.hexdigest()[:24]


def evaluate(name: str, rc: dict, data: VoiceData, cfg: dict, cache_dir: Path | None = None) -> RecipeResult:
    """Out-of-fold predictions on the CV folds and the held-out split (cached as JSON under `cache_dir` when
    given, so a rerun of the table only fits new or changed recipes); costs measured on the way."""
    if rc["model"] == "ensemble":
        return ensemble(name, rc, data, cfg, cache_dir)
    data.load(list(rc["datasets"]))
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / "voice_recipes" / f"{result_key(rc, data, cfg, _robust(name, rc, cfg))}.json"
    if cached is not None and cached.is_file():
        saved = json.loads(cached.read_text(encoding="utf-8"))
        log.info("%-16s cached result %s", name, cached.name)
        preds = {
            k: Predictions(
                *(np.array(v[c]) for c in ("y_true", "y_pred", "fold")),
                proba=np.array(v["proba"]) if "proba" in v else None,
            )
            for k, v in saved["preds"].items()
        }
        more = {k: v for k, v in preds.items() if k not in ("cv", "heldout")}
        return RecipeResult(name, describe(rc), preds["cv"], preds.get("heldout"), saved["extras"], more)
    result = _evaluate(name, rc, data, cfg)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        preds = {"cv": result.cv, **({"heldout": result.heldout} if result.heldout is not None else {}), **result.more}
        payload = {
            "recipe": name,
            "extras": result.extras,
            "preds": {
                k: {
                    "y_true": p.y_true.tolist(),
                    "y_pred": p.y_pred.tolist(),
                    "fold": p.fold.tolist(),
                    "proba": np.round(p.proba, 5).tolist(),
                }
                for k, p in preds.items()
            },
        }
        cached.write_text(json.dumps(payload), encoding="utf-8")
    return result


def ensemble(name: str, rc: dict, data: VoiceData, cfg: dict, cache_dir: Path | None) -> RecipeResult:
    """Soft voting: the mean of the member recipes' out-of-fold probabilities (members fitted on the same folds)."""
    members = [evaluate(m, cfg["recipes"][m], data, cfg, cache_dir) for m in rc["members"]]
    labels = np.array(LABELS)
    preds = {}
    for kind in ("cv", "heldout", *members[0].more):
        parts = [m.more.get(kind) if kind in m.more else getattr(m, kind, None) for m in members]
        if any(p is None for p in parts):
            continue
        proba = np.mean([p.proba for p in parts], axis=0)
        preds[kind] = Predictions(parts[0].y_true, labels[proba.argmax(axis=1)], parts[0].fold, proba)
    extras = {}
    for key in ("head ms/utt", *(k for k in members[0].extras if k.startswith("fit s"))):
        values = [float(m.extras[key]) for m in members if key in m.extras]
        extras[key] = f"{sum(values):.2f}" if key.startswith("head") else f"{sum(values):.0f}"
    more = {k: v for k, v in preds.items() if k not in ("cv", "heldout")}
    return RecipeResult(name, describe(rc), preds["cv"], preds.get("heldout"), extras, more)


def _evaluate(name: str, rc: dict, data: VoiceData, cfg: dict) -> RecipeResult:
    seed = int(cfg["seed"])
    if rc.get("tuned"):  # fine-tuned layers never see the held-out speakers (the CV speakers they do: see describe)
        rc = {**rc, "tuned_without": list(cfg.get("heldout_speakers") or [])}
    inp = recipe_inputs(rc, data, cfg)
    y_ev = data.labels(cfg["eval_dataset"])
    cv_splits, heldout_splits = splits_for(data, cfg)
    fit = fitter(rc, cfg, seed)
    labels = np.array(LABELS)
    if rc.get("stream_norm"):
        split = stream_norm_splits(inp, rc, data, cfg)
    else:
        # robustness: the same fits also score the test clips' augmented copies (other noise / room / speed)
        test_aug = None
        if _robust(name, rc, cfg):
            get = data.pooled if rc["model"] == "logreg" else data.frames
            test_aug = get(cfg["eval_dataset"], FrameSource.of(rc), 0)
        split = plain_splits(inp, test_aug)
    t0 = time.perf_counter()
    predict_s, n_pred = 0.0, 0
    preds, more = {}, {}
    for kind, splits in (("cv", cv_splits), ("heldout", heldout_splits)):
        parts: dict[str, list] = {}  # view → [(y_true, proba, fold)] per split
        for k, (train, test) in enumerate(splits):
            rows, aug, views = split(kind, train, test)
            predict = fit(rows, np.concatenate([y_ev[train], inp.y_extra]), aug)
            for view, test_rows in views.items():
                t1 = time.perf_counter()
                p = predict(test_rows)
                if view == MAIN:
                    predict_s += time.perf_counter() - t1
                    n_pred += len(test)
                parts.setdefault(view, []).append((y_ev[test], p, np.full(len(test), k)))
        for view, got in parts.items():
            proba = np.concatenate([p for _, p, _ in got])
            pred = Predictions(
                np.concatenate([t for t, _, _ in got]),
                labels[proba.argmax(axis=1)],
                np.concatenate([f for _, _, f in got]),
                proba,
            )
            if view == MAIN:
                preds[kind] = pred
            else:
                more[view_key(kind, view)] = pred
        log.info("%-16s %s done (%.0f s so far)", name, kind, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    return RecipeResult(
        name=name,
        description=describe(rc),
        cv=preds["cv"],
        heldout=preds.get("heldout"),
        more=more,
        extras={
            "head ms/utt": f"{1000 * predict_s / max(n_pred, 1):.2f}",
            f"fit s ({len(cv_splits) + len(heldout_splits)} fits)": f"{seconds:.0f}",
        },
    )


def view_key(kind: str, view: str) -> str:
    """The `more` key of a test view: the augmented CV clips keep their column; the stream-normalisation views are
    hidden keys (`kind|view`) that `stream_columns` folds into summary columns."""
    return AUG_TEST if (kind, view) == ("cv", AUG_VIEW) else f"{kind}|{view}"


def describe(rc: dict) -> str:
    if rc["model"] == "ensemble":
        return "mean of the probabilities of " + " and ".join(f"`{m}`" for m in rc["members"])
    pros = rc.get("prosody")
    n_pros = len(prosody_columns(rc)) if pros else 0
    drop = f" without {', '.join(rc['prosody_drop'])}" if pros and rc.get("prosody_drop") else ""
    inputs = f"prosody ({n_pros}{drop})" if pros else "mean+std"
    inputs = f"mean+std + {inputs}" if pros and rc.get("frames", True) else inputs
    model = {
        "logreg": f"{inputs} → LR" + (f" C={rc.get('C')}" if "C" in rc else ""),
        "attention": "attention pooling" + (" + weighted std" if rc.get("stats") else "") + " → MLP",
        "mfcc_mlp": "MFCC-mean (128) → MLP (CogniCIC)",
    }[rc["model"]]
    data = "+".join({D.UEM: "UEM", D.EMODB: "EmoDB", D.URDU: "Urdu"}[n] for n in rc["datasets"])
    no_frames = rc["model"] == "mfcc_mlp" or not rc.get("frames", True)
    window = "" if no_frames else f", {FrameSource.of(rc).name}"
    what = "frames and prosody" if pros and rc.get("frames", True) else "prosody" if pros else "frames"
    norm = f"; {what} normalised per speaker / stream (causal at test)" if rc.get("stream_norm") else ""
    if rc.get("tuned"):
        norm += "; the layer fine-tuned without the held-out speakers but with the CV ones (CV optimistic)"
    copies = int(rc.get("augment") or 0)
    if not copies:
        return f"{model}; {data}{window}{norm}"
    what = f"{copies} aug cop{'y' if copies == 1 else 'ies'}"
    how = " as extra rows" if rc["model"] == "logreg" else " (p 0.3)"
    return f"{model}; {data}{window}, + {what}{how}{norm}"
