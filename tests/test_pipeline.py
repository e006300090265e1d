"""Classifier and the asyncio wiring in-process, on real speech and the shipped heads."""

import asyncio

import numpy as np
import pytest
import soundfile as sf

from streamer.event import to_wire, validate
from streamer.frames import LABELS, SAMPLE_RATE, AudioChunk, Utterance
from streamer.heads import LinearHead, voice_features
from streamer.models import TEXT_HEAD, VOICE_HEAD
from streamer.pipeline import StreamStats, Superseded, run_stream
from streamer.segmenter import Segmenter, SegmenterOptions
from streamer.sources import FileSource
from streamer.voice_heads import load_voice_head
from tests.conftest import ANGRY_ES, HAPPY_ES, silence


class ListSink:
    """A real sink that keeps events in memory."""

    def __init__(self):
        self.events = []

    async def start(self):
        pass

    def send(self, event):
        self.events.append(event)

    async def close(self):
        pass


def test_shipped_heads_load_with_expected_shapes():
    voice, text = load_voice_head(VOICE_HEAD), LinearHead.load(TEXT_HEAD)  # voice: linear, attention or ensemble
    assert text.coef.shape == (6, 384) and text.labels == LABELS
    p = voice.predict_frames(np.random.default_rng(0).standard_normal((40, 512)).astype(np.float32))
    assert p.shape == (6,) and np.isclose(p.sum(), 1)


def test_head_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    head = LinearHead(
        LABELS, rng.random(4), rng.random(4) + 0.5, rng.standard_normal((6, 4)), rng.standard_normal(6), {"id": "x"}
    )
    head.save(tmp_path / "h.npz")
    loaded = LinearHead.load(tmp_path / "h.npz")
    x = rng.standard_normal((5, 4))
    assert np.allclose(head.predict_proba(x), loaded.predict_proba(x), atol=1e-5)
    assert loaded.model_id == "x"


def test_voice_features_pool_mean_and_std():
    frames = np.arange(12, dtype=np.float32).reshape(3, 4)
    f = voice_features(frames)
    assert f.shape == (8,) and np.allclose(f[:4], frames.mean(0)) and np.allclose(f[4:], frames.std(0))


def make_utterance(audio: np.ndarray, speech_s: float) -> Utterance:
    return Utterance.whole(audio, "t", speech_s)


def test_engine_fuses_voice_and_words(engine, speak):
    angry = speak(ANGRY_ES)
    event = engine.process(make_utterance(angry, len(angry) / SAMPLE_RATE), 0)
    e = event.emotion
    assert e.text_scores is not None
    # late fusion, default rule `gated`: each modality weighted by its certainty, the words also by their gate, on
    # the words head's vote (its published scores without their temperature)
    from streamer.classifier import certainty, text_gate
    from streamer.heads import temper

    pv = np.array([e.audio_scores[label] for label in LABELS])
    pt = np.array([e.text_scores[label] for label in LABELS])
    vote = temper(pt, 1 / engine.classifier.text_model_for(event.transcript.language).head.temperature)
    wv, wt = 0.5 * certainty(pv), 0.5 * certainty(vote) * text_gate(vote, engine.classifier.opts.text_gate)
    expected = (wv * pv + wt * vote) / (wv + wt) if wv + wt > 0 else pv
    for label, value in zip(LABELS, expected, strict=True):
        assert e.scores[label] == pytest.approx(value, abs=2e-4)
    assert e.label == max(e.scores, key=e.scores.get) and e.confidence == e.scores[e.label]
    # the words scores are the words head's reading of this utterance's transcript (espeak-ng's robotic voice is
    # often misheard by Whisper base, so what the words say is checked on clean text in test_classifier)
    words = engine.classifier.classify_text([event.transcript.text], event.transcript.language)[0]
    np.testing.assert_allclose(pt, words, atol=1e-4)
    happy = speak(HAPPY_ES)
    assert engine.process(make_utterance(happy, 3.0), 1).emotion.text_scores["joy"] > 0.3


