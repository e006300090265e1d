"""What a voice recipe trains and is scored on: the clips and their cached features (`VoiceData`), the
speaker-grouped folds, and each recipe's rows (`Inputs`: encoder frames, pooled frames, prosody or MFCC).

Apart from the models and the runner because the shipping step and the stream normalisation read the same rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.data import corpora as D
from pipelines.data.corpora import take_rows
from streamer.heads import voice_features


@dataclass(frozen=True)
class FrameSource:
    """Which encoder pass gives a recipe its frames: recognition's (Whisper's last layer, the input padded to
    `window` s; 0 = unpadded), or with `layers` the voice branch's own pass (`streamer.voice_encoder`: the first
    `layers` encoder layers, unpadded), with `tuned` those layers fine-tuned: `<fine-tuning recipe>@<corpora>`
    (`pipelines.train.voice.finetune`, trained on those corpora only, so a held-out corpus stays unseen), and
    `-<speaker>` for each speaker left out of the fine-tuning (a recipe's `tuned_without`: held-out speakers)."""

    window: float = 10.0
    layers: int | None = None
    tuned: str | None = None

    @classmethod
    def of(cls, rc: dict) -> FrameSource:
        if rc.get("tuned"):
            if not rc.get("layers"):
                raise ValueError(f"a `tuned` recipe fine-tunes the voice branch's layers: give `layers` ({rc})")
            without = "".join(f"-{speaker}" for speaker in sorted(rc.get("tuned_without", [])))
            return cls(0.0, int(rc["layers"]), f"{rc['tuned']}@{'+'.join(sorted(rc['datasets']))}{without}")
        if rc.get("layers"):
            return cls(0.0, int(rc["layers"]))
        return cls(float(rc.get("window", 10)))

    @classmethod
    def of_info(cls, info: dict) -> FrameSource:
        """The source a fitted model's info (`ship.fit_final`) names."""
        return cls(info["encoder_window_s"], info.get("encoder_layers"), info.get("encoder_tuned"))

    @property
    def name(self) -> str:
        if self.layers:
            return f"encoder layer {self.layers} unpadded" + (f" tuned {self.tuned}" if self.tuned else "")
        return "window unpadded" if self.window == 0 else f"window {self.window:g} s"

    def sort_key(self) -> tuple[int, float, str]:
        return (self.layers or 0, self.window, self.tuned or "")


RECOGNITION = FrameSource()  # the runtime's recognition pass: last layer, 10 s window


@dataclass
class VoiceData:
    """Clips of each dataset (readable ones only) and their features, loaded lazily per (frame source, copy)."""

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
            if name not in D.VOICE_READERS:
                raise ValueError(f"unknown dataset {name} (known: {sorted(D.VOICE_READERS)})")
            loaded = D.VOICE_READERS[name](self.root)
            for reason, n in loaded.skipped.items():
                self.skipped[f"{name}: {reason}"] += n
            chosen = D.limit_records(loaded.records, self.limit, self.seed)
            # the canonical pass (recognition's, 10 s window) decides which clips are readable
            seqs, kept, bad = self.featurizer(RECOGNITION).many_frames(chosen, f"frames w10 {name}")
            for reason, n in bad.items():
                self.skipped[f"{name}: {reason}"] += n
            self.clips[name] = kept
            self._views[(name, RECOGNITION, None)] = seqs

    def featurizer(self, source: FrameSource):
        from pipelines.data.features import VoiceFeaturizer
        from streamer.recogniser import RecogniserOptions

        if source not in self._featurizers:
            opts = RecogniserOptions(encoder_window_s=source.window)
            delta = None
            if source.tuned:
                from pipelines.train.voice.finetune import delta_for

                delta = delta_for(source.tuned, self.seed, self.limit)
            self._featurizers[source] = VoiceFeaturizer(self.cache_dir, opts, source.layers, delta)
        return self._featurizers[source]

    def labels(self, name: str) -> np.ndarray:
        return np.array([c.label for c in self.clips[name]])

    def frames(self, name: str, source: FrameSource, augment: int | None = None) -> list[np.ndarray]:
        key = (name, source, augment)
        if key not in self._views:
            seqs, _, bad = self.featurizer(source).many_frames(
                self.clips[name],
                f"frames {source.name} {name}" + ("" if augment is None else f" aug{augment}"),
                augment,
                self.seed,
            )
            if bad:  # readable in the canonical pass, so this is a bug rather than bad input
                raise RuntimeError(f"{name}: {sum(bad.values())} clips failed ({source.name}, copy {augment})")
            self._views[key] = seqs
        return self._views[key]

    def pooled(self, name: str, source: FrameSource, augment: int | None = None) -> np.ndarray:
        return np.stack([voice_features(s) for s in self.frames(name, source, augment)])

    def prosody(self, name: str) -> np.ndarray:
        """`streamer.prosody.prosody_features` of each clip ([clips, len(PROSODY_NAMES)]), cached on disk."""
        from pipelines.data.features import ProsodyFeaturizer

        return self._per_clip(name, "prosody", ProsodyFeaturizer)

    def mfcc(self, name: str) -> np.ndarray:
        from pipelines.data.features import MfccFeaturizer

        return self._per_clip(name, "mfcc", MfccFeaturizer)

    def _per_clip(self, name: str, kind: str, featurizer: Callable) -> np.ndarray:
        """One vector per clip of `name` ([clips, dim]) from `featurizer(cache_dir).one(path)`, kept in memory."""
        key = (name, kind)
        if key not in self._views:
            one = featurizer(self.cache_dir).one
            self._views[key] = np.stack([one(c.path) for c in self.clips[name]])
        return self._views[key]


def splits_for(data: VoiceData, cfg: dict) -> tuple[list, list]:
    """The CV folds of `pipelines.train.heads` (same clips, labels, speakers and seed) and the held-out-speaker
    split."""
    ev = cfg["eval_dataset"]
    y = data.labels(ev)
    speakers = np.array([c.speaker for c in data.clips[ev]])
    cv = D.grouped_folds(y, speakers, int(cfg["cv_folds"]), int(cfg["seed"]))
    held = np.isin(speakers, cfg.get("heldout_speakers") or [])
    heldout = [(np.flatnonzero(~held), np.flatnonzero(held))] if held.any() and (~held).any() else []
    return cv, heldout


AUG_VIEW = "augmented test clips"


Split = tuple[list | np.ndarray, list | None, dict[str, list | np.ndarray]]
Splitter = Callable[[str, np.ndarray, np.ndarray], Split]
MAIN = ""  # the view whose predictions fill a recipe's own CV / held-out columns


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
            cat_rows(e if train is None else take_rows(e, train), x)
            for e, x in zip(self.ev_aug, self.extra_aug, strict=True)
        ]


