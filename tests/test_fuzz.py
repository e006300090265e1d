"""Bad input, generated: every case is a clear error or a clean result, never a crash or a NaN."""

import asyncio
import io
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from streamer.audio import AudioError, condition, load_audio
from streamer.event import event_topic, topic_safe
from streamer.frames import SAMPLE_RATE, AudioChunk
from streamer.publisher import MqttOptions, parse_broker_url
from streamer.segmenter import Segmenter
from streamer.sources import StdinSource

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
samples = arrays(np.float32, st.integers(0, 4000), elements=st.floats(width=32, allow_nan=True, allow_infinity=True))


@FAST
@given(samples, st.integers(-10, 1_000_000))
def test_condition_returns_clean_audio_or_a_clear_error(x, rate):
    try:
        y = condition(x, rate)
    except AudioError as e:
        assert "sample rate" in str(e)
        return
    assert y.dtype == np.float32 and np.isfinite(y).all() and np.abs(y).max(initial=0) <= 1.0


@FAST
@given(st.binary(max_size=5000), st.sampled_from(["wav", "flac", "mp3", "ogg", "raw"]))
def test_random_bytes_as_a_file(tmp_path_factory, data, ext):
    path = tmp_path_factory.mktemp("fuzz") / f"x.{ext}"
    path.write_bytes(data)
    try:
        audio = load_audio(path)
    except AudioError:
        return
    assert np.isfinite(audio).all()


@FAST
@given(st.binary(max_size=20_000), st.sampled_from([8000, 16000, 44100]), st.integers(1, 3))
def test_random_bytes_on_stdin(data, rate, channels):
    async def read():
        return [c async for c in StdinSource(rate, channels, io.BytesIO(data)).chunks()]

    chunks = asyncio.run(read())
    assert all(np.isfinite(c.samples).all() for c in chunks)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 6000), st.sampled_from([0.0, 1e-4, 0.5, 1.0, 1e6, np.nan])), max_size=12),
    st.integers(0, 2**32 - 1),
)
def test_segmenter_on_arbitrary_chunks(pieces, seed):
    rng = np.random.default_rng(seed)
    cutter = Segmenter("fuzz")
    utterances = []
    for size, scale in pieces:
        audio = condition((rng.standard_normal(size) * scale).astype(np.float32), SAMPLE_RATE)
        utterances += cutter.push(AudioChunk(audio, time.monotonic()))
    utterances += cutter.flush()
    for u in utterances:
        assert 0 <= u.start_s < u.end_s and np.isfinite(u.audio).all() and len(u.audio) > 0


@FAST
@given(st.text(max_size=300))
def test_ids_cannot_inject_topic_levels_or_wildcards(name):
    level = topic_safe(name)
    assert level and len(level) <= 128
    assert not set(level) & {"/", "+", "#", "\x00"}
    assert event_topic(name, name).count("/") == 4


@FAST
@given(st.text(max_size=200))
def test_broker_urls_parse_or_fail_clearly(url):
    try:
        address = parse_broker_url(url, MqttOptions())
    except ValueError:
        return
    assert address.host and 0 < address.port < 65536
