"""Compare voice-head recipes on the speaker-grouped UEM folds of the shipped head; write docs/models/voice_recipes.md.

    .venv/bin/python -m pipelines.voice_recipes [--config configs/train/voice_recipes.yaml] [--recipes NAME ...]
    .venv/bin/python -m pipelines.voice_recipes --ship     # refit the config's `ship` recipe on all data

Every recipe is scored on the same 8 folds (UEM, grouped by speaker, `data.grouped_folds` with the seed and clip
list of `pipelines.train_heads`) and on the authors' held-out speakers test1 + test2 (trained on the other 14).
EmoDB is only ever added to training sides. Recipes (see `configs/train/voice_recipes.yaml`):

- `logreg`: mean+std of the encoder frames → standardise → logistic regression (train_heads' model, the floor);
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
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from pipelines import data as D
from pipelines.report import Predictions, RecipeResult, read_table, summarise, write_report
from pipelines.train_heads import (
    VOICE_LICENCES,
    _rel,
    final_head,
    fit_quiet,
    label_counts,
    make_model,
    proba_in_label_order,
)
from streamer.adaptation import FrameMoments, StreamNorm
from streamer.classifier import AttentionHead, EnsembleHead, VoiceModel, voice_features
from streamer.frames import LABELS
from streamer.prosody import ProsodyReader

log = logging.getLogger("pipelines.voice_recipes")

DEFAULT_CONFIG = D.REPO_ROOT / "configs" / "train" / "voice_recipes.yaml"
DEFAULT_OUT = D.REPO_ROOT / "docs" / "models" / "voice_recipes.md"
READERS = {D.UEM: D.read_uem, D.EMODB: D.read_emodb}


# --------------------------------------------------------------------------- data


@dataclass
class VoiceData:
    """Clips of each dataset (readable ones only) and their features, loaded lazily per (window, copy)."""

    root: Path | None
    cache_dir: Path | None
    seed: int
    limit: int | None
    clips: dict[str, list[D.SpeechClip]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    _views: dict = field(default_factory=dict)
    _featurizers: dict = field(default_factory=dict)

    def load(self, names: list[str]) -> None:
        for name in names:
            if name in self.clips:
                continue
            if name not in READERS:
                raise ValueError(f"unknown dataset {name} (known: {sorted(READERS)})")
            loaded = READERS[name](self.root)
            for reason, n in loaded.skipped.items():
                self.skipped[f"{name}: {reason}"] += n
            chosen = D.limit_records(loaded.records, self.limit, self.seed)
            # the canonical pass (10 s window, the runtime's) decides which clips are readable
            seqs, kept, bad = self.featurizer(10.0).many_frames(chosen, f"frames w10 {name}")
            for reason, n in bad.items():
                self.skipped[f"{name}: {reason}"] += n
            self.clips[name] = kept
            self._views[(name, 10.0, None)] = seqs

    def featurizer(self, window: float):
        from pipelines.features import VoiceFeaturizer
        from streamer.recogniser import RecogniserOptions

        if window not in self._featurizers:
            self._featurizers[window] = VoiceFeaturizer(self.cache_dir, RecogniserOptions(encoder_window_s=window))
        return self._featurizers[window]

    def labels(self, name: str) -> np.ndarray:
        return np.array([c.label for c in self.clips[name]])

    def frames(self, name: str, window: float, augment: int | None = None) -> list[np.ndarray]:
        key = (name, float(window), augment)
        if key not in self._views:
            seqs, _, bad = self.featurizer(float(window)).many_frames(
                self.clips[name],
                f"frames w{window:g} {name}" + ("" if augment is None else f" aug{augment}"),
                augment,
                self.seed,
            )
            if bad:  # readable in the canonical pass, so this is a bug rather than bad input
                raise RuntimeError(f"{name}: {sum(bad.values())} clips failed at window {window} / copy {augment}")
            self._views[key] = seqs
        return self._views[key]

    def pooled(self, name: str, window: float, augment: int | None = None) -> np.ndarray:
        return np.stack([voice_features(s) for s in self.frames(name, window, augment)])

    def prosody(self, name: str) -> np.ndarray:
        """`streamer.prosody.prosody_features` of each clip ([clips, len(PROSODY_NAMES)]), cached on disk."""
        from pipelines.features import ProsodyFeaturizer

        return self._per_clip(name, "prosody", ProsodyFeaturizer)

    def mfcc(self, name: str) -> np.ndarray:
        from pipelines.features import MfccFeaturizer

        return self._per_clip(name, "mfcc", MfccFeaturizer)

    def _per_clip(self, name: str, kind: str, featurizer: Callable) -> np.ndarray:
        """One vector per clip of `name` ([clips, dim]) from `featurizer(cache_dir).one(path)`, kept in memory."""
        key = (name, kind)
        if key not in self._views:
            one = featurizer(self.cache_dir).one
            self._views[key] = np.stack([one(c.path) for c in self.clips[name]])
        return self._views[key]


def splits_for(data: VoiceData, cfg: dict) -> tuple[list, list]:
    """The CV folds of `train_heads` (same clips, labels, speakers and seed) and the held-out-speaker split."""
    ev = cfg["eval_dataset"]
    y = data.labels(ev)
    speakers = np.array([c.speaker for c in data.clips[ev]])
    cv = D.grouped_folds(y, speakers, int(cfg["cv_folds"]), int(cfg["seed"]))
    held = np.isin(speakers, cfg.get("heldout_speakers") or [])
    heldout = [(np.flatnonzero(~held), np.flatnonzero(held))] if held.any() and (~held).any() else []
    return cv, heldout


# --------------------------------------------------------------------------- torch heads


def _torch():
    import torch

    torch.set_num_threads(1)  # the machine's cores are shared; one thread keeps runs deterministic too
    return torch


def class_weights(y: np.ndarray) -> np.ndarray:
    """`balanced` weights n / (K · n_k) in LABELS order (0 for a class absent from y)."""
    counts = np.array([np.sum(y == label) for label in LABELS], dtype=np.float64)
    return np.where(counts > 0, len(y) / (len(LABELS) * np.maximum(counts, 1)), 0.0)


def crop(seq: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random `length`-frame window of seq; a shorter seq is repeated until it fills the window."""
    if len(seq) >= length:
        start = int(rng.integers(0, len(seq) - length + 1))
        return seq[start : start + length]
    return np.concatenate([seq] * math.ceil(length / len(seq)))[:length]


def make_attention_net(dim: int, hidden: int, dropout: float, stats: bool):
    torch = _torch()
    nn = torch.nn

    class AttentionNet(nn.Module):
        """The torch twin of `streamer.classifier.AttentionHead` (same layers, same GELU)."""

        def __init__(self) -> None:
            super().__init__()
            self.u = nn.Parameter(torch.empty(dim, 1))
            nn.init.xavier_uniform_(self.u)
            self.fc1 = nn.Linear(dim * (2 if stats else 1), hidden)
            self.drop = nn.Dropout(dropout)
            self.ln = nn.LayerNorm(hidden, eps=AttentionHead.LN_EPS)
            self.act = nn.GELU(approximate="tanh")
            self.fc2 = nn.Linear(hidden, len(LABELS))

        def pool(self, h):  # h: [B, T, E] standardised frames
            w = torch.softmax((h @ self.u).squeeze(-1) / math.sqrt(dim), dim=1).unsqueeze(1)  # [B, 1, T]
            c = torch.bmm(w, h).squeeze(1)
            if not stats:
                return c
            # Σ w (h − c)² = Σ w h² − c²: two matrix products instead of several [B, T, E] element-wise passes
            var = torch.clamp(torch.bmm(w, h * h).squeeze(1) - c * c, min=0.0)
            return torch.cat([c, torch.sqrt(var + AttentionHead.STD_EPS)], dim=1)

        def forward(self, h):
            return self.fc2(self.act(self.ln(self.drop(self.fc1(self.pool(h))))))

    return AttentionNet()


