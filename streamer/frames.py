"""Typed values that flow between the stages: chunk → utterance → transcript → emotion → event.

Each stage takes one of these and returns the next, so a stage can be tested alone with real audio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 16_000
LABELS: tuple[str, ...] = ("anger", "disgust", "fear", "joy", "neutral", "sadness")


@dataclass(frozen=True)
class AudioChunk:
    """A piece of a stream's audio: 16 kHz mono float32 in [-1, 1].

    `arrived` is the `time.monotonic()` at which the chunk's last sample was available to us; the
    end-of-speech → publish latency is measured from it.
    """

    samples: np.ndarray
    arrived: float


@dataclass(frozen=True)
class Utterance:
    """One stretch of speech cut out by the segmenter."""

    stream: str
    segment_id: int
    audio: np.ndarray
    start_s: float
    end_s: float
    speech_end_arrived: float  # monotonic time at which the last speech sample arrived
    emitted: float  # monotonic time at which the segmenter closed the utterance
    wall_end: float  # UTC epoch seconds of the utterance end
    speech_s: float  # seconds the VAD judged speech (for the hallucination guard)
    pad_s: float = 0.0  # silence taken to follow the audio: the voice head also pools the encoder frames of this
    # much of the silence padding (the segmenter keeps a short tail so recognition can start early)
    source: str = ""
    tentative: bool = False  # sent before the hangover ended: may be superseded by a longer utterance
    interim: bool = False  # the speech so far of an utterance still going on (voice-only interim event)

    def same_cut(self, other: Utterance) -> bool:
        """Whether `other` covers exactly the same audio (a tentative utterance confirmed by the final one)."""
        return (self.segment_id, self.end_s, len(self.audio)) == (other.segment_id, other.end_s, len(other.audio))

    @classmethod
    def whole(
        cls,
        audio: np.ndarray,
        stream: str,
        speech_s: float | None = None,
        source: str = "",
        wall_end: float | None = None,
    ) -> Utterance:
        """A whole clip as one utterance that ends now (offline analysis, training, benchmarks).
        `speech_s` defaults to the clip's length (as if the VAD heard speech throughout)."""
        now, duration = time.monotonic(), len(audio) / SAMPLE_RATE
        return cls(
            stream=stream,
            segment_id=0,
            audio=audio,
            start_s=0.0,
            end_s=round(duration, 3),
            speech_end_arrived=now,
            emitted=now,
            wall_end=time.time() if wall_end is None else wall_end,
            speech_s=duration if speech_s is None else speech_s,
            source=source,
        )

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


SENTENCE_MARKS = (".", "?", "!", "。", "？", "！", "؟", "।")


@dataclass(frozen=True)
class Transcript:
    """Whisper's reading of an utterance plus the encoder frames that cover it.

    `encoder_frames` ([frames, 512]) is the single encoder pass, kept so the voice head needs no second one.
    """

    text: str
    language: str
    language_probability: float
    no_speech_prob: float
    avg_logprob: float
    compression_ratio: float
    rejected: str | None  # why the guard dropped the text, or None when it was kept
    encoder_frames: np.ndarray
    encode_ms: float
    decode_ms: float

    @property
    def ends_sentence(self) -> bool:
        """Whisper closed a kept text with a sentence mark; a trailing "..." means it heard the speaker break off."""
        text = self.text.rstrip()
        return self.rejected is None and text.endswith(SENTENCE_MARKS) and not text.endswith(("...", "…"))


@dataclass(frozen=True)
class Emotion:
    """Six-label probabilities per modality and fused."""

    scores: dict[str, float]
    audio_scores: dict[str, float]
    text_scores: dict[str, float] | None
    label: str
    confidence: float
    valence: float  # [-1, 1], derived from the fused probabilities (classifier.CIRCUMPLEX)
    arousal: float  # [-1, 1], likewise
    incongruent: bool  # voice and words disagree strongly
    ms: float


@dataclass
class Latency:
    """Milliseconds per stage, from the end of speech to publication."""

    vad: float = 0.0
    queue: float = 0.0
    asr: float = 0.0
    emotion: float = 0.0
    publish: float = 0.0
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.__dict__.items()}


@dataclass
class EmotionEvent:
    """What goes on the wire (schema in `streamer/schema/event-v1.schema.json`)."""

    node: str
    stream: str
    seq: int
    utterance: Utterance
    transcript: Transcript
    emotion: Emotion
    models: dict[str, str]
    ready: float  # monotonic time at which the event was complete, before any sink
    latency: Latency = field(default_factory=Latency)
    final: bool = True
    call_id: str | None = None  # set for the tracks of a phone call (streamer.ingest)
    role: str | None = None  # the call track's speaker: customer, agent, mixed
    prosody: np.ndarray | None = None  # the utterance's raw prosody vector when the voice head reads one (not on the
    # wire: with the encoder frames it goes into the stream's history, `Engine.remember`)
    voice_frames: np.ndarray | None = None  # the frames of the voice branch's own encoder pass when the voice head
    # has one (`VoiceModel.frames_of`; not on the wire, for the stream's history); None: the transcript's frames
