"""The shipped voice head reads the voice branch's own encoder pass (Whisper base's first layers, unpadded) at run
time: the engine runs it once per utterance, the head reads it, and the stream's history keeps its frames."""

from __future__ import annotations

import math

import numpy as np
import soundfile as sf

from streamer.frames import LABELS, SAMPLE_RATE, Utterance
from streamer.pipeline import run_stream
from streamer.sources import FileSource
from streamer.voice_heads import VoiceModel
from tests.conftest import ANGRY_ES, silence

CALM_ES = "Mañana por la tarde iré al mercado a comprar fruta."


def test_shipped_voice_head_has_its_own_encoder_pass() -> None:
    model = VoiceModel.load()
    layers = model.head.meta["encoder_layers"]
    assert model.encoder is not None and model.encoder.opts.layers == layers
    assert model.head.meta["encoder_window_s"] == 0.0 and f"layer{layers}" in model.model_id


def test_engine_reads_the_voice_pass_and_remembers_it(engine, speak) -> None:
    """One utterance: the event's voice frames are the voice pass over the cut (not recognition's frames), its
    voice probabilities are the head's on them, and a final event adds exactly those frames to the history."""
    audio = np.concatenate([silence(0.3), speak(ANGRY_ES), silence(0.3)])
    utterance = Utterance.whole(audio, "voice-branch", len(audio) / SAMPLE_RATE)
    event = engine.process(utterance, 0)
    voice = engine.classifier.voice
    assert event.voice_frames is not None
    assert event.voice_frames.shape == (math.ceil(len(audio) / 320), 512)
    np.testing.assert_allclose(event.voice_frames, voice.encoder.frames(audio), atol=1e-5)
    assert not np.allclose(event.voice_frames[:10], event.transcript.encoder_frames[:10], atol=0.1)
    expected = voice.predict(voice.encoder.frames(audio), None, voice.prosody_of(audio))
    got = np.array([event.emotion.audio_scores[label] for label in LABELS])
    np.testing.assert_allclose(got, expected, atol=2e-3)  # the event's scores are rounded
    engine.remember(event)
    history = engine.histories.get("voice-branch")
    assert history.frames.utterances == 1 and history.frames.frames == len(event.voice_frames)
    np.testing.assert_allclose(history.frames.total, event.voice_frames.sum(axis=0), rtol=1e-4, atol=1e-3)
    engine.forget("voice-branch")


async def test_a_stream_keeps_the_voice_frames_of_its_final_utterances(engine, speak, tmp_path) -> None:
    path = tmp_path / "two.wav"
    sf.write(
        path, np.concatenate([silence(0.5), speak(ANGRY_ES), silence(1.0), speak(CALM_ES), silence(1.0)]), SAMPLE_RATE
    )
    events, seen = [], []

    class Probe:
        def send(self, event):
            events.append(event)
            seen.append(engine.histories.get("voice-stream"))

    stats = await run_stream(FileSource(path, realtime=False), engine, [Probe()], "voice-stream")
    assert stats.events >= 2
    counts = np.cumsum([len(e.voice_frames) for e in events])
    assert [h.frames.frames for h in seen] == counts.tolist()
    total = sum(e.voice_frames.astype(np.float64).sum(axis=0) for e in events)
    np.testing.assert_allclose(seen[-1].frames.total, total, rtol=1e-6)  # the voice pass's frames, not recognition's
    assert not np.allclose(seen[-1].frames.total, sum(e.transcript.encoder_frames.sum(axis=0) for e in events))