def test_an_event_on_speech_carries_the_prosody_its_voice_read(engine, speak):
    """The engine computes the utterance's prosody from its audio and the voice head reads it (its voice scores are
    those of that prosody, not of another); the event is valid on the wire, which does not carry the vector."""
    angry = speak(ANGRY_ES)
    event = engine.process(make_utterance(angry, len(angry) / SAMPLE_RATE), 0)
    wire = to_wire(event)
    validate(wire)
    voice = engine.classifier.voice
    np.testing.assert_array_equal(event.prosody, voice.prosody_of(angry))
    assert "prosody" not in wire and event.emotion.label in LABELS and event.latency.emotion > 0
    frames = event.voice_frames  # the voice branch's own pass (tests/test_voice_branch.py)
    audio = np.array([event.emotion.audio_scores[label] for label in LABELS])
    np.testing.assert_allclose(audio, voice.predict(frames, None, event.prosody), atol=1e-4)
    other = voice.prosody_of(speak(ANGRY_ES, "es+f3"))
    assert np.abs(audio - voice.predict(frames, None, other)).max() > 1e-3


def test_an_older_voice_head_without_prosody_still_loads_and_classifies(engine, speak, tmp_path):
    """A head file from before prosody (v3: an LR and attention heads on stream-normalised frames, no `inputs`, no
    `prosody.*`): the engine runs it, computes no prosody, and keeps the frames' history only."""
    from streamer.voice_heads import EnsembleHead, VoiceModel

    shipped = engine.classifier.voice
    path = tmp_path / "voice_head_v3.npz"
    old = EnsembleHead(tuple(m for m in shipped.head.members if not m.reads_prosody), {"id": "v3-like"})
    VoiceModel(old, shipped.norm).save(path)
    with np.load(path) as z:
        assert not [k for k in z.files if k.startswith("prosody.") or k.endswith(".inputs")]
    engine.classifier.voice = VoiceModel.load(path)
    try:
        assert engine.classifier.voice.prosody is None and engine.classifier.voice.adapts
        first = engine.process(make_utterance(speak(HAPPY_ES), 3.0), 0)
        engine.remember(first)
        history = engine.histories.get("t")
        second = engine.process(make_utterance(speak(ANGRY_ES), 3.0), 1)
    finally:
        engine.classifier.voice = shipped
        engine.forget("t")
    for event in (first, second):
        validate(to_wire(event))
        assert event.prosody is None and abs(sum(event.emotion.audio_scores.values()) - 1) < 1e-3
    assert history.frames.utterances == 1 and history.prosody is None


def test_no_words_means_voice_only(engine):
    event = engine.process(make_utterance(silence(1.5), 0.0), 0)
    assert event.transcript.text == "" and event.emotion.text_scores is None
    assert event.emotion.scores == event.emotion.audio_scores


async def test_a_broken_stream_does_not_stop_the_others(engine, speak, tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, np.concatenate([silence(0.5), speak(HAPPY_ES), silence(1.0)]), SAMPLE_RATE)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    sink = ListSink()
    good_stats, bad_stats = await asyncio.gather(
        run_stream(FileSource(good, realtime=False), engine, [sink], "good"),
        run_stream(FileSource(bad, realtime=False), engine, [sink], "bad"),
    )
    assert isinstance(bad_stats, StreamStats) and bad_stats.error and bad_stats.events == 0
    assert good_stats.error is None and good_stats.events >= 1
    assert {e.stream for e in sink.events} == {"good"}


async def test_engine_batches_fairly_across_streams(engine, speak):
    """A stream with many utterances waiting gets one place per batch: the other stream is not starved."""
    speech = speak(HAPPY_ES)
    done: list[str] = []

    def job(stream: str, segment: int):
        u = Utterance.whole(speech, stream)
        u = Utterance(**{**u.__dict__, "segment_id": segment})
        task = asyncio.ensure_future(engine.aprocess(u, segment))
        task.add_done_callback(lambda _: done.append(f"{stream}{segment}"))
        return task

    engine.max_batch, batches = 2, engine.batches
    tasks = [job("a", 1), job("a", 2), job("a", 3), job("b", 1)]
    events = await asyncio.gather(*tasks)
    assert engine.batches - batches == 3  # (a1, b1), (a2), (a3)
    assert done.index("b1") < done.index("a2")
    assert [(e.stream, e.seq) for e in events] == [("a", 1), ("a", 2), ("a", 3), ("b", 1)]