def to_head(net, mean: np.ndarray, scale: np.ndarray, stats: bool, meta: dict) -> AttentionHead:
    def arr(t) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float32)

    return AttentionHead(
        labels=LABELS,
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        u=arr(net.u)[:, 0],
        w1=arr(net.fc1.weight),
        b1=arr(net.fc1.bias),
        ln_gain=arr(net.ln.weight),
        ln_bias=arr(net.ln.bias),
        w2=arr(net.fc2.weight),
        b2=arr(net.fc2.bias),
        stats=stats,
        meta=meta,
    )


def train_attention(
    seqs: list[np.ndarray],
    y: np.ndarray,
    acfg: dict,
    stats: bool,
    seed: int,
    aug: list[list[np.ndarray]] | None = None,
    meta: dict | None = None,
) -> AttentionHead:
    """Train the attention head on frame sequences (aug[k][i] is seqs[i]'s augmented copy k); numpy weights out."""
    torch = _torch()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    frames = np.concatenate(seqs).astype(np.float32)
    mean, scale = frames.mean(axis=0), np.maximum(frames.std(axis=0), 1e-5)  # training-set normalisation
    del frames
    seqs = [(s.astype(np.float32) - mean) / scale for s in seqs]  # once, not per batch
    aug = None if not aug else [[(s.astype(np.float32) - mean) / scale for s in copy] for copy in aug]
    net = make_attention_net(seqs[0].shape[1], int(acfg["hidden"]), float(acfg["dropout"]), stats)
    opt = torch.optim.AdamW(net.parameters(), lr=float(acfg["lr"]), weight_decay=float(acfg["weight_decay"]))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=float(acfg["plateau_factor"]), patience=int(acfg["plateau_patience"])
    )
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(class_weights(y), dtype=torch.float32))
    target = torch.tensor([LABELS.index(v) for v in y])
    length, batch, p_aug = int(acfg["crop_frames"]), int(acfg["batch"]), float(acfg.get("augment_p", 0.3))
    net.train()
    for _ in range(int(acfg["epochs"])):
        order = rng.permutation(len(seqs))
        total = 0.0
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            swap = rng.random(len(idx)) < p_aug if aug is not None else np.zeros(len(idx), bool)
            xb = np.stack([crop(_pick(seqs, aug, i, s, rng), length, rng) for i, s in zip(idx, swap, strict=True)])
            h = torch.from_numpy(xb)
            loss = loss_fn(net(h), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step(total / len(order))
    net.eval()
    return to_head(net, mean, scale, stats, meta or {})


def _pick(seqs: list, aug: list[list] | None, i: int, swap: bool, rng: np.random.Generator) -> np.ndarray:
    """Clip i, or one of its augmented copies when `swap` (a copy is drawn only when there are several)."""
    if not swap or aug is None:
        return seqs[i]
    return aug[0][i] if len(aug) == 1 else aug[int(rng.integers(len(aug)))][i]


class MlpHead:
    """CogniCIC's voice branch on standardised MFCC means (torch; used in the comparison only, never shipped)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, mcfg: dict, seed: int) -> None:
        torch = _torch()
        nn = torch.nn
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        self.mean, self.scale = X.mean(axis=0), np.maximum(X.std(axis=0), 1e-5)
        hidden = int(mcfg["hidden"])
        self.net = nn.Sequential(
            nn.Linear(X.shape[1], hidden), nn.ReLU(), nn.Dropout(float(mcfg["dropout"])), nn.Linear(hidden, len(LABELS))
        )
        opt = torch.optim.Adam(self.net.parameters(), lr=float(mcfg["lr"]))
        loss_fn = nn.CrossEntropyLoss()
        Xt = torch.from_numpy(((X - self.mean) / self.scale).astype(np.float32))
        target = torch.tensor([LABELS.index(v) for v in y])
        batch = int(mcfg["batch"])
        self.net.train()
        for _ in range(int(mcfg["epochs"])):
            order = rng.permutation(len(y))
            for start in range(0, len(order), batch):
                idx = torch.from_numpy(order[start : start + batch])
                loss = loss_fn(self.net(Xt[idx]), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net.eval()

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        torch = _torch()
        with torch.no_grad():
            z = self.net(torch.from_numpy(((X - self.mean) / self.scale).astype(np.float32)))
            return torch.softmax(z, dim=1).numpy().astype(np.float64)


# --------------------------------------------------------------------------- recipes


@dataclass
class Inputs:
    """A recipe's inputs: the evaluation rows, the always-training extra rows, and their augmented copies."""

    ev: list | np.ndarray
    extra: list | np.ndarray
    y_extra: np.ndarray
    ev_aug: list | None = None  # one entry per augmented copy
    extra_aug: list | None = None
    prosody: Inputs | None = None  # stream_norm recipes with `prosody: true`: the prosody vectors as [1, P] rows,
    # normalised per speaker on their own and appended after pooling (plain recipes have them inside `ev`)

    def train_aug(self, train: np.ndarray | None = None) -> list | None:
        """The augmented copies of the training rows (all evaluation rows when `train` is None) + extras."""
        if not self.ev_aug:
            return None
        return [
            _cat(e if train is None else _take(e, train), x) for e, x in zip(self.ev_aug, self.extra_aug, strict=True)
        ]


def _cat(a, b):
    if isinstance(a, list):
        return list(a) + list(b)
    return np.concatenate([a, b]) if len(b) else a


def _take(rows, idx):
    return [rows[i] for i in idx] if isinstance(rows, list) else rows[idx]


def recipe_inputs(rc: dict, data: VoiceData, cfg: dict) -> Inputs:
    ev = cfg["eval_dataset"]
    if ev not in rc["datasets"]:
        raise ValueError(f"recipe must train on the evaluation dataset {ev}: {rc['datasets']}")
    others = [n for n in rc["datasets"] if n != ev]
    data.load([ev, *others])
    window = float(rc.get("window", 10))
    model, copies = rc["model"], int(rc.get("augment") or 0)  # true → 1 copy
    y_extra = np.array([c.label for n in others for c in data.clips[n]])
    if model == "mfcc_mlp":
        return Inputs(data.mfcc(ev), _stack([data.mfcc(n) for n in others], 128), y_extra)
    if rc.get("prosody") or not rc.get("frames", True):
        return prosody_inputs(rc, data, cfg)
    if model == "logreg" and not rc.get("stream_norm"):
        get = data.pooled
        empty = 1024
    elif model in ("attention", "logreg"):  # a stream-norm LR pools after normalising the frames
        get, empty = data.frames, None
    else:
        raise ValueError(f"unknown model {model!r} (known: logreg, attention, mfcc_mlp)")
    if rc.get("stream_norm") and not cfg.get("stream_norm"):
        raise ValueError("a stream_norm recipe needs the config's `stream_norm` settings")

    def many(names, aug=None):
        parts = [get(n, window, aug) for n in names]
        if empty is None:
            return [s for part in parts for s in part]
        return _stack(parts, empty)

    if copies and window != 10:
        raise ValueError("augmented copies are cached for the 10 s window only")
    return Inputs(
        ev=get(ev, window),
        extra=many(others),
        y_extra=y_extra,
        ev_aug=[get(ev, window, k) for k in range(copies)] or None,
        extra_aug=[many(others, k) for k in range(copies)] or None,
    )


def _stack(parts: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def prosody_inputs(rc: dict, data: VoiceData, cfg: dict) -> Inputs:
    """Inputs of a logreg recipe with `prosody: true` (the `streamer.prosody` vector of each clip, appended to the
    mean+std pooled frames, or alone with `frames: false`). Plain recipes get the columns side by side; a
    `stream_norm` recipe gets the frames as usual and the prosody vectors as one-row sequences in `Inputs.prosody`,
    so that both are normalised by the same speaker / stream histories (each by its own moments)."""
    from streamer.prosody import PROSODY_NAMES

    if rc["model"] != "logreg" or not rc.get("prosody"):
        raise ValueError("prosody features go to logreg recipes (`prosody: true`; `frames: false` for prosody only)")
    if int(rc.get("augment") or 0):
        raise ValueError("prosody recipes have no augmented copies (prosody is not cached for them)")
    ev = cfg["eval_dataset"]
    others = [n for n in rc["datasets"] if n != ev]
    y_extra = np.array([c.label for n in others for c in data.clips[n]])
    cols = prosody_columns(rc)
    p_ev = data.prosody(ev)[:, cols]
    p_extra = _stack([data.prosody(n) for n in others], len(PROSODY_NAMES))[:, cols]
    frames = bool(rc.get("frames", True))
    if rc.get("stream_norm"):
        if not cfg.get("stream_norm"):
            raise ValueError("a stream_norm recipe needs the config's `stream_norm` settings")
        pros = Inputs([r[None, :] for r in p_ev], [r[None, :] for r in p_extra], y_extra)
        if not frames:
            return pros
        window = float(rc.get("window", 10))
        seqs = [data.frames(n, window) for n in others]
        return Inputs(data.frames(ev, window), [s for part in seqs for s in part], y_extra, prosody=pros)
    if not frames:
        return Inputs(p_ev, p_extra, y_extra)
    window = float(rc.get("window", 10))
    pooled = _stack([data.pooled(n, window) for n in others], 1024)
    return Inputs(np.hstack([data.pooled(ev, window), p_ev]), np.hstack([pooled, p_extra]), y_extra)


def prosody_columns(rc: dict) -> list[int]:
    """Indices into `PROSODY_NAMES` of the recipe's prosody columns: all but its `prosody_drop` names."""
    from streamer.prosody import PROSODY_NAMES

    drop = list(rc.get("prosody_drop", []))
    unknown = sorted(set(drop) - set(PROSODY_NAMES))
    if unknown:
        raise ValueError(f"unknown prosody features {unknown} (known: {list(PROSODY_NAMES)})")
    return [i for i, name in enumerate(PROSODY_NAMES) if name not in drop]


def fitter(rc: dict, cfg: dict, seed: int) -> Callable:
    """`fit(train_rows, y, aug_rows | None) → predict(test_rows) → probabilities [n, 6]` for a recipe.
    `train_seed` in the recipe reseeds the training only (the folds stay those of the config's seed)."""
    model = rc["model"]
    seed = int(rc.get("train_seed", seed))
    if model == "logreg":

        def fit_lr(rows, y, aug):
            X, yy = (np.concatenate([rows, *aug]), np.tile(y, 1 + len(aug))) if aug else (rows, y)
            m = fit_quiet(make_model(float(rc["C"]), cfg["logreg"], seed), X, yy)
            return lambda test: proba_in_label_order(m, test)

        return fit_lr
    if model == "mfcc_mlp":
        return lambda rows, y, aug: MlpHead(rows, y, cfg["mlp"], seed).predict_proba
    acfg = {**cfg["attention"], **rc.get("attention", {})}

    def fit_attn(rows, y, aug):
        return train_attention(rows, y, acfg, bool(rc.get("stats")), seed, aug).predict_many

    return fit_attn


AUG_VIEW = "augmented test clips"
AUG_TEST = f"CV, {AUG_VIEW}"
RESULTS_VERSION = 2  # bump when a change to the training code should invalidate cached recipe results


def _robust(name: str, rc: dict, cfg: dict) -> bool:
    """Whether `name` is also scored on the augmented copies of its test clips (10 s window, encoder recipes)."""
    return name in cfg.get("robustness", []) and rc["model"] in ("logreg", "attention") and rc.get("window", 10) == 10


def _result_key(rc: dict, data: VoiceData, cfg: dict, robust: bool = False) -> str:
    """Hash of everything a recipe's predictions depend on: its settings, the shared settings, the clips."""
    import hashlib
    import json

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
    import json

    if rc["model"] == "ensemble":
        return ensemble(name, rc, data, cfg, cache_dir)
    data.load(list(rc["datasets"]))
    cached = None
    if cache_dir is not None:
        cached = Path(cache_dir) / "voice_recipes" / f"{_result_key(rc, data, cfg, _robust(name, rc, cfg))}.json"
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


Split = tuple[list | np.ndarray, list | None, dict[str, list | np.ndarray]]
Splitter = Callable[[str, np.ndarray, np.ndarray], Split]
MAIN = ""  # the view whose predictions fill a recipe's own CV / held-out columns


def plain_splits(inp: Inputs, test_aug: list | np.ndarray | None) -> Splitter:
    """`split(kind, train, test) → (training rows, their augmented copies, {view: test rows})` for a recipe that
    uses the rows as they are; the CV test clips are also scored on their augmented copies when `test_aug` is given."""

    def split(kind: str, train: np.ndarray, test: np.ndarray) -> Split:
        views = {MAIN: _take(inp.ev, test)}
        if test_aug is not None and kind == "cv":
            views[AUG_VIEW] = _take(test_aug, test)
        return _cat(_take(inp.ev, train), inp.extra), inp.train_aug(train), views

    return split


def _evaluate(name: str, rc: dict, data: VoiceData, cfg: dict) -> RecipeResult:
    seed = int(cfg["seed"])
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
            test_aug = get(cfg["eval_dataset"], 10.0, 0)
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


# --------------------------------------------------------------------------- stream-adaptive (speaker) normalisation
# In live use a stream (a microphone, one side of a call) is one speaker, so the runtime can keep running sums of the
# frames of that stream's past utterances and normalise the next one by them: per-speaker CMVN, made causal.

CAUSAL, SKEWED, TRANSDUCTIVE = "causal", "skewed", "transductive"


@dataclass(frozen=True)
class FrameSums:
    """Per clip: frame count, sum and sum of squares (float64) — all a stream has to keep of its past clips."""

    n: np.ndarray  # [clips]
    s: np.ndarray  # [clips, E]
    q: np.ndarray  # [clips, E]

    @classmethod
    def of(cls, seqs: list[np.ndarray]) -> FrameSums:
        wide = [np.asarray(x, dtype=np.float64) for x in seqs]
        return cls(
            np.array([len(x) for x in wide], dtype=np.float64),
            np.stack([x.sum(axis=0) for x in wide]),
            np.stack([np.square(x).sum(axis=0) for x in wide]),
        )

    def take(self, idx: np.ndarray) -> FrameSums:
        return FrameSums(self.n[idx], self.s[idx], self.q[idx])

    def join(self, other: FrameSums) -> FrameSums:
        return FrameSums(*(np.concatenate([a, b]) for a, b in zip(self.fields(), other.fields(), strict=True)))

    def fields(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.n, self.s, self.q

    def history(self, idx: np.ndarray) -> FrameMoments | None:
        """Clips `idx` as the runtime keeps a stream's past (`streamer.adaptation.FrameMoments`); None when empty."""
        if len(idx) == 0:
            return None
        n, s, q = self.take(idx).fields()
        return FrameMoments(len(idx), int(n.sum()), s.sum(axis=0), q.sum(axis=0))

    def moments(self, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Frame mean and variance over clips `idx` (all when None), every frame weighted alike."""
        return self.history(np.arange(len(self.n)) if idx is None else idx).moments()


def shrunk_stats(
    sums: FrameSums, history: np.ndarray, prior: tuple[np.ndarray, np.ndarray], n0: float
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, var) to normalise a clip by: the moments of its stream's `history` clips, shrunk toward the `prior`
    (the training side's global moments) with weight k / (k + n0) for k clips seen, so a stream's first clip gets the
    prior and a long stream its own statistics; n0 = 0 uses the history alone (training speakers, transductive).
    The runtime's own rule (`streamer.adaptation.StreamNorm`)."""
    return StreamNorm(prior[0], prior[1], n0).stats(sums.history(history))


def stream_histories(
    groups: np.ndarray, y: np.ndarray, view: str, rng: np.random.Generator | None, neutral_share: float = 0.65
) -> list[np.ndarray]:
    """For each clip, the indices of the clips its stream (group = speaker) has heard before it.

    `causal`: each group's clips in a random order, clip k has heard clips 0..k-1 — acted corpora give every speaker
    each emotion alike, which flatters the statistics; `skewed`: clip k has heard min(k, cap) other clips of its
    group, `neutral_share` of them neutral, as a real, mostly neutral stream (cap: what the group's clips allow);
    `transductive`: every clip of the group, itself included (an upper bound; the training side's own stats)."""
    out: list[np.ndarray] = [np.zeros(0, int)] * len(groups)
    for g in sorted(set(groups.tolist())):  # sorted: the draws depend only on the groups and the generator's seed
        members = np.flatnonzero(groups == g)
        if view == TRANSDUCTIVE:
            for i in members:
                out[i] = members
            continue
        order = rng.permutation(members)
        for k, i in enumerate(order):
            if view == CAUSAL:
                out[i] = order[:k]
                continue
            others = order[order != i]
            neutral, other = others[y[others] == "neutral"], others[y[others] != "neutral"]
            m = min(k, int(len(neutral) / neutral_share), int(len(other) / (1 - neutral_share)))
            n_neutral = round(neutral_share * m)
            picked = [rng.choice(neutral, n_neutral, replace=False), rng.choice(other, m - n_neutral, replace=False)]
            out[i] = np.concatenate(picked)
    return out


def normalise_clips(
    seqs: list[np.ndarray],
    sums: FrameSums,
    histories: list[np.ndarray],
    prior: tuple[np.ndarray, np.ndarray],
    n0: float,
    std: bool,
) -> list[np.ndarray]:
    """Each clip's frames normalised as the runtime does (`StreamNorm.apply`) by its history, float16 like the cache."""
    norm = StreamNorm(prior[0], prior[1], n0, std)
    return [norm.apply(x, sums.history(h), np.float16) for x, h in zip(seqs, histories, strict=True)]


def _pooled(seqs: list[np.ndarray]) -> np.ndarray:
    return np.stack([voice_features(s) for s in seqs])


def _rows(seqs: list[np.ndarray]) -> np.ndarray:
    """One-row sequences (an utterance's prosody vector) back to a [clips, P] matrix."""
    return np.stack([np.asarray(s, np.float32)[0] for s in seqs])


@dataclass
class SpeakerNormalised:
    """The training side of a `stream_norm` recipe: every speaker's clips (UEM and the extra datasets, and their
    augmented copies by the clean clips' statistics) normalised by that speaker's own frame moments, and the prior,
    the global moments of the raw clean training frames (every frame weighted alike). LR recipes are pooled
    (mean+std) after normalising."""

    inp: Inputs
    ev_sums: FrameSums
    extra_sums: FrameSums
    ev_groups: np.ndarray
    extra_groups: np.ndarray
    y_ev: np.ndarray
    std: bool
    pool: Callable

    @classmethod
    def of(cls, inp: Inputs, rc: dict, data: VoiceData, cfg: dict, pool: Callable | None = None) -> SpeakerNormalised:
        ev = cfg["eval_dataset"]
        others = [n for n in rc["datasets"] if n != ev]
        ev_groups = np.array([f"{ev}/{c.speaker}" for c in data.clips[ev]])
        extra_groups = np.array([f"{n}/{c.speaker}" for n in others for c in data.clips[n]], dtype=ev_groups.dtype)
        return cls(
            inp,
            FrameSums.of(inp.ev),
            FrameSums.of(list(inp.extra)),
            ev_groups,
            extra_groups,
            data.labels(ev),
            bool(cfg["stream_norm"].get("std", True)),
            pool or (_pooled if rc["model"] == "logreg" else list),
        )

    def training(self, train: np.ndarray) -> tuple[list | np.ndarray, list | None, tuple[np.ndarray, np.ndarray]]:
        """(rows, their augmented copies or None, prior (mean, var)) for the evaluation clips `train` + extras."""
        inp = self.inp
        sums = self.ev_sums.take(train).join(self.extra_sums)
        y_train = np.concatenate([self.y_ev[train], inp.y_extra])
        groups = np.concatenate([self.ev_groups[train], self.extra_groups])
        own = stream_histories(groups, y_train, TRANSDUCTIVE, None)
        prior = sums.moments()
        rows = self.pool(normalise_clips(_cat(_take(inp.ev, train), inp.extra), sums, own, prior, 0, self.std))
        aug = inp.train_aug(train)
        aug = [self.pool(normalise_clips(copy, sums, own, prior, 0, self.std)) for copy in aug] if aug else None
        return rows, aug, prior

    def testing(
        self, test: np.ndarray, histories: list[np.ndarray], prior: tuple[np.ndarray, np.ndarray], n0: float
    ) -> list[np.ndarray]:
        """The evaluation clips `test`, each normalised by its `histories` entry (indices into `test`)."""
        return normalise_clips(_take(self.inp.ev, test), self.ev_sums.take(test), histories, prior, n0, self.std)


def stream_norm_splits(inp: Inputs, rc: dict, data: VoiceData, cfg: dict) -> Splitter:
    """`split` (as `plain_splits`) for a `stream_norm` recipe. Training side: `SpeakerNormalised`. Test side, views:
    `causal j` (the main view is order 0), `skewed j` for `orders` random orders per speaker, and `transductive`;
    the prior is the training side's global frame moments."""
    sn = cfg["stream_norm"]
    n0, orders, share = float(sn["n0"]), int(sn["orders"]), float(sn["neutral_share"])
    sides = list(stream_sides(inp, rc, data, cfg).values())
    seed = int(cfg["seed"])

    def split(kind: str, train: np.ndarray, test: np.ndarray) -> Split:
        trained = [(side, *side.training(train)) for side in sides]
        rows = _hcat([r for _, r, _, _ in trained])
        aug = trained[0][2]  # only a frames-only recipe has augmented copies (`prosody_inputs` refuses them)
        groups, y = sides[0].ev_groups[test], sides[0].y_ev[test]

        def view(how: str, j: int, shrink: float) -> np.ndarray | list:
            rng = np.random.default_rng([seed, j, (CAUSAL, SKEWED, TRANSDUCTIVE).index(how)])
            histories = stream_histories(groups, y, how, rng, share)  # the same histories for every side
            return _hcat([side.pool(side.testing(test, histories, prior, shrink)) for side, _, _, prior in trained])

        views = {MAIN if j == 0 else f"{CAUSAL} {j}": view(CAUSAL, j, n0) for j in range(orders)}
        views |= {f"{SKEWED} {j}": view(SKEWED, j, n0) for j in range(orders)}
        views[TRANSDUCTIVE] = view(TRANSDUCTIVE, 0, 0)
        return rows, aug, views

    return split


def stream_sides(inp: Inputs, rc: dict, data: VoiceData, cfg: dict) -> dict[str, SpeakerNormalised]:
    """The blocks of a `stream_norm` recipe in column order, each normalised per speaker by its own moments: `frames`
    (the encoder frames, pooled for an LR), then `prosody` (the prosody vectors, when the recipe has them)."""
    if rc.get("prosody") and not rc.get("frames", True):
        return {"prosody": SpeakerNormalised.of(inp, rc, data, cfg, _rows)}
    sides = {"frames": SpeakerNormalised.of(inp, rc, data, cfg)}
    if inp.prosody is not None:
        sides["prosody"] = SpeakerNormalised.of(inp.prosody, rc, data, cfg, _rows)
    return sides


def _hcat(blocks: list) -> np.ndarray | list:
    """Side by side: one block as it is (a list of sequences for attention), several as columns of one matrix."""
    return blocks[0] if len(blocks) == 1 else np.hstack(blocks)


def stream_columns(result: RecipeResult) -> RecipeResult:
    """Fold the hidden stream-normalisation views of a result into three table columns (mean over the random orders
    ± their sd, of the CV fold-mean macro-F1 / the held-out pooled macro-F1); the main columns are order 0."""
    from pipelines.report import macro_f1

    hidden = {k: v for k, v in result.more.items() if "|" in k}
    if not hidden:
        return result

    def score(kind: str, pred: Predictions) -> float:
        return float(np.mean(pred.fold_f1())) if kind == "cv" else macro_f1(pred.y_true, pred.y_pred)

    def cell(how: str) -> str:
        parts = []
        for kind in ("cv", "heldout"):
            main = getattr(result, kind) if how == CAUSAL else None
            got = [score(kind, p) for k, p in hidden.items() if k.startswith(f"{kind}|{how}")]
            got = ([score(kind, main)] if main is not None else []) + got
            parts.append(f"{np.mean(got):.3f}" + (f" ± {np.std(got):.3f}" if len(got) > 1 else ""))
        return " / ".join(parts)

    result.more = {k: v for k, v in result.more.items() if k not in hidden}
    result.extras = {**result.extras, **{column: cell(how) for how, column in STREAM_COLUMNS.items()}}
    return result


STREAM_COLUMNS = {
    CAUSAL: "stream norm, causal history: CV / held-out macro-F1 (mean ± sd over orders)",
    SKEWED: "stream norm, mostly-neutral history: CV / held-out",
    TRANSDUCTIVE: "stream norm, transductive (upper bound): CV / held-out",
}


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
    data = "UEM+EmoDB" if D.EMODB in rc["datasets"] else "UEM"
    no_frames = rc["model"] == "mfcc_mlp" or not rc.get("frames", True)
    window = "" if no_frames else f", window {_window(rc.get('window', 10))}"
    what = "frames and prosody" if pros and rc.get("frames", True) else "prosody" if pros else "frames"
    norm = f"; {what} normalised per speaker / stream (causal at test)" if rc.get("stream_norm") else ""
    copies = int(rc.get("augment") or 0)
    if not copies:
        return f"{model}; {data}{window}{norm}"
    what = f"{copies} aug cop{'y' if copies == 1 else 'ies'}"
    how = " as extra rows" if rc["model"] == "logreg" else " (p 0.3)"
    return f"{model}; {data}{window}, + {what}{how}{norm}"


def _window(w: float) -> str:
    return "unpadded" if float(w) == 0 else f"{float(w):g} s"


def encoder_cost(data: VoiceData, windows: list[float], n: int, seed: int) -> dict[float, float]:
    """Median encoder wall ms per UEM clip for each window (runtime settings: int8, 2 threads), no cache."""
    from streamer.audio import load_audio

    clips = D.limit_records(data.clips[D.UEM], n, seed)
    audio = [load_audio(c.path) for c in clips]
    out = {}
    for w in windows:
        rec = data.featurizer(float(w)).recogniser
        rec._encode(audio[0])  # warm-up
        times = []
        for a in audio:
            t0 = time.perf_counter()
            rec._encode(a)
            times.append(1000 * (time.perf_counter() - t0))
        out[float(w)] = float(np.median(times))
        log.info("encoder window %s: median %.0f ms per clip (%d clips)", _window(w), out[float(w)], len(audio))
    return out


PROSODY_COST = "prosody ms/utt"


def _uses_prosody(name: str, cfg: dict) -> bool:
    rc = cfg["recipes"][name]
    return bool(rc.get("prosody")) or any(_uses_prosody(m, cfg) for m in rc.get("members", []))


def prosody_cost(data: VoiceData, n: int, seed: int) -> float:
    """Median wall ms of `streamer.prosody.prosody_features` per UEM clip (decoded audio in, one core: numpy's FFT
    is single-threaded), no cache."""
    from streamer.audio import load_audio
    from streamer.prosody import prosody_features

    clips = D.limit_records(data.clips[D.UEM], n, seed)
    audio = [load_audio(c.path) for c in clips]
    prosody_features(audio[0])  # warm-up
    times = []
    for a in audio:
        t0 = time.perf_counter()
        prosody_features(a)
        times.append(1000 * (time.perf_counter() - t0))
    seconds = float(np.median([len(a) for a in audio])) / 16000
    log.info("prosody: median %.2f ms per clip (%d clips, median %.1f s)", np.median(times), len(audio), seconds)
    return float(np.median(times))


def runtime_cost(data: VoiceData, model: VoiceModel, n: int, seed: int, repeats: int = 5) -> dict[str, float]:
    """What the voice costs per utterance at run time, on `n` UEM clips (decoded audio and cached encoder frames in,
    as one stream): the utterance's prosody (`VoiceModel.prosody_of`), the normalisations and the head
    (`VoiceModel.predict`) and the stream's history update (`StreamHistories.remember`), as `Engine` runs them on
    one worker thread. Per clip the fastest of `repeats` runs (the others pay for caches and other processes);
    then the median, 90th percentile and maximum over clips, wall and the thread's CPU time, in ms."""
    from streamer.adaptation import StreamHistories
    from streamer.audio import load_audio

    position = {id(c): i for i, c in enumerate(data.clips[D.UEM])}
    clips = D.limit_records(data.clips[D.UEM], n, seed)
    audio = [load_audio(c.path) for c in clips]
    frames = [np.asarray(data.frames(D.UEM, 10.0)[position[id(c)]], np.float32) for c in clips]
    histories = StreamHistories()

    def utterance(a: np.ndarray, f: np.ndarray) -> None:
        prosody = model.prosody_of(a)
        model.predict(f, histories.get("bench"), prosody)
        histories.remember("bench", f, prosody)

    utterance(audio[0], frames[0])  # warm-up
    walls, cpus = [], []
    for a, f in zip(audio, frames, strict=True):
        runs = []
        for _ in range(repeats):
            w0, c0 = time.perf_counter(), time.thread_time()
            utterance(a, f)
            runs.append((time.perf_counter() - w0, time.thread_time() - c0))
        wall, cpu = min(runs)
        walls.append(1000 * wall)
        cpus.append(1000 * cpu)
    seconds = np.array([len(a) / 16000 for a in audio])
    return {
        "clips": len(audio),
        "clip_s_median": float(np.median(seconds)),
        "clip_s_max": float(seconds.max()),
        "wall_ms_median": float(np.median(walls)),
        "wall_ms_p90": float(np.percentile(walls, 90)),
        "wall_ms_max": float(np.max(walls)),
        "cpu_ms_median": float(np.median(cpus)),
        "cpu_ms_p90": float(np.percentile(cpus, 90)),
        "wall_ms_per_audio_s": float(np.median(np.array(walls) / seconds)),
    }


def cut_shift(data: VoiceData, model: VoiceModel, n: int, seed: int) -> dict[str, float]:
    """How far the prosody the runtime reads moves from what training read: each of `n` UEM clips, padded with 1 s of
    silence on both sides, goes through the live segmenter (default options) as a stream would; for the clips it
    cuts into one utterance, the prosody of the cut against that of the whole clip, per column, in units of the
    head's prosody prior std (median and 90th percentile of |difference| over clips)."""
    from streamer.audio import load_audio
    from streamer.frames import SAMPLE_RATE, AudioChunk
    from streamer.segmenter import Segmenter

    if model.prosody is None:
        return {}
    scale = np.sqrt(model.prosody.norm.var) if model.prosody.norm is not None else 1.0
    pad = np.zeros(SAMPLE_RATE, np.float32)
    shifts = []
    for clip in D.limit_records(data.clips[D.UEM], n, seed):
        audio = load_audio(clip.path)
        cutter = Segmenter("cut")
        cuts = cutter.push(AudioChunk(np.concatenate([pad, audio, pad]), 0.0)) + cutter.flush()
        cuts = [u for u in cuts if not (u.tentative or u.interim)]
        if len(cuts) == 1:
            shifts.append(np.abs(model.prosody.features(cuts[0].audio) - model.prosody.features(audio)) / scale)
    shifts = np.array(shifts)
    out = {"clips": float(len(shifts)), "of": float(n)}
    for name, column in zip(model.prosody.names, shifts.T, strict=True):
        out[name] = float(np.median(column))
        out[f"{name} p90"] = float(np.percentile(column, 90))
    return out


# --------------------------------------------------------------------------- ship


def fit_final(name: str, cfg: dict, data: VoiceData) -> tuple[VoiceModel, dict]:
    """Recipe `name` refitted on all its data (all 16 UEM speakers + extras): the runtime's `VoiceModel` (the head,
    its frames' `StreamNorm`, its `ProsodyReader`) and the meta entries.

    A `stream_norm` recipe trains on every speaker's frames (and prosody vectors) normalised by that speaker's own
    moments, as the CV training sides do; the model's `norm` (and its prosody's `norm`) is what the runtime applies
    before the head: the prior is the global mean / variance of the raw clean training frames (prosody vectors), n0
    and std from the config's `stream_norm`. A recipe with `prosody` gets a `ProsodyReader` of its columns. An
    ensemble's members must agree on each block they read (the runtime normalises the frames once and the prosody
    once, before every member)."""
    rc = cfg["recipes"][name]
    seed = int(cfg["seed"])
    if rc["model"] == "ensemble":
        return _fit_ensemble(name, rc, cfg, data)
    if rc["model"] not in ("logreg", "attention"):
        raise ValueError(f"{name}: a {rc['model']} recipe cannot be shipped (the runtime has frames and prosody only)")
    inp = recipe_inputs(rc, data, cfg)
    y = np.concatenate([data.labels(cfg["eval_dataset"]), inp.y_extra])
    window = float(rc.get("window", 10))
    inputs = "+".join(b for b, on in (("frames", rc.get("frames", True)), ("prosody", rc.get("prosody"))) if on)
    info = {
        "recipe_name": name,
        "inputs": inputs,
        "datasets": list(rc["datasets"]),
        "encoder_window_s": window,
        "n_train": len(y),
        "train_label_counts": label_counts(y),
        "augment_copies": int(rc.get("augment") or 0),
    }
    norms: dict[str, StreamNorm] = {}
    if rc.get("stream_norm"):
        sn = cfg["stream_norm"]
        sides = stream_sides(inp, rc, data, cfg)
        trained = {block: side.training(np.arange(len(inp.ev))) for block, side in sides.items()}
        rows, aug = _hcat([r for r, _, _ in trained.values()]), next(iter(trained.values()))[1]
        for block, (_, _, prior) in trained.items():
            norms[block] = StreamNorm(prior[0], prior[1], float(sn["n0"]), bool(sn.get("std", True)))
            info["stream_norm" if block == "frames" else "prosody_norm"] = _norm_meta(block, sides[block], norms[block])
    else:
        rows, aug = _cat(inp.ev, inp.extra), inp.train_aug()
    prosody = None
    if rc.get("prosody"):
        from streamer.prosody import PROSODY_NAMES, PROSODY_SPEC

        prosody = ProsodyReader(tuple(PROSODY_NAMES[i] for i in prosody_columns(rc)), norms.get("prosody"))
        info["prosody"] = {
            "names": list(prosody.names),
            "spec": PROSODY_SPEC,
            "computed_on": "training: the whole clip; run time: the segmenter's cut (Utterance.audio), once per"
            " utterance in the engine's worker thread (streamer.prosody.ProsodyReader, arrays prosody.* in this file)",
        }
    t0 = time.perf_counter()
    if rc["model"] == "logreg":
        X, yy = (np.concatenate([rows, *aug]), np.tile(y, 1 + len(aug))) if aug else (rows, y)
        pooled = {"frames": "meanstd", "frames+prosody": "meanstd+prosody", "prosody": "prosody"}[inputs]
        head = final_head(X, yy, float(rc["C"]), cfg["logreg"], seed, {"id": f"{name}-{pooled}-logreg"})
        head = dataclasses.replace(head, inputs=inputs)
        info["classifier"] = {"type": "standardise + multinomial logistic regression (lbfgs)", "C": rc["C"]}
    else:
        acfg = {**cfg["attention"], **rc.get("attention", {})}
        train_seed = int(rc.get("train_seed", seed))
        head = train_attention(rows, y, acfg, bool(rc.get("stats")), train_seed, aug, {"id": f"{name}-attention"})
        info["classifier"] = {
            "type": "attention pooling (BSC-UPC) → Linear+Dropout+LayerNorm+GELU(tanh) → Linear; weighted CE, AdamW",
            **acfg,
            "stats": bool(rc.get("stats")),
            "train_seed": train_seed,
            "torch": _torch().__version__,
        }
    log.info("refitted %s on %d clips in %.0f s", name, len(y), time.perf_counter() - t0)
    return VoiceModel(head, norms.get("frames"), prosody), info


def _fit_ensemble(name: str, rc: dict, cfg: dict, data: VoiceData) -> tuple[VoiceModel, dict]:
    """The members refitted and flattened into one `EnsembleHead`: a member that is itself an ensemble contributes
    its members at its share of the weight."""
    parts = [fit_final(m, cfg, data) for m in rc["members"]]
    heads, weights = [], []
    for model, _ in parts:
        head = model.head
        inner = head.members if isinstance(head, EnsembleHead) else (head,)
        inner_w = head.weights or [1 / len(inner)] * len(inner) if isinstance(head, EnsembleHead) else [1.0]
        heads += inner
        weights += [w / len(parts) for w in inner_w]
    infos = [i for _, i in parts]
    if len({i["encoder_window_s"] for i in infos}) > 1:
        raise ValueError(f"{name}: members use different encoder windows")
    norm = _shared(name, "stream normalisation", [m.norm for m, i in parts if "frames" in i["inputs"]], _same_norm)
    prosody = _shared(name, "prosody", [m.prosody for m, i in parts if "prosody" in i["inputs"]], _same_prosody)
    info = {
        "members": infos,
        "inputs": "+".join(b for b in ("frames", "prosody") if any(b in i["inputs"] for i in infos)),
        "datasets": list(dict.fromkeys(d for i in infos for d in i["datasets"])),
        "encoder_window_s": infos[0]["encoder_window_s"],
    }
    for key in ("stream_norm", "prosody", "prosody_norm"):  # the members that have one agree (checked above)
        info |= next(({key: i[key]} for i in infos if key in i), {})
    return VoiceModel(EnsembleHead(tuple(heads), {"id": name}, tuple(weights)), norm, prosody), info


def _norm_meta(block: str, side: SpeakerNormalised, norm: StreamNorm) -> dict:
    """How a block (the encoder frames, or the prosody vectors) was normalised, for the head's meta."""
    what = {"frames": "frame", "prosody": "prosody vector"}[block]
    prior_rows = int(side.ev_sums.n.sum() + side.extra_sums.n.sum())
    return {
        "training": f"each speaker's {what}s (UEM, EmoDB"
        + ("; augmented copies by their clean clip's statistics" if block == "frames" else "")
        + f") minus that speaker's {what} mean"
        + (f", over its {what} std" if norm.std else ""),
        "runtime": f"a stream's utterance k is normalised by the {what} moments of its utterances 0..k-1, shrunk"
        " toward the prior with weight k/(k+n0) (streamer.adaptation.StreamNorm, arrays "
        + ("norm.*" if block == "frames" else "prosody.norm.*")
        + " in this file)",
        "prior": f"global {what} mean / variance of the raw clean training {what}s, every {what} weighted alike",
        f"prior_{'frames' if block == 'frames' else 'rows'}": prior_rows,
        "n0": norm.n0,
        "std": norm.std,
    }


def _shared(name: str, what: str, values: list, same: Callable) -> object | None:
    """The one value of a block that the members reading it share (None when none reads it, or none normalises)."""
    if any(not same(values[0], v) for v in values[1:]):
        raise ValueError(f"{name}: members differ in {what} (all or none, on the same data)")
    return values[0] if values else None


def _same_norm(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return (a.n0, a.std) == (b.n0, b.std) and np.array_equal(a.mean, b.mean) and np.array_equal(a.var, b.var)


def _same_prosody(a: ProsodyReader, b: ProsodyReader) -> bool:
    return a.names == b.names and _same_norm(a.norm, b.norm)


def ship(name: str, cfg: dict, data: VoiceData, out: Path, result: RecipeResult | None, config: Path) -> Path:
    """Refit `name` on all its data and save it as the package's voice head (with its stream normalisation for a
    `stream_norm` recipe and its prosody block for a `prosody` one), estimates and recipe in its meta. The
    temperature is 1: fit it with `python -m pipelines.train_heads --calibrate-voice` afterwards."""
    seed = int(cfg["seed"])
    model, info = fit_final(name, cfg, data)
    estimates = {}
    if result is not None:
        for kind, pred in (("cv", result.cv), ("heldout", result.heldout)):
            if pred is not None:
                s = summarise(pred, int(cfg.get("n_boot", 1000)), seed)
                estimates[kind] = {
                    "folds": s["folds"],
                    "n_test": s["n"],
                    "macro_f1_mean": round(s["f1_mean"], 4),
                    "macro_f1_sd": round(s["f1_sd"], 4),
                    "accuracy_mean": round(s["acc_mean"], 4),
                    "pooled_macro_f1": round(s["pooled_f1"], 4),
                    "pooled_macro_f1_ci95": [round(v, 4) for v in s["ci"]],
                }
        if model.adapts:  # the main CV / held-out rows are the causal history, order 0
            estimates["view"] = "causal stream history (each test speaker's clips in a random order), order 0"
            columns = stream_columns(dataclasses.replace(result, more=dict(result.more))).extras
            estimates["stream_norm"] = {how: columns[c] for how, c in STREAM_COLUMNS.items() if c in columns}
    rec = data.featurizer(float(info["encoder_window_s"])).recogniser
    datasets = info["datasets"]
    version = 4 if model.prosody is not None else 3 if model.norm is not None else 2  # v4: prosody; v3: stream norm
    meta = {
        "id": f"voice-{'+'.join('uem' if n == D.UEM else 'emodb' for n in datasets)}-whisperbase"
        f"-w{info['encoder_window_s']:g}-{name}-v{version}",
        "head": "voice",
        "kind": type(model.head).__name__,
        "labels": list(LABELS),
        "feature": "whisper-encoder-last-layer-covered-frames (float32 at run time, float16 cache in training)"
        + ("; streamer.prosody features of the utterance (meta prosody)" if model.prosody is not None else ""),
        "encoder": rec.model_id,
        "encoder_device": rec.device,
        "encoder_compute_type": rec.compute_type,
        **info,
        "cv": estimates,
        "selected_by": cfg.get("selected_by")
        or "cv macro_f1_mean above the previous head's, held-out not worse, among the recipes of"
        " docs/models/voice_recipes.md (chosen after seeing them: mildly optimistic)"
        + ("; stream-normalised: scored with causal stream histories" if model.adapts else ""),
        "limit": data.limit,
        "seed": seed,
        "licence": "; ".join(VOICE_LICENCES[n] for n in datasets),
        "recipe": {"config": _rel(config), "name": name, "recipes": _recipe_closure(name, cfg), "seed": seed},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "voice_head.npz"
    dataclasses.replace(model, head=dataclasses.replace(model.head, meta=meta)).save(path)
    return path


def _recipe_closure(name: str, cfg: dict) -> dict:
    rc = cfg["recipes"][name]
    out = {name: rc}
    for m in rc.get("members", []):
        out |= _recipe_closure(m, cfg)
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.voice_recipes", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--recipes", nargs="+", default=None, help="only these recipes (default: all in the config)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown table (PNGs etc. go beside it)")
    p.add_argument("--limit", type=int, default=None, help="at most N clips per dataset (tiny runs)")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default <repo>/.cache/features)")
    p.add_argument("--no-cost", action="store_true", help="skip timing the encoder windows")
    p.add_argument("--refit", action="store_true", help="ignore cached recipe results")
    p.add_argument(
        "--replace-table",
        action="store_true",
        help="with --recipes: write only these rows (default: keep the other recipes' rows of --out as they are)",
    )
    p.add_argument("--ship", action="store_true", help="refit the config's `ship` recipe on all data and save it")
    p.add_argument("--models-dir", type=Path, default=D.REPO_ROOT / "streamer" / "models")
    p.add_argument(
        "--runtime-cost",
        type=int,
        nargs="?",
        const=120,
        default=None,
        metavar="CLIPS",
        help="only measure the run-time cost per utterance (prosody + normalisation + heads) of <models-dir>'s voice"
        " head on CLIPS UEM clips (default 120) and print it",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.features import DEFAULT_CACHE

    cfg = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    seed = int(cfg["seed"])
    data = VoiceData(args.data_dir, args.cache_dir or DEFAULT_CACHE, seed, args.limit)
    if args.runtime_cost is not None:
        model = VoiceModel.load(args.models_dir / "voice_head.npz")
        data.load([D.UEM])
        cost = runtime_cost(data, model, args.runtime_cost, seed)
        print(
            f"{model.model_id}: prosody + normalisation + heads + history update per utterance, one thread, over"
            f" {cost['clips']} UEM clips (median {cost['clip_s_median']:.1f} s, longest {cost['clip_s_max']:.1f} s):"
            f" wall median {cost['wall_ms_median']:.2f} ms, p90 {cost['wall_ms_p90']:.2f} ms, max"
            f" {cost['wall_ms_max']:.2f} ms ({cost['wall_ms_per_audio_s']:.2f} ms per audio second); thread CPU median"
            f" {cost['cpu_ms_median']:.2f} ms, p90 {cost['cpu_ms_p90']:.2f} ms"
        )
        shift = cut_shift(data, model, int(cfg.get("encoder_cost_clips", 24)), seed)
        if shift:
            print(
                f"prosody of the segmenter's cut against the whole clip ({shift['clips']:.0f} of {shift['of']:.0f}"
                " clips cut into one utterance), |difference| in prior std, median / p90: "
                + ", ".join(f"{n} {shift[n]:.2f} / {shift[n + ' p90']:.2f}" for n in model.prosody.names)
            )
        return 0
    started = time.perf_counter()
    names = args.recipes or list(cfg["recipes"])
    if args.ship:
        if not cfg.get("ship"):
            p.error(f"{args.config} names no `ship` recipe")
        names = [cfg["ship"]]
    unknown = [n for n in names if n not in cfg["recipes"]]
    if unknown:
        p.error(f"unknown recipes {unknown} (known: {list(cfg['recipes'])})")

    results = []
    for name in names:
        result = evaluate(name, cfg["recipes"][name], data, cfg, None if args.refit else data.cache_dir)
        s = summarise(result.cv, 200, seed)
        log.info("%-16s CV F1 %.3f ± %.3f  pooled %.3f", name, s["f1_mean"], s["f1_sd"], s["pooled_f1"])
        results.append(result)
    if args.ship:
        path = ship(names[0], cfg, data, args.models_dir, results[0], args.config)
        from streamer.models import sha256_of

        print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB, sha256 {sha256_of(path)})")
        return 0

    used = [cfg["recipes"][n] for n in names if cfg["recipes"][n]["model"] in ("logreg", "attention")]
    windows = sorted({float(w) for w in cfg.get("cost_windows", [])} | {float(r.get("window", 10)) for r in used})
    costs = {} if args.no_cost else encoder_cost(data, windows, int(cfg.get("encoder_cost_clips", 24)), seed)
    with_prosody = [n for n in names if _uses_prosody(n, cfg)]
    prosody_ms = None
    if with_prosody and not args.no_cost:
        prosody_ms = prosody_cost(data, int(cfg.get("encoder_cost_clips", 24)), seed)
    for name, r in zip(names, results, strict=True):
        stream_columns(r)
        rc = cfg["recipes"][name]
        if rc["model"] == "ensemble":
            rc = cfg["recipes"][rc["members"][0]]
        w = float(rc.get("window", 10))
        frames = rc["model"] != "mfcc_mlp" and rc.get("frames", True)
        r.extras = {
            "encoder ms/utt": f"{costs[w]:.0f}" if w in costs and frames else "–",
            PROSODY_COST: f"{prosody_ms:.2f}" if prosody_ms is not None and name in with_prosody else "–",
            **r.extras,
        }
    total = time.perf_counter() - started
    kept = {}
    if args.recipes and not args.replace_table and args.out.is_file():
        # a run of some recipes updates their rows and keeps the others' (same config, same folds) as they were
        kept = {k: v for k, v in read_table(args.out).items() if k in cfg["recipes"] and k not in names}
        if kept:
            log.info("kept %d rows of %s that this run did not refit: %s", len(kept), args.out, ", ".join(kept))
    md = write_report(
        results,
        args.out,
        "Voice-head recipes on speaker-grouped folds",
        intro=_intro(cfg, data, args),
        notes=_notes(cfg, data, total, costs, tuple(kept)),
        n_boot=int(cfg.get("n_boot", 1000)),
        seed=seed,
        cv_name="CV",
        heldout_name="held-out test1+test2",
        kept=kept,
        order=[n for n in cfg["recipes"] if n in kept or n in names],
    )
    print(md.read_text(encoding="utf-8"))
    return 0


def _intro(cfg: dict, data: VoiceData, args) -> str:
    ev = cfg["eval_dataset"]
    counts = ", ".join(f"{n} {len(c)} clips" for n, c in data.clips.items())
    return (
        "Reproduce (2 CPU cores; features cached under `.cache/features/`):\n\n```sh\n"
        ".venv/bin/python -m pipelines.voice_recipes" + (f" --limit {args.limit}" if args.limit else "") + "\n```\n\n"
        f"Data: {counts}. Every recipe is scored on the same {cfg['cv_folds']} folds over {ev}, grouped by speaker"
        f" (2 unseen speakers per fold; the folds and clips of `pipelines.train_heads`, seed {cfg['seed']}), and on"
        f" the authors' held-out speakers {' + '.join(cfg['heldout_speakers'])} after training on the other 14."
        " EmoDB is only ever on the training side. Macro-F1 mean ± sd is over folds; the pooled macro-F1 is over"
        f" all out-of-fold predictions together, with a {cfg.get('n_boot', 1000)}-resample bootstrap 95 % CI over"
        " clips. Encoder cost: median wall ms of one `Recogniser._encode` per UEM clip (int8, 2 threads, this"
        " machine, other work running beside it); head cost: numpy (LR, attention) or torch (MLP) per clip,"
        " frames → probabilities."
    )


def _notes(cfg: dict, data: VoiceData, total: float, costs: dict[float, float], kept: tuple[str, ...] = ()) -> str:
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(data.skipped.items())) or "none"
    a = cfg["attention"]
    cost_table = ""
    if costs:
        cost_table = (
            "Encoder cost per utterance by input window (median of "
            f"{cfg.get('encoder_cost_clips', 24)} UEM clips, int8, 2 threads):\n\n"
            "| window | encoder ms/utt |\n|---|---|\n"
            + "".join(f"| {_window(w)} | {ms:.0f} |\n" for w, ms in sorted(costs.items()))
            + "\n"
        )
    shipped = (
        f"Shipped as the package's voice head: `{cfg['ship']}` (`--ship`; why, and its limits:"
        " streamer/models/MODEL_CARD.md)."
        if cfg.get("ship")
        else "Shipped: none of these (the config's `ship` is null)."
    )
    return (
        shipped
        + "\n\n"
        + cost_table
        + _stream_note(cfg)
        + _prosody_note(cfg)
        + f"Skipped input (counted, never silent): {skipped}.\n\n"
        f"Attention heads: hidden {a['hidden']}, dropout {a['dropout']}, AdamW lr {a['lr']} wd {a['weight_decay']},"
        f" {a['epochs']} epochs of batch {a['batch']}, random {a['crop_frames']}-frame crops with repeat"
        " padding, lr × 0.9 after 5 epochs without a lower training loss, class-weighted cross-entropy,"
        " standardisation with the training side's frame mean/std, one torch thread, seed"
        f" {cfg['seed']}. Scored on the whole utterance (no crop) by the numpy head the runtime uses."
        " `+aug`: every training clip (UEM and EmoDB) has one cached augmented copy, re-encoded by Whisper: speed ×0.9"
        " or ×1.1, coloured noise at 5–20 dB SNR, synthetic reverberation (RT60 0.2–0.9 s), each with p 0.5 and at"
        " least one; the attention heads use the copy instead of the clip with p 0.3 per epoch, the LR adds all"
        " copies as rows. Test folds are never augmented, except in the `CV, augmented test clips` column, which"
        " scores the same CV fits on each test clip's augmented copy (a robustness check; in-distribution for the"
        " `+aug` recipes). `-s1`/`-s2`: the same recipe with training seed 1/2 (same folds); ensembles average the"
        " members' out-of-fold probabilities. Fit times are wall seconds with other jobs sharing the 2 cores; the"
        " MLP's head cost excludes computing the MFCCs.\n\n"
        "Caveats: C, epochs and sizes were set once, not tuned per fold; choosing the best of these rows on the"
        " same folds is mildly optimistic. test1 and test2 are also inside the CV folds. The CI resamples clips,"
        " which are not independent within a speaker, so it is narrower than a speaker-level interval."
        + (
            f" Run time of this table: {total:.0f} s."
            if not kept
            else f" Run time of the last run ({total:.0f} s) covers its recipes only; the rows of"
            f" {', '.join(f'`{n}`' for n in kept)} were kept from the previous table (same config, folds and code"
            " path; rerun them with `--recipes` or the whole table without it)."
        )
    )


def _prosody_note(cfg: dict) -> str:
    if not any(rc.get("prosody") for rc in cfg["recipes"].values()):
        return ""
    from streamer.prosody import PROSODY_NAMES

    return (
        "Prosody (`prosody`, issue #3): Whisper's encoder was trained for recognition and is partly blind to pitch and"
        " loudness, so these recipes add 15 numbers per clip from `streamer.prosody` (numpy, one core; the `prosody"
        " ms/utt` column is the median over the same UEM clips as the encoder cost): "
        + ", ".join(f"`{n}`" for n in PROSODY_NAMES)
        + ". F0 is tracked YIN-style on the audio decimated to 8 kHz (70–450 Hz, 25 ms windows every 20 ms), in"
        " semitones re 100 Hz; energy in dB re full scale. `-sn`: the prosody vectors are normalised per speaker"
        " exactly as the frames (training side: the speaker's own mean and std; test side: the stream's earlier"
        " clips, shrunk toward the training side's moments), each block with its own moments and the same histories;"
        " without `-sn` they are standardised globally. The LR on frames + prosody keeps the frames' C (0.03, the"
        " prosody columns standardised like the others); the prosody-only LR has C = 1; both set once, not tuned."
        " The ensemble with prosody swaps the shipped ensemble's LR member for the LR on frames + prosody; the"
        " late fusion averages the shipped ensemble's two members and the prosody-only LR in thirds (set a priori,"
        " not tuned on any fold). The extraction's settings (thresholds, range, hop) were set before any row was"
        " scored. `-nodur` (an ablation added after seeing the rows): without `voiced_rate`, `active_ratio` and"
        " `log_active_s`, which depend on how an utterance is cut and how long its sentence is (the acted corpora say"
        " fixed sentences; live utterances are VAD cuts of any sentence); what remains is pitch, energy, tilt and"
        " zero crossings. Prosody is computed on the whole clip here; at run time on the segmenter's cut (250 ms of"
        " pre-roll, 32 ms after the last speech window), which is why only `-nodur` recipes were candidates to"
        " ship. The shipped head's cost per utterance at run time (prosody, normalisation, heads) and how far the cut"
        " moves each prosody column: `python -m pipelines.voice_recipes --runtime-cost`.\n\n"
    )


def _stream_note(cfg: dict) -> str:
    sn = cfg.get("stream_norm")
    if not sn or not any(rc.get("stream_norm") for rc in cfg["recipes"].values()):
        return ""
    return (
        "Stream normalisation (`-sn`, issue #3): in live use a stream (a microphone, one side of a call) is one"
        " speaker, so the runtime could keep running sums of the encoder frames of the stream's past utterances"
        " and normalise the next one by them. Training side: each speaker's frames (UEM and EmoDB; the augmented"
        " copies by their clean clips' statistics) minus that speaker's frame mean, over its frame std. Test side,"
        " causal: each unseen speaker's clips in a random order; clip k is normalised by the frame moments of"
        " clips 0..k-1, shrunk toward the training side's global moments with weight"
        f" k / (k + {sn['n0']}) (n0 set once, not tuned; clip 0 gets the global ones). The main CV / held-out"
        " columns are order 0; the `causal history` column is the mean ± sd over"
        f" {sn['orders']} random orders (CV: fold-mean macro-F1; held-out: pooled macro-F1). Acted corpora give"
        " each speaker every emotion alike, which flatters a stream's statistics; the `mostly-neutral history`"
        f" column draws each clip's history ({sn['orders']} draws) from the other clips of its speaker with"
        f" {100 * float(sn['neutral_share']):.0f} % neutral ones, min(k, cap) clips (cap: UEM has only ~12"
        " neutral clips per speaker, so at most ~18), as a real, mostly neutral stream would have heard."
        " `transductive`: all clips of the speaker, the clip itself included, no shrinkage: an upper bound that"
        " no live stream has. Ensembles of `-sn` members use the same histories for every member.\n\n"
    )


if __name__ == "__main__":
    sys.exit(main())
