"""Voice + words emotion: the voice head (`streamer.voice_heads.VoiceModel`), the words heads (`streamer.words`),
late fusion.

The classifier picks the words head by the transcript's language (`TEXT_HEADS`, the default head for any other
language). Fusion weighs the voice by its calibrated probabilities (the head's softmax temperature,
`streamer.heads`) and the words by their head's own vote (before its temperature, see `ClassifierOptions`); it is
certainty-weighted and gated by default (`fuse`): words without a clear emotion leave the voice alone. Valence
and arousal are derived from the fused probabilities (`CIRCUMPLEX`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.adaptation import StreamHistory
from streamer.frames import LABELS, Emotion, Transcript
from streamer.heads import temper
from streamer.models import DEFAULT_WORDS_HEAD, TEXT_HEADS, VOICE_HEAD, WORDS_HEADS
from streamer.voice_heads import VoiceModel
from streamer.words import TextModel, WordsEnsemble, load_words_model

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


@dataclass
class ClassifierOptions:
    """`text_weight` is the prior share of the words in the fused probabilities (0 = voice only, 1 = words only).
    `fusion` is the rule (see `fuse`): `gated` (default) scales each modality's share by how sure it is and lets the
    words in only when they clearly name a non-neutral emotion (max non-neutral probability above `text_gate`), so
    emotion-neutral wording cannot drag the voice down; `mean` is the plain weighted mean of probabilities. The
    rules read the words head's own vote, before the temperature that calibrates the published `text_scores`: a
    temperature fitted on the head's own corpus sharpens the default ensemble (T 0.70), and sharpened it let acted
    sentences whose wording contradicts the voice through the gate (docs/models/fusion.md)."""

    text_weight: float = 0.5
    text_threads: int = 1
    fusion: str = "gated"
    text_gate: float = 0.8
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
        words = self.text_model_for(transcript.language)
        text_p = words.predict_proba([transcript.text])[0] if transcript.text else None
        vote = None if text_p is None else temper(text_p, 1.0 / words.head.temperature)
        fused = fuse(audio_p, vote, self.opts.fusion, self.opts.text_weight, self.opts.text_gate)
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
            incongruent=incongruent(audio_p, vote, self.opts.text_gate, self.opts.incongruence_gap),
            ms=(time.perf_counter() - t0) * 1000,
        )
