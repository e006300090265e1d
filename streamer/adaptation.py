"""Stream-adaptive normalisation of the Whisper encoder frames before the voice head.

A stream (a microphone, one side of a phone call) is one speaker. Normalising its frames by that speaker's own
frame statistics removes much of what differs between voices, and unseen speakers are what the voice head fails
on (`pipelines.train.voice`, recipes `-sn`: +0.05 macro-F1 on speaker-grouped folds). Only the stream's past
utterances count (causal), shrunk toward the training side's global moments with weight k / (k + n0) after k
utterances, so a stream's first utterance is normalised by the global moments alone. The training pipeline and
the runtime use the same `shrink`. A voice head that also reads prosody (`streamer.prosody.ProsodyReader`) normalises
each utterance's prosody vector the same way, by the moments of the stream's past vectors (one row per utterance):
`StreamHistory` keeps both.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.models import replace_arrays

PREFIX = "norm."  # keys of the frames' normalisation inside a voice head's .npz (the prosody's: `streamer.prosody`)


def shrink(
    k: int, moments: tuple[np.ndarray, np.ndarray], prior: tuple[np.ndarray, np.ndarray], n0: float
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, var) after k utterances with these `moments`: weight k / (k + n0) on them, the rest on the `prior`.
    n0 = 0 uses the moments alone (a training speaker's own statistics)."""
    if k == 0:
        return prior
    w = k / (k + n0)
    return w * moments[0] + (1 - w) * prior[0], w * moments[1] + (1 - w) * prior[1]


@dataclass(frozen=True)
class FrameMoments:
    """Running sums of one stream's encoder frames (float64). Immutable: `add` returns a new one, so a reader on
    another thread always sees a consistent state."""

    utterances: int
    frames: int
    total: np.ndarray  # [E] sum of frames
    squares: np.ndarray  # [E] sum of squared frames

    @classmethod
    def of(cls, encoder_frames: np.ndarray) -> FrameMoments:
        x = np.asarray(encoder_frames, dtype=np.float64)
        return cls(1, len(x), x.sum(axis=0), np.square(x).sum(axis=0))

    def add(self, encoder_frames: np.ndarray) -> FrameMoments:
        new = FrameMoments.of(encoder_frames)
        return FrameMoments(
            self.utterances + 1, self.frames + new.frames, self.total + new.total, self.squares + new.squares
        )

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Frame mean and variance, every frame weighted alike."""
        mean = self.total / self.frames
        return mean, np.maximum(self.squares / self.frames - mean**2, 0.0)


@dataclass(frozen=True)
class StreamNorm:
    """The prior (training side's global frame mean and variance), n0, and whether to divide by the std."""

    mean: np.ndarray
    var: np.ndarray
    n0: float
    std: bool = True

    def stats(self, history: FrameMoments | None) -> tuple[np.ndarray, np.ndarray]:
        if history is None:
            return self.mean, self.var
        return shrink(history.utterances, history.moments(), (self.mean, self.var), self.n0)

    def apply(self, encoder_frames: np.ndarray, history: FrameMoments | None, dtype: type = np.float32) -> np.ndarray:
        """The frames normalised by the stream's statistics so far (the prior when `history` is None), computed in
        float64 and cast once to `dtype` (training caches frames as float16)."""
        mean, var = self.stats(history)
        scale = np.sqrt(np.maximum(var, 1e-10)) if self.std else 1.0
        return ((np.asarray(encoder_frames, dtype=np.float64) - mean) / scale).astype(dtype)

    def arrays(self, prefix: str = PREFIX) -> dict[str, np.ndarray]:
        return {
            f"{prefix}mean": np.asarray(self.mean, np.float64),
            f"{prefix}var": np.asarray(self.var, np.float64),
            f"{prefix}n0": np.array(self.n0, np.float64),
            f"{prefix}std": np.array(self.std),
        }

    @classmethod
    def load(cls, path: Path, prefix: str = PREFIX) -> StreamNorm | None:
        """The normalisation stored under `prefix` in a voice head file, or None when there is none (raw input)."""
        with np.load(path, allow_pickle=False) as z:
            if f"{prefix}mean" not in z.files:
                return None
            norm = cls(z[f"{prefix}mean"], z[f"{prefix}var"], float(z[f"{prefix}n0"]), bool(z[f"{prefix}std"]))
        if norm.mean.shape != norm.var.shape or norm.mean.ndim != 1 or norm.n0 < 0:
            raise ValueError(f"{path}: bad stream normalisation (mean {norm.mean.shape}, var {norm.var.shape})")
        return norm

    def save_into(self, path: Path, prefix: str = PREFIX) -> None:
        """Add (or replace) this normalisation in an existing head file."""
        replace_arrays(path, prefix, self.arrays(prefix))


def _plus(moments: FrameMoments | None, rows: np.ndarray | None) -> FrameMoments | None:
    """`moments` with `rows` added (new moments for the first rows; unchanged when there are none)."""
    if rows is None or len(rows) == 0:
        return moments
    return FrameMoments.of(rows) if moments is None else moments.add(rows)


@dataclass(frozen=True)
class StreamHistory:
    """One stream's past final utterances: the moments of their encoder frames and of their prosody vectors (one row
    per utterance; None while none came with prosody, as with a voice head that reads none). Immutable, like
    `FrameMoments`."""

    frames: FrameMoments | None = None
    prosody: FrameMoments | None = None

    def add(self, encoder_frames: np.ndarray, prosody: np.ndarray | None = None) -> StreamHistory:
        row = None if prosody is None else np.asarray(prosody).reshape(1, -1)
        return StreamHistory(_plus(self.frames, encoder_frames), _plus(self.prosody, row))


class StreamHistories:
    """Each stream's `StreamHistory`, for the streams heard most recently (a bounded map, so a server that sees
    millions of calls does not grow: a forgotten stream starts again from the prior)."""

    def __init__(self, max_streams: int = 10_000) -> None:
        self.max_streams = max_streams
        self._histories: collections.OrderedDict[str, StreamHistory] = collections.OrderedDict()

    def get(self, stream: str) -> StreamHistory | None:
        return self._histories.get(stream)

    def remember(self, stream: str, encoder_frames: np.ndarray, prosody: np.ndarray | None = None) -> None:
        """Add a finished utterance's frames (and its prosody vector, when the voice head reads one) to its stream;
        call once per final utterance, in order. An utterance without frames counts for neither."""
        if len(encoder_frames) == 0:
            return
        self._histories[stream] = self._histories.pop(stream, StreamHistory()).add(encoder_frames, prosody)
        while len(self._histories) > self.max_streams:
            self._histories.popitem(last=False)

    def forget(self, stream: str) -> None:
        self._histories.pop(stream, None)

    def __len__(self) -> int:
        return len(self._histories)
