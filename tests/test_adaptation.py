"""Stream-adaptive normalisation: running moments, shrinkage, the head-file format and the engine's per-stream state
(the frames' moments and, for a voice head that reads prosody, the prosody vectors')."""

import dataclasses
import shutil

import numpy as np
import pytest

from streamer.adaptation import FrameMoments, StreamHistories, StreamHistory, StreamNorm, shrink
from streamer.frames import SAMPLE_RATE, Utterance
from streamer.models import VOICE_HEAD
from streamer.pipeline import run_stream
from streamer.sources import FileSource
from tests.conftest import ANGRY_ES, HAPPY_ES, silence

RNG = np.random.default_rng(0)


def test_running_moments_equal_those_of_all_frames_together():
    clips = [RNG.standard_normal((n, 4)) * 3 + 1 for n in (5, 11, 2)]
    moments = FrameMoments.of(clips[0]).add(clips[1]).add(clips[2])
    every = np.concatenate(clips)
    assert moments.utterances == 3 and moments.frames == 18
    np.testing.assert_allclose(moments.moments()[0], every.mean(axis=0))
    np.testing.assert_allclose(moments.moments()[1], every.var(axis=0))


def test_shrinkage_starts_at_the_prior_and_moves_to_the_stream():
    prior, own = (np.zeros(2), np.ones(2)), (np.full(2, 4.0), np.full(2, 9.0))
    assert shrink(0, own, prior, 5) is prior
    np.testing.assert_allclose(shrink(5, own, prior, 5)[0], 2.0)  # k = n0: halfway
    np.testing.assert_allclose(shrink(3, own, prior, 0)[1], 9.0)  # n0 = 0: the stream's own
    norm = StreamNorm(np.zeros(2), np.full(2, 4.0), n0=5)
    np.testing.assert_allclose(norm.apply(np.array([[2.0, -2.0]]), None), [[1.0, -1.0]])  # no history: the prior


def test_a_head_file_carries_its_normalisation(tmp_path):
    path = tmp_path / "voice.npz"
    shutil.copy(VOICE_HEAD, path)
    assert (StreamNorm.load(path) is None) == (StreamNorm.load(VOICE_HEAD) is None)
    norm = StreamNorm(RNG.standard_normal(512), RNG.random(512) + 0.5, n0=5.0, std=True)
    norm.save_into(path)
    norm.save_into(path)  # replacing, not duplicating
    back = StreamNorm.load(path)
    assert back is not None and back.n0 == 5.0 and back.std
    np.testing.assert_array_equal(back.mean, norm.mean)
    with np.load(path) as z, np.load(VOICE_HEAD) as shipped:  # the head's own arrays are untouched
        assert set(z.files) - set(shipped.files) <= {f"norm.{k}" for k in ("mean", "var", "n0", "std")}
        assert all(np.array_equal(z[k], shipped[k]) for k in shipped.files if not k.startswith("norm."))
    prosody = StreamNorm(np.zeros(12), np.ones(12), n0=5.0)
    prosody.save_into(path, "prosody.norm.")  # a second normalisation under its own prefix leaves the first alone
    np.testing.assert_array_equal(StreamNorm.load(path).mean, norm.mean)
    assert StreamNorm.load(path, "prosody.norm.").mean.shape == (12,)
    StreamNorm(np.zeros(3), np.ones(4), n0=5).save_into(path)
    with pytest.raises(ValueError, match="bad stream normalisation"):
        StreamNorm.load(path)


def test_the_shipped_voice_head_carries_its_stream_normalisation():
    """The shipped voice head (`ens-lr+attn+aug-x3-sn`) was trained on speaker-normalised frames, so its file must
    carry the runtime's normalisation: the raw training frames' 512-d prior, n0 5, divided by the std."""
    from streamer.voice_heads import load_voice_head

    norm = StreamNorm.load(VOICE_HEAD)
    assert norm is not None, "the shipped voice head has no norm.* arrays"
    assert norm.n0 == 5.0 and norm.std
    assert norm.mean.shape == norm.var.shape == (512,)
    assert np.isfinite(norm.mean).all() and (norm.var > 0).all()
    meta = load_voice_head(VOICE_HEAD).meta
    assert meta["recipe"]["name"].endswith("-sn") and meta["stream_norm"]["n0"] == norm.n0
    assert meta["stream_norm"]["std"] == norm.std