def cat_rows(a: list | np.ndarray, b: list | np.ndarray) -> list | np.ndarray:
    """The evaluation rows followed by the extra rows (lists of sequences, or matrices)."""
    if isinstance(a, list):
        return list(a) + list(b)
    return np.concatenate([a, b]) if len(b) else a


def recipe_inputs(rc: dict, data: VoiceData, cfg: dict) -> Inputs:
    ev = cfg["eval_dataset"]
    if ev not in rc["datasets"]:
        raise ValueError(f"recipe must train on the evaluation dataset {ev}: {rc['datasets']}")
    others = [n for n in rc["datasets"] if n != ev]
    data.load([ev, *others])
    source = FrameSource.of(rc)
    model, copies = rc["model"], int(rc.get("augment") or 0)  # true → 1 copy
    y_extra = np.array([c.label for n in others for c in data.clips[n]])
    if model == "mfcc_mlp":
        return Inputs(data.mfcc(ev), stack_rows([data.mfcc(n) for n in others], 128), y_extra)
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
        parts = [get(n, source, aug) for n in names]
        if empty is None:
            return [s for part in parts for s in part]
        return stack_rows(parts, empty)

    if copies and source.window not in (0, 10):
        raise ValueError("augmented copies are encoded for the 10 s window and the unpadded passes only")
    return Inputs(
        ev=get(ev, source),
        extra=many(others),
        y_extra=y_extra,
        ev_aug=[get(ev, source, k) for k in range(copies)] or None,
        extra_aug=[many(others, k) for k in range(copies)] or None,
    )


def stack_rows(parts: list[np.ndarray], dim: int) -> np.ndarray:
    """The datasets' matrices one under the other; an empty [0, dim] one when there are none."""
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
    p_extra = stack_rows([data.prosody(n) for n in others], len(PROSODY_NAMES))[:, cols]
    frames = bool(rc.get("frames", True))
    if rc.get("stream_norm"):
        if not cfg.get("stream_norm"):
            raise ValueError("a stream_norm recipe needs the config's `stream_norm` settings")
        pros = Inputs([r[None, :] for r in p_ev], [r[None, :] for r in p_extra], y_extra)
        if not frames:
            return pros
        source = FrameSource.of(rc)
        seqs = [data.frames(n, source) for n in others]
        return Inputs(data.frames(ev, source), [s for part in seqs for s in part], y_extra, prosody=pros)
    if not frames:
        return Inputs(p_ev, p_extra, y_extra)
    source = FrameSource.of(rc)
    pooled = stack_rows([data.pooled(n, source) for n in others], 1024)
    return Inputs(np.hstack([data.pooled(ev, source), p_ev]), np.hstack([pooled, p_extra]), y_extra)


def prosody_columns(rc: dict) -> list[int]:
    """Indices into `PROSODY_NAMES` of the recipe's prosody columns: all but its `prosody_drop` names."""
    from streamer.prosody import PROSODY_NAMES

    drop = list(rc.get("prosody_drop", []))
    unknown = sorted(set(drop) - set(PROSODY_NAMES))
    if unknown:
        raise ValueError(f"unknown prosody features {unknown} (known: {list(PROSODY_NAMES)})")
    return [i for i, name in enumerate(PROSODY_NAMES) if name not in drop]


def plain_splits(inp: Inputs, test_aug: list | np.ndarray | None) -> Splitter:
    """`split(kind, train, test) → (training rows, their augmented copies, {view: test rows})` for a recipe that
    uses the rows as they are; the CV test clips are also scored on their augmented copies when `test_aug` is given."""

    def split(kind: str, train: np.ndarray, test: np.ndarray) -> Split:
        views = {MAIN: take_rows(inp.ev, test)}
        if test_aug is not None and kind == "cv":
            views[AUG_VIEW] = take_rows(test_aug, test)
        return cat_rows(take_rows(inp.ev, train), inp.extra), inp.train_aug(train), views

    return split
