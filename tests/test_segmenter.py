import itertools
import time

import numpy as np
import pytest

from streamer.frames import SAMPLE_RATE, AudioChunk
from streamer.segmenter import Segmenter, SegmenterOptions, speech_seconds
from tests.conftest import silence


def segment(audio: np.ndarray, chunk_s: float = 0.1, opts: SegmenterOptions | None = None, tentative=False):
    """The final utterances (and the tentative ones too, with `tentative=True`), in order."""
    cutter = Segmenter("t", opts)
    step = int(chunk_s * SAMPLE_RATE)
    out = []
    for i in range(0, len(audio), step):
        out += cutter.push(AudioChunk(audio[i : i + step], time.monotonic()))
    out += cutter.flush()
    return out if tentative else [u for u in out if not u.tentative]


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


def test_a_tentative_utterance_precedes_each_final_one_with_the_same_audio(conversation):
    audio, _ = conversation
    out = segment(audio, tentative=True)
    finals = [u for u in out if not u.tentative]
    assert len(finals) == 2
    for final in finals:
        position = next(i for i, u in enumerate(out) if u is final)
        guess = [u for u in out[:position] if u.tentative and u.segment_id == final.segment_id][-1]
        assert guess.same_cut(final) and np.array_equal(guess.audio, final.audio)
        assert guess.pad_s == final.pad_s
    off = SegmenterOptions(speculate_ms=0, interim_s=0)
    assert not any(u.tentative for u in segment(audio, opts=off, tentative=True))
    assert [(u.start_s, u.end_s) for u in segment(audio, opts=off)] == [(u.start_s, u.end_s) for u in finals]


def two_phrases_one_pause(speak) -> np.ndarray:
    """Two phrases 0.2 s apart (shorter than the hangover), trimmed of espeak-ng's own silence."""

    def trim(x):
        active = np.flatnonzero(np.abs(x) > 1e-3)
        return x[active[0] : active[-1] + 1]

    first, second = trim(speak("Buenos días")), trim(speak("quiero consultar mi pedido"))
    return np.concatenate([silence(0.5), first, silence(0.2), second, silence(1.0)])


def test_speech_that_resumes_supersedes_the_tentative_cut(speak):
    """A pause longer than speculate_ms but shorter than the hangover: a guess, then one longer utterance."""
    audio = two_phrases_one_pause(speak)
    out = segment(audio, chunk_s=0.032, tentative=True)
    finals = [u for u in out if not u.tentative]
    assert len(finals) == 1
    guesses = [u for u in out if u.tentative]
    assert len(guesses) >= 2 and not guesses[0].same_cut(finals[0]) and guesses[-1].same_cut(finals[0])


def test_the_segmenter_says_when_speech_overtook_a_guess(speak, conversation):
    """`spoke_after` turns true once speech goes on after a tentative cut, and never for a guess that the final
    confirms, so the pipeline can drop a stale guess at once."""
    for audio in (two_phrases_one_pause(speak), conversation[0]):
        cutter, step = Segmenter("t"), int(0.032 * SAMPLE_RATE)
        guess, overtaken, confirmed = None, [], []
        for i in range(0, len(audio), step):
            for u in cutter.push(AudioChunk(audio[i : i + step], time.monotonic())):
                if u.tentative:
                    guess = u
                elif guess is not None and guess.same_cut(u):
                    confirmed.append(guess)
            if guess is not None and cutter.spoke_after(guess):
                overtaken.append(guess)
        assert len(confirmed) == len(segment(audio, 0.032))
        assert overtaken and not set(map(id, overtaken)) & set(map(id, confirmed))