def test_histories_are_per_stream_and_bounded():
    histories = StreamHistories(max_streams=2)
    for stream in ("a", "b", "a", "c"):
        histories.remember(stream, RNG.standard_normal((3, 4)), RNG.standard_normal(5))
    assert histories.get("b") is None and len(histories) == 2  # b was the least recently heard
    assert histories.get("a").frames.utterances == 2 and histories.get("c").frames.utterances == 1
    assert histories.get("a").prosody.utterances == histories.get("a").prosody.frames == 2  # one row per utterance
    histories.remember("a", np.zeros((0, 4)), np.ones(5))  # nothing heard: nothing counted, prosody neither
    assert histories.get("a").prosody.utterances == 2
    histories.remember("c", np.ones((2, 4)))  # an utterance without prosody (a head that reads none)
    assert histories.get("c").frames.utterances == 2 and histories.get("c").prosody.utterances == 1
    histories.forget("a")
    assert histories.get("a") is None


def test_a_streams_prosody_history_holds_the_moments_of_its_vectors():
    vectors = RNG.standard_normal((7, 5)) * 2 + 3
    history = StreamHistory()
    for v in vectors:
        history = history.add(RNG.standard_normal((4, 8)), v)
    np.testing.assert_allclose(history.prosody.moments()[0], vectors.mean(axis=0))
    np.testing.assert_allclose(history.prosody.moments()[1], vectors.var(axis=0))
    assert StreamHistory().add(np.ones((2, 8))).prosody is None


@pytest.fixture
def adapting(engine):
    """The shared engine with a stream normalisation (the training side's moments of nothing in particular)."""
    before = engine.classifier.voice
    plain = StreamNorm(np.zeros(512), np.ones(512), n0=1.0, std=False)
    engine.classifier.voice = dataclasses.replace(before, norm=plain)
    yield engine
    engine.classifier.voice = before


def test_the_voice_sees_frames_normalised_by_the_streams_past(adapting, speak):
    transcript = adapting.recogniser.recognise(Utterance.whole(speak(ANGRY_ES), "s"))
    happy = adapting.recogniser.recognise(Utterance.whole(speak(HAPPY_ES), "s")).encoder_frames
    first = adapting.classifier.classify(transcript).audio_scores
    later = adapting.classifier.classify(transcript, StreamHistory().add(happy)).audio_scores
    assert first != later  # the stream's statistics moved the voice's probabilities


async def test_a_stream_builds_its_history_and_forgets_it_when_it_ends(adapting, speak, tmp_path):
    import soundfile as sf

    path = tmp_path / "two.wav"
    sf.write(
        path, np.concatenate([silence(0.5), speak(HAPPY_ES), silence(1.0), speak(ANGRY_ES), silence(1.0)]), SAMPLE_RATE
    )
    seen = []

    class Probe:
        def send(self, event):
            seen.append(adapting.histories.get("adapt"))

    stats = await run_stream(FileSource(path, realtime=False), adapting, [Probe()], "adapt")
    assert stats.events >= 2 and seen[0] is not None  # remembered before the first event went out
    assert [h.frames.utterances for h in seen] == list(range(1, stats.events + 1))
    assert adapting.histories.get("adapt") is None  # forgotten when the stream ended


async def test_a_stream_keeps_the_prosody_of_its_final_utterances_and_forgets_it(engine, speak, tmp_path):
    """The shipped voice head reads prosody: the engine computes it once per utterance from the cut, passes it with
    the event, and the stream's history holds one prosody row per final event until the stream ends."""
    import soundfile as sf

    from streamer.prosody import prosody_features

    reader = engine.classifier.voice.prosody
    assert reader is not None and reader.norm is not None, "the shipped voice head reads no stream-normalised prosody"
    path = tmp_path / "two.wav"
    sf.write(
        path, np.concatenate([silence(0.5), speak(ANGRY_ES), silence(1.0), speak(HAPPY_ES), silence(1.0)]), SAMPLE_RATE
    )
    events, seen = [], []

    class Probe:
        def send(self, event):
            events.append(event)
            seen.append(engine.histories.get("prosodic"))

    stats = await run_stream(FileSource(path, realtime=False), engine, [Probe()], "prosodic")
    assert stats.events >= 2
    assert [h.prosody.utterances for h in seen] == list(range(1, stats.events + 1))
    vectors = np.stack([e.prosody for e in events])  # each computed from its own cut, the head's columns only
    np.testing.assert_array_equal(vectors[0], prosody_features(events[0].utterance.audio)[reader.columns])
    np.testing.assert_allclose(seen[-1].prosody.moments()[0], vectors.mean(axis=0), rtol=1e-5)
    assert engine.histories.get("prosodic") is None  # forgotten when the stream ended
