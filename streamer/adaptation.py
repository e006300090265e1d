"""Stream-adaptive normalisation of the Whisper encoder frames before the voice head.

A stream (a microphone, one side of a phone call) is one speaker. Normalising its frames by that speaker's own
frame statistics removes much of what differs between voices, and unseen speakers are what the voice head fails
on (`pipelines.voice_recipes`, recipes `-sn`: +0.05 macro-F1 on speaker-grouped folds). Only the stream's past
utterances count (causal), shrunk toward the training side's global moments with weight k / (k + n0) after k
utterances, so a stream's first utterance is normalised by the global moments alone. The training pipeline and
the runtime use the same `shrink`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PREFIX = "norm."  # keys of the normalisation's arrays inside a voice head's .npz


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

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            f"{PREFIX}mean": np.asarray(self.mean, np.float64),
            f"{PREFIX}var": np.asarray(self.var, np.float64),
            f"{PREFIX}n0": np.array(self.n0, np.float64),
            f"{PREFIX}std": np.array(self.std),
        }

    @classmethod
    def load(cls, path: Path) -> StreamNorm | None:
        """The normalisation stored in a voice head file, or None when the head works on raw frames."""
        with np.load(path, allow_pickle=False) as z:
            if f"{PREFIX}mean" not in z.files:
                return None
            norm = cls(z[f"{PREFIX}mean"], z[f"{PREFIX}var"], float(z[f"{PREFIX}n0"]), bool(z[f"{PREFIX}std"]))
        if norm.mean.shape != norm.var.shape or norm.mean.ndim != 1 or norm.n0 < 0:
            raise ValueError(f"{path}: bad stream normalisation (mean {norm.mean.shape}, var {norm.var.shape})")
        return norm

    def save_into(self, path: Path) -> None:
        """Add (or replace) this normalisation in an existing head file."""
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if not k.startswith(PREFIX)}
        np.savez(path, **arrays, **self.arrays())


class StreamHistories:
    """Each stream's `FrameMoments`, for the streams heard most recently (a bounded map, so a server that sees
    millions of calls does not grow: a forgotten stream starts again from the prior)."""

    def __init__(self, max_streams: int = 10_000) -> None:
        self.max_streams = max_streams
        self._moments: collections.OrderedDict[str, FrameMoments] = collections.OrderedDict()

    def get(self, stream: str) -> FrameMoments | None:
        return self._moments.get(stream)

    def remember(self, stream: str, encoder_frames: np.ndarray) -> None:
        """Add a finished utterance's frames to its stream (call once per final utterance, in order)."""
        if len(encoder_frames) == 0:
            return
        old = self._moments.pop(stream, None)
        self._moments[stream] = FrameMoments.of(encoder_frames) if old is None else old.add(encoder_frames)
        while len(self._moments) > self.max_streams:
            self._moments.popitem(last=False)

    def forget(self, stream: str) -> None:
        self._moments.pop(stream, None)

    def __len__(self) -> int:
        return len(self._moments)