def test_a_short_tail_is_padded_to_the_voice_tail(conversation):
    """Finals keep `tail_ms` of audio and take the rest of `voice_tail_ms` as padding; cuts without a tail none."""
    audio, _ = conversation
    for tail, voice_tail in ((32, 100), (100, 100), (32, 32)):
        opts = SegmenterOptions(tail_ms=tail, voice_tail_ms=voice_tail, speculate_ms=tail)
        for u in segment(audio, opts=opts):
            kept = len(u.audio) / SAMPLE_RATE - (u.end_s - u.start_s)
            assert kept == pytest.approx(tail / 1000, abs=0.017)  # whole 32 ms windows
            assert u.pad_s + kept == pytest.approx(max(voice_tail, tail) / 1000, abs=0.017)
    long = segment(audio, opts=SegmenterOptions(max_utterance_s=1.0, interim_s=0.5), tentative=True)
    assert all(u.pad_s == 0 for u in long if u.interim)


def test_long_speech_sends_interim_utterances_every_second(speak):
    """While someone speaks, the speech so far goes out about once a second, as interim cuts of the same segment."""
    speech = speak("No entiendo por qué me cobran dos veces el mismo recibo, es la tercera vez que llamo")
    out = segment(
        np.concatenate([silence(0.5), speech, silence(1.0)]), opts=SegmenterOptions(interim_s=1.0), tentative=True
    )
    (final,) = [u for u in out if not u.tentative]
    interims = [u for u in out if u.interim]
    assert len(interims) >= int(final.duration_s) - 1 and all(u.tentative for u in interims)
    assert all(u.segment_id == final.segment_id and u.start_s == final.start_s for u in interims)
    ends = [u.end_s for u in interims]
    assert ends == sorted(ends) and ends[-1] < final.end_s
    assert all(0.7 < b - a < 1.3 for a, b in itertools.pairwise([final.start_s, *ends]))
    assert not any(u.interim for u in segment(speech, tentative=True))  # off by default


def early_ends(audio: np.ndarray, opts: SegmenterOptions) -> list[tuple[object, object, int]]:
    """Play `audio` in 32 ms chunks, asking `end_sentence` after each for the latest guess, as the pipeline does
    once a guess's transcript ends a sentence: (guess, final, silent windows when it closed) per early close."""
    cutter, step = Segmenter("t", opts), int(0.032 * SAMPLE_RATE)
    guess, out = None, []
    for i in range(0, len(audio), step):
        for u in cutter.push(AudioChunk(audio[i : i + step], time.monotonic())):
            guess = u if u.tentative else None
        if guess is not None and (final := cutter.end_sentence(guess)):
            out.append((guess, final, round((i + step) / 512) - round(final.end_s * SAMPLE_RATE / 512)))
            guess = None
    return out


def test_a_sentence_end_closes_the_utterance_after_sentence_end_ms(conversation, speak):
    """When every guess ends a sentence, a 1 s hangover with `sentence_end_ms` 160 cuts where a 160 ms hangover
    would, after 5 silent windows, each final the same cut as its guess; a pause shorter than `sentence_end_ms`
    never closes an utterance (it goes on over the pause), and 0 turns the rule off."""
    audio, _ = conversation
    closed = early_ends(audio, SegmenterOptions(hangover_ms=1000, sentence_end_ms=160, interim_s=0))
    short_hangover = segment(audio, 0.032, SegmenterOptions(hangover_ms=160, sentence_end_ms=0))
    assert len(closed) == len(short_hangover) >= 2
    for (guess, final, silent), cut in zip(closed, short_hangover, strict=True):
        assert not final.tentative and guess.same_cut(final) and np.array_equal(guess.audio, final.audio)
        assert (final.start_s, final.end_s, final.segment_id) == (cut.start_s, cut.end_s, cut.segment_id)
        assert silent == 5
    pause = two_phrases_one_pause(speak)  # 0.2 s between the phrases
    (whole,) = [final for _, final, _ in early_ends(pause, SegmenterOptions(hangover_ms=1000, sentence_end_ms=400))]
    first, second = [final for _, final, _ in early_ends(pause, SegmenterOptions(hangover_ms=1000, sentence_end_ms=96))]
    assert whole.start_s == first.start_s < first.end_s < second.start_s < second.end_s == whole.end_s
    assert not early_ends(audio, SegmenterOptions(hangover_ms=1000, sentence_end_ms=0))
