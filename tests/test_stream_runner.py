"""`StreamRunner`'s steps one at a time, on real speech, the real segmenter and the real engine: the backlog, the
numbering of events, the reuse or dropping of a guess, interims and the early close of a finished sentence."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from streamer.frames import SAMPLE_RATE, AudioChunk, Utterance
from streamer.pipeline import Engine, PipelineOptions, StreamRunner
from streamer.segmenter import SegmenterOptions
from streamer.sources import CHUNK_S, FileSource
from tests.conftest import HAPPY_ES, make_event, silence
from tests.test_pipeline import ListSink
from tests.test_segmenter import two_phrases_one_pause


def runner_for(engine: Engine, audio: np.ndarray, path: Path, realtime: bool = True, **kwargs: object) -> StreamRunner:
    """A runner whose source is `audio` saved to `path` (the tests push its chunks themselves, as `read` would)."""
    sf.write(path, audio, SAMPLE_RATE)
    return StreamRunner(FileSource(path, realtime=realtime), engine, **kwargs)


def push_all(runner: StreamRunner, audio: np.ndarray) -> list[Utterance | None]:
    """Push `audio` in the sources' chunk size; the runner's guess after each chunk."""
    step = int(CHUNK_S * SAMPLE_RATE)
    guesses = []
    for i in range(0, len(audio), step):
        runner.push(AudioChunk(audio[i : i + step], time.monotonic()))
        guesses.append(runner.speculation[0] if runner.speculation else None)
    return guesses


async def until_spare(engine: Engine) -> None:
    """The session's engine may still be finishing another test's guess: a guess is only sent to a spare worker."""
    for _ in range(500):
        if engine.has_spare_worker():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine never had a spare worker")


def cut(audio: np.ndarray, stream: str, segment_id: int, **changes: object) -> Utterance:
    return dataclasses.replace(Utterance.whole(audio, stream), segment_id=segment_id, **changes)


def test_enqueue_drops_the_oldest_utterance_beyond_max_backlog(engine, speak, tmp_path):
    speech = speak(HAPPY_ES)
    runner = runner_for(
        engine, speech, tmp_path / "a.wav", sinks=[], stream="full", options=PipelineOptions(max_backlog=2)
    )
    for segment_id in range(3):
        runner.enqueue(cut(speech, "full", segment_id))
    assert [u.segment_id for u in runner.backlog] == [1, 2]
    assert runner.stats.dropped == 1 and runner.ready.is_set()


def test_emit_numbers_events_in_one_sequence_and_marks_the_call(engine, speak, tmp_path):
    sinks = [ListSink(), ListSink()]
    runner = runner_for(
        engine, speak(HAPPY_ES), tmp_path / "a.wav", sinks=sinks, stream="call", call_id="c1", role="agent"
    )
    for seq, final in ((7, True), (3, False)):
        runner.emit(make_event("call", seq, final=final))
    assert sinks[0].events == sinks[1].events and runner.stats.events == 2
    assert [(e.seq, e.call_id, e.role) for e in sinks[0].events] == [(0, "c1", "agent"), (1, "c1", "agent")]


async def test_finish_next_classifies_from_the_voice_only_when_too_many_wait(engine, speak, tmp_path):
    """Two finals waiting with `voice_only_backlog` 1: the older is not decoded, the newer is; both go out in order."""
    speech, sink = speak(HAPPY_ES), ListSink()
    options = PipelineOptions(voice_only_backlog=1)
    runner = runner_for(engine, speech, tmp_path / "a.wav", sinks=[sink], stream="behind", options=options)
    runner.enqueue(cut(speech, "behind", 0))
    runner.enqueue(cut(speech, "behind", 1))
    try:
        await runner.finish_next()
        await runner.finish_next()
    finally:
        engine.forget("behind")
    older, newer = sink.events
    assert older.transcript.rejected == "overload" and older.emotion.text_scores is None
    assert newer.transcript.rejected is None and newer.transcript.text
    assert [(e.seq, e.utterance.segment_id) for e in sink.events] == [(0, 0), (1, 1)]
    assert (runner.stats.utterances, runner.stats.voice_only, runner.finalised) == (2, 1, 1)
    assert len(runner.stats.latencies_ms) == 2 and not runner.backlog


async def test_confirmed_reuses_the_guess_of_the_same_cut_only(engine, speak, tmp_path):
    speech = speak(HAPPY_ES)
    runner = runner_for(engine, speech, tmp_path / "a.wav", sinks=[], stream="guess")
    guess = cut(speech, "guess", 0, tentative=True)
    await until_spare(engine)
    runner.speculate(guess)
    final = dataclasses.replace(guess, tentative=False, emitted=time.monotonic())
    event = await runner.confirmed(final, 5)
    assert event is not None and event.utterance is final and event.seq == 5 and event.latency.queue == 0.0
    assert runner.speculation is None

    runner.speculate(guess)
    future = runner.speculation[1]
    other = dataclasses.replace(final, end_s=final.end_s - 0.032, audio=speech[:-512])
    assert await runner.confirmed(other, 6) is None
    await asyncio.wait([future])
    assert future.cancelled() and runner.speculation is None


async def test_push_drops_a_guess_when_speech_resumes_and_the_final_confirms_the_last(engine, speak, tmp_path):
    """Two phrases 0.2 s apart: the guess cut in the pause is dropped when speech goes on; the final covers both
    phrases and is the last guess's cut, so its event is that guess's (no recognition after the cut)."""
    audio = two_phrases_one_pause(speak)
    runner = runner_for(engine, audio, tmp_path / "a.wav", sinks=[ListSink()], stream="resumed")
    await until_spare(engine)
    guesses = push_all(runner, audio)
    start = next(i for i, g in enumerate(guesses) if g is not None)
    first, after = guesses[start], guesses[start:]
    # dropped as soon as speech went on, before the next pause's guess replaced it
    assert None in after and all(g is first for g in after[: after.index(None)])
    (final,) = runner.backlog
    assert not first.same_cut(final) and final.start_s == first.start_s and final.end_s > first.end_s + 0.5
    assert runner.speculation is not None and runner.speculation[0].same_cut(final)
    try:
        await runner.finish_next()
    finally:
        engine.forget("resumed")
    (event,) = runner.sinks[0].events
    assert event.utterance is final and event.latency.queue == 0.0 and runner.speculation is None


async def test_interim_goes_out_only_before_its_final_and_never_ahead_of_one(engine, speak, tmp_path):
    speech, sink = speak(HAPPY_ES), ListSink()
    runner = runner_for(engine, speech, tmp_path / "a.wav", sinks=[sink], stream="interim")
    interim = cut(speech, "interim", 0, tentative=True, interim=True)
    runner.finalised = 0  # the segment's final went out first: its interim is stale
    await runner.run_interim(interim)
    assert sink.events == [] and runner.stats.events == 0
    runner.finalised = -1
    await runner.run_interim(interim)
    (event,) = sink.events
    assert not event.final and event.transcript.rejected == "interim" and event.emotion.text_scores is None
    runner.enqueue(cut(speech, "interim", 1))  # a final waits: no interim is started
    await until_spare(engine)
    runner.interim(interim)
    assert runner.interim_task is None


async def test_a_guess_that_ends_a_sentence_closes_a_live_stream_early_only(engine, speak, tmp_path):
    """A sentence then 0.4 s of silence, hangover 1.5 s, `sentence_end_ms` 160: once the guess is ready and its
    transcript ends a sentence, a live stream's final is cut (the guess's cut); a file read as fast as possible
    waits for the hangover."""
    audio = np.concatenate([silence(0.5), speak(HAPPY_ES), silence(0.4)])
    opts = SegmenterOptions(hangover_ms=1500, sentence_end_ms=160, interim_s=0)
    for realtime in (True, False):
        runner = runner_for(engine, audio, tmp_path / "a.wav", realtime, sinks=[], stream="end", segmenter=opts)
        await until_spare(engine)
        push_all(runner, audio)
        assert not runner.backlog and runner.speculation is not None
        guess, future = runner.speculation
        event = await future  # its done-callback has asked `end_sentence`
        assert event.transcript.ends_sentence, event.transcript.text
        if realtime:
            (final,) = runner.backlog
            assert not final.tentative and final.same_cut(guess)
        else:
            assert not runner.backlog
        runner.drop_speculation()