async def test_finals_go_before_guesses_and_guesses_wait_for_a_spare_worker(engine, speak):
    """A guess (speculation, interim) queued before a final runs after it; while a final waits, no worker is spare."""
    speech = speak(HAPPY_ES)
    done: list[str] = []
    workers, max_batch = engine.recogniser.workers, engine.max_batch
    engine.recogniser.workers, engine.max_batch = 1, 1  # one batcher, one utterance per batch: a strict order

    def job(stream: str, spare: bool):
        task = asyncio.ensure_future(engine.aprocess(Utterance.whole(speech, stream), 0, spare=spare))
        task.add_done_callback(lambda _: done.append(stream))
        return task

    try:
        assert engine.has_spare_worker()
        tasks = [job("guess", True), job("final", False)]
        await asyncio.sleep(0)  # both jobs are queued, no batch has started yet
        assert not engine.has_spare_worker()
        await asyncio.gather(*tasks)
    finally:
        engine.recogniser.workers, engine.max_batch = workers, max_batch
    assert done == ["final", "guess"]
    assert engine.has_spare_worker()


async def test_a_guess_dropped_while_it_is_encoded_is_not_decoded(engine, speak):
    """Speech went on after a guess had started: the worker skips its decoding and heads (no wasted ~150 ms)."""
    speech = speak(ANGRY_ES)
    superseded = engine.superseded
    guess = asyncio.ensure_future(engine.aprocess(Utterance.whole(speech, "resumed"), 0, spare=True))
    while engine._running == 0:  # the encoder pass has started
        await asyncio.sleep(0.002)
    guess.cancel()
    final = await engine.aprocess(Utterance.whole(speech, "resumed"), 0)
    assert engine.superseded == superseded + 1
    assert final.transcript.text and final.transcript.rejected is None
    outcomes = engine.process_batch([(Utterance.whole(speech, "x"), 0, True)], wanted=lambda i: False)
    assert isinstance(outcomes[0], Superseded) and engine.superseded == superseded + 2


async def test_a_live_stream_reuses_the_recognition_run_during_the_hangover(engine, speak, tmp_path):
    """Realtime input on an idle engine: the final event is the speculative one (no queueing after the cut)."""
    path = tmp_path / "two.wav"
    sentences = [speak(HAPPY_ES), speak(ANGRY_ES)]
    sf.write(path, np.concatenate([silence(0.5), sentences[0], silence(1.5), sentences[1], silence(1.5)]), SAMPLE_RATE)
    sink = ListSink()
    await run_stream(FileSource(path, realtime=True), engine, [sink], "spec", SegmenterOptions(interim_s=0))
    assert len(sink.events) >= 2 and all(e.transcript.text for e in sink.events)
    for e in sink.events:  # queue is 0 only for a confirmed speculation, which was ready before the cut or soon after
        assert e.latency.queue == 0.0 and (e.ready - e.utterance.emitted) * 1000 < e.latency.asr, e.latency


async def test_a_live_stream_closes_a_finished_sentence_before_the_hangover(engine, speak, tmp_path):
    """Semantic endpointing with a 3 s hangover: an event whose transcript ends a sentence goes out once its guess
    is ready, long before the hangover; any other waits for the hangover. A file read as fast as possible is cut by
    the hangover alone, as the segmenter cuts it offline."""
    path = tmp_path / "two.wav"
    audio = np.concatenate([silence(0.5), speak(HAPPY_ES), silence(4.0), speak(ANGRY_ES), silence(4.0)])
    sf.write(path, audio, SAMPLE_RATE)
    opts = SegmenterOptions(hangover_ms=3000, sentence_end_ms=160, interim_s=0)
    live = ListSink()
    await run_stream(FileSource(path, realtime=True), engine, [live], "semantic", opts)
    assert any(e.transcript.ends_sentence for e in live.events), [e.transcript.text for e in live.events]
    for e in live.events:
        # before the hangover by 0.1 s or more: a guess takes about 0.3 s with AVX-512, up to 1.5 s on a 2-core
        # AVX2-only VM, so the hangover is long enough for both
        assert (e.latency.vad < opts.hangover_ms - 100) == e.transcript.ends_sentence, (e.transcript.text, e.latency)
    fast = ListSink()
    await run_stream(FileSource(path, realtime=False), engine, [fast], "semantic-fast", opts)
    cutter = Segmenter("offline", opts)
    offline = [u for u in cutter.push(AudioChunk(audio, 0.0)) + cutter.flush() if not u.tentative]
    assert [e.utterance.end_s for e in fast.events] == [u.end_s for u in offline]


