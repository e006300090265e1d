import itertools
import time

import numpy as np
import pytest

from streamer.frames import SAMPLE_RATE, AudioChunk
from streamer.segmenter import Segmenter, SegmenterOptions, speech_seconds
from tests.conftest import silence


def segment(audio: np.ndarray, chunk_s: float = 0.1, opts: SegmenterOptions | None = None):
    cutter = Segmenter("t", opts)
    step = int(chunk_s * SAMPLE_RATE)
    out = []
    for i in range(0, len(audio), step):
        out += cutter.push(AudioChunk(audio[i : i + step], time.monotonic()))
    return out + cutter.flush()


def test_silence_and_noise_give_no_utterance(pink_noise):
    assert segment(silence(5)) == []
    assert segment(np.concatenate([silence(0.5), pink_noise, silence(0.5)])) == []


def test_utterances_match_true_speech_spans(conversation):
    audio, spans = conversation
    utterances = segment(audio)
    assert len(utterances) == len(spans)
    for u, (start, end) in zip(utterances, spans, strict=True):
        assert u.start_s <= start + 0.05  # pre-roll keeps the onset
        assert abs(u.end_s - end) < 0.25
        assert u.speech_s > 0.6 * (end - start)
        assert len(u.audio) / SAMPLE_RATE == pytest.approx(u.end_s - u.start_s, abs=0.15)
    assert [u.segment_id for u in utterances] == [0, 1]


@pytest.mark.parametrize("chunk_s", [0.01, 0.032, 0.25, 1.7])
def test_chunk_size_does_not_change_the_cut(conversation, chunk_s):
    audio, _ = conversation
    reference = [(u.start_s, u.end_s) for u in segment(audio, 0.1)]
    assert [(u.start_s, u.end_s) for u in segment(audio, chunk_s)] == reference


def test_long_speech_is_split_at_max_length(speak):
    long = np.concatenate([speak("uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce")] * 3)
    utterances = segment(long, opts=SegmenterOptions(max_utterance_s=4.0))
    assert len(utterances) >= 3
    assert all(u.duration_s <= 4.0 + 0.2 for u in utterances)
    for a, b in itertools.pairwise(utterances):
        assert b.start_s >= a.end_s - 0.01  # no audio counted twice


def test_speech_seconds(speak, pink_noise):
    speech = speak("Hola, buenos días a todos.")
    assert speech_seconds(np.concatenate([silence(1), speech, silence(1)])) > 0.5 * len(speech) / SAMPLE_RATE
    assert speech_seconds(pink_noise) < 0.1
    assert speech_seconds(np.zeros(10, np.float32)) == 0.0
