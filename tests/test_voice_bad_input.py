"""The voice branch on audio nobody trained it for (issue #18's bad input): very short and very long utterances,
silence, clipping, a DC offset, telephone audio resampled to 16 kHz. Each gives the voice pass frames and the head
valid probabilities, never an exception or NaN."""

from __future__ import annotations

import numpy as np
import pytest
import soxr

from streamer.classifier import EmotionClassifier
from tests.test_whisper_torch import voiced


@pytest.fixture(scope="module")
def classifier() -> EmotionClassifier:
    return EmotionClassifier()


def telephone(audio: np.ndarray) -> np.ndarray:
    return soxr.resample(soxr.resample(audio, 16000, 8000), 8000, 16000).astype(np.float32)


CASES = {
    "empty": lambda: np.zeros(0, np.float32),
    "0.1 s": lambda: voiced(0.1),
    "0.29 s": lambda: voiced(0.29),
    "41 s (two 30 s pieces)": lambda: np.tile(voiced(4.1), 10),
    "silence": lambda: np.zeros(32000, np.float32),
    "clipped": lambda: np.clip(voiced(2.0) * 40, -1, 1),
    "DC offset": lambda: voiced(2.0) + 0.4,
    "8 kHz telephone resampled": lambda: telephone(voiced(2.0)),
    "full-scale noise": lambda: np.random.default_rng(0).uniform(-1, 1, 32000).astype(np.float32),
}


@pytest.mark.parametrize("case", CASES)
def test_the_voice_branch_gives_probabilities_for_odd_audio(classifier, case):
    audio = CASES[case]()
    voice = classifier.voice
    frames = voice.frames_of(audio, None)
    assert frames.ndim == 2 and frames.shape[1] == 512 and np.isfinite(frames).all()
    assert len(frames) == max(1, int(np.ceil(len(audio) / 320)))
    p = voice.predict(frames, None, voice.prosody_of(audio))
    assert p.shape == (6,) and np.isfinite(p).all() and abs(p.sum() - 1) < 1e-5