async def test_interim_events_come_before_the_final_one(engine, speak, tmp_path):
    """A long sentence: voice-only interim events (final false) precede the final event of the same segment."""
    path = tmp_path / "long.wav"
    speech = speak("No entiendo por qué me cobran dos veces el mismo recibo, es la tercera vez que llamo")
    sf.write(path, np.concatenate([silence(0.5), speech, silence(1.0)]), SAMPLE_RATE)
    sink = ListSink()
    every_second = SegmenterOptions(interim_s=1.0)
    stats = await run_stream(FileSource(path, realtime=True), engine, [sink], "interim", every_second)
    interims = [e for e in sink.events if not e.final]
    finals = [e for e in sink.events if e.final]
    assert len(finals) == 1 and interims, [e.final for e in sink.events]
    assert [e.seq for e in sink.events] == list(range(stats.events)) and sink.events[-1] is finals[0]
    final = finals[0].utterance
    for e in interims:
        assert e.utterance.segment_id == final.segment_id and e.utterance.end_s < final.end_s
        assert e.transcript.text == "" and e.transcript.rejected == "interim" and e.emotion.text_scores is None
    wire = to_wire(interims[0])
    validate(wire)
    assert wire["final"] is False and wire["event_id"].endswith(f"/interim@{interims[0].utterance.end_s:g}")


async def test_an_utterance_that_waited_too_long_is_classified_from_the_voice(engine, speak):
    """Live overload: past `latency_budget_ms` (wait + recent recognition time), only the voice counts, once the
    utterance has waited longer than a recent recognition."""
    utterance = Utterance.whole(speak(HAPPY_ES), "late")
    engine.latency_budget_s = engine._decode_s + 0.1  # what recognition has recently taken, plus 100 ms of waiting
    try:
        await asyncio.sleep(max(engine._decode_s, 0.1) + 0.2)
        late = await engine.aprocess(utterance, 0)
        fresh = await engine.aprocess(Utterance.whole(speak(HAPPY_ES), "fresh"), 0)
    finally:
        engine.latency_budget_s = 0.0
    assert late.transcript.rejected == "overload" and late.emotion.text_scores is None
    assert late.prosody is not None  # the voice alone still reads the utterance's prosody
    assert fresh.transcript.rejected is None and fresh.transcript.text


async def test_a_budget_shorter_than_recognition_still_transcribes_what_did_not_wait(engine, speak):
    """On a CPU where one recognition takes longer than the budget, shedding every utterance would leave no words at
    all: one that did not wait keeps them."""
    await engine.aprocess(Utterance.whole(speak(HAPPY_ES), "warm"), 0)  # a recent recognition time to compare with
    engine.latency_budget_s = engine._decode_s / 2
    try:
        event = await engine.aprocess(Utterance.whole(speak(ANGRY_ES), "slow-cpu"), 0)
    finally:
        engine.latency_budget_s = 0.0
    assert event.transcript.rejected is None and event.transcript.text


def test_an_event_names_the_words_head_of_its_language(speak):
    """English speech goes to the English words head, Spanish to the default one, and each event says which."""
    from streamer.pipeline import Engine
    from streamer.recogniser import RecogniserOptions

    engine = Engine(recogniser=RecogniserOptions(language=None))
    en = engine.process(Utterance.whole(speak("I am so angry, this is completely unacceptable!", "en"), "s"), 0)
    es = engine.process(Utterance.whole(speak(ANGRY_ES), "s"), 1)
    assert (en.transcript.language, es.transcript.language) == ("en", "es")
    en_head, es_head = engine.classifier.text_models["en"].model_id, engine.classifier.text_model.model_id
    assert en_head in en.models["emotion"] and es_head not in en.models["emotion"]
    assert es_head in es.models["emotion"] and en_head not in es.models["emotion"]
    validate(to_wire(en))
    engine.close()
