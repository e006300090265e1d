"""The voice heads: the utterance's emotion from its Whisper encoder frames (and, for some, its prosody).

A voice head is a `LinearHead` (`streamer.heads`), an `AttentionHead` (attention pooling over the encoder frames →
a small MLP; trained in torch by `pipelines.train.voice`, run here in numpy) or an `EnsembleHead` soft-voting them.
`load_voice_head` picks the class from the file. `pipelines.train.heads` and `pipelines.train.voice` write them. A
voice head file may carry a stream-adaptive normalisation (`streamer.adaptation`): its frames are then normalised by
the stream's past utterances first. A linear member may also read the utterance's prosody (`LinearHead.inputs`;
`streamer.prosody.ProsodyReader`, stored in the same file, says which columns and how they are normalised):
`VoiceModel` is the head with both normalisations, what the classifier runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamer.adaptation import StreamHistory, StreamNorm
from streamer.frames import LABELS
from streamer.heads import LinearHead, member_arrays, member_parts, read_temperature, softmax, temper
from streamer.models import VOICE_HEAD, ModelFileError, save_arrays, verify
from streamer.prosody import ProsodyReader
from streamer.voice_encoder import VoiceEncoder, VoiceEncoderOptions


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
        save_arrays(path, arrays | member_arrays(self.members))

    @classmethod
    def load(cls, path: Path) -> EnsembleHead:
        with np.load(path, allow_pickle=False) as z:
            if "kind" not in z.files or str(z["kind"]) != "ensemble":
                raise ValueError(f"{path}: not an ensemble head")
            members = [
                (AttentionHead if "kind" in part else LinearHead).from_arrays(part, f"{path} member {i}")
                for i, part in enumerate(member_parts(z))
            ]
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
