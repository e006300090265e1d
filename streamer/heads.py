"""What every emotion head shares, voice and words alike: `softmax`, the softmax temperature, and `LinearHead`.

Heads are plain numpy so inference costs well under a millisecond and the shipped weights are arrays, not pickles:
`LinearHead` (standardise → linear → softmax, on pooled features) is the linear voice head (on `voice_features`, the
mean+std pooled encoder frames) and the words head on sentence embeddings (`streamer.words`). `pipelines.train.heads`
writes them. Every head carries a softmax temperature (`temperature` in the file, fitted on out-of-fold predictions
by `pipelines.train.heads`; 1.0 when absent, so older files load unchanged): it makes the probabilities calibrated
without changing the argmax, and fusion weighs each modality by those probabilities. A linear voice head may also
read the utterance's prosody (`LinearHead.inputs`, one of `VOICE_INPUTS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamer.frames import LABELS
from streamer.models import save_arrays


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits ([K] or [n, K])."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def temper(p: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities p rescaled by a softmax temperature: softmax(log p / T). T > 1 softens, T < 1 sharpens, the
    argmax never moves. For a softmax head this equals dividing its logits by T."""
    if temperature == 1.0:
        return np.asarray(p, dtype=np.float64)
    return softmax(np.log(np.clip(np.asarray(p, dtype=np.float64), 1e-300, 1.0)) / temperature)


def read_temperature(z, where: str) -> float:
    """The `temperature` of a head file (1.0 when the file predates calibration); it must be finite and > 0."""
    if "temperature" not in z:
        return 1.0
    t = float(z["temperature"])
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"{where}: temperature {t} is not a positive number")
    return t


VOICE_INPUTS = ("frames", "frames+prosody", "prosody")  # what a linear voice head reads (`LinearHead.inputs`)


@dataclass(frozen=True)
class LinearHead:
    """softmax((((x - mean) / scale) @ coef.T + intercept) / temperature), with its training metadata.

    As a voice head, x is one of `VOICE_INPUTS` (`inputs`): the mean+std pooled encoder frames, those followed by the
    utterance's normalised prosody vector, or the prosody vector alone."""

    labels: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    meta: dict = field(default_factory=dict)
    temperature: float = 1.0
    inputs: str = "frames"

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = ((np.atleast_2d(x) - self.mean) / self.scale) @ self.coef.T + self.intercept
        return softmax(z / self.temperature)

    @property
    def model_id(self) -> str:
        return str(self.meta.get("id", "unknown"))

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "labels": np.array(self.labels),
            "mean": self.mean.astype(np.float32),
            "scale": self.scale.astype(np.float32),
            "coef": self.coef.astype(np.float32),
            "intercept": self.intercept.astype(np.float32),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
            "temperature": np.array(self.temperature, dtype=np.float64),
            **({} if self.inputs == "frames" else {"inputs": np.array(self.inputs)}),  # files before v4: frames
        }

    @classmethod
    def from_arrays(cls, z, where: str = "head") -> LinearHead:
        head = cls(
            labels=tuple(str(v) for v in z["labels"]),
            mean=z["mean"],
            scale=z["scale"],
            coef=z["coef"],
            intercept=z["intercept"],
            meta=json.loads(str(z["meta"])),
            temperature=read_temperature(z, where),
            inputs=str(z["inputs"]) if "inputs" in z else "frames",
        )
        if head.labels != LABELS:
            raise ValueError(f"{where}: head labels {head.labels} differ from {LABELS}")
        if head.inputs not in VOICE_INPUTS:
            raise ValueError(f"{where}: unknown inputs {head.inputs!r} (known: {', '.join(VOICE_INPUTS)})")
        return head

    def save(self, path: Path) -> None:
        save_arrays(path, self.arrays())

    @classmethod
    def load(cls, path: Path) -> LinearHead:
        with np.load(path, allow_pickle=False) as z:
            if "kind" in z.files:
                raise ValueError(f"{path}: a {z['kind']} head, not a linear one (use load_voice_head)")
            return cls.from_arrays({k: z[k] for k in z.files}, str(path))

    @property
    def reads_prosody(self) -> bool:
        return "prosody" in self.inputs

    def predict_frames(self, encoder_frames: np.ndarray, prosody: np.ndarray | None = None) -> np.ndarray:
        """Probabilities [6] of one utterance from its encoder frames (mean+std pooled) and, for a head that reads
        it, its normalised prosody vector; unknown prosody (None) counts as the stream's average one (zeros)."""
        row = voice_features(encoder_frames) if "frames" in self.inputs else np.zeros(0, np.float32)
        if self.reads_prosody:
            width = self.coef.shape[1] - len(row)
            row = np.concatenate([row, np.zeros(width, np.float32) if prosody is None else prosody])
        return self.predict_proba(row)[0]


def voice_features(encoder_frames: np.ndarray) -> np.ndarray:
    """Mean and standard deviation over the encoder frames that cover the utterance ([frames, 512] → [1024])."""
    frames = np.asarray(encoder_frames, dtype=np.float32)
    return np.concatenate([frames.mean(axis=0), frames.std(axis=0)])


def member_arrays(members) -> dict[str, np.ndarray]:
    """An ensemble's members' arrays (each has `arrays()`) under `m<i>.` prefixes, as an ensemble file stores them."""
    return {f"m{i}.{k}": v for i, member in enumerate(members) for k, v in member.arrays().items()}


def member_parts(z) -> list[dict[str, np.ndarray]]:
    """Each member's arrays of an opened ensemble file (`m<i>.*`, the prefix removed), in order."""
    parts: list[dict[str, np.ndarray]] = []
    while f"m{len(parts)}.labels" in z.files:
        prefix = f"m{len(parts)}."
        parts.append({k[len(prefix) :]: z[k] for k in z.files if k.startswith(prefix)})
    return parts
