import asyncio
import io
import time

import numpy as np
import pytest
import soundfile as sf

from streamer.audio import AudioError
from streamer.frames import SAMPLE_RATE
from streamer.sources import (
    FileSource,
    InputDevice,
    SourceError,
    StdinSource,
    find_input_device,
    list_input_devices,
    open_source,
)


async def collect(source):
    return [c async for c in source.chunks()]


def test_file_source_plays_in_real_time_or_fast(tmp_path):
    path = tmp_path / "tone.wav"
    sf.write(path, 0.1 * np.sin(np.arange(SAMPLE_RATE) / 5), 44100)  # 0.36 s at 44.1 kHz
    t0 = time.monotonic()
    chunks = asyncio.run(collect(FileSource(path, realtime=True)))
    assert time.monotonic() - t0 >= 0.3
    assert sum(len(c.samples) for c in chunks) == pytest.approx(SAMPLE_RATE / 44100 * SAMPLE_RATE, abs=2)
    t0 = time.monotonic()
    asyncio.run(collect(FileSource(path, realtime=False)))
    assert time.monotonic() - t0 < 0.3


def test_stdin_source_reads_pcm_at_any_rate_and_channels():
    tone = (1000 * np.sin(2 * np.pi * 440 * np.arange(24_000) / 8000)).astype("<i2")
    pcm = np.stack([tone, tone], axis=1)  # stereo 8 kHz, 3 s
    chunks = asyncio.run(collect(StdinSource(rate=8000, channels=2, stream=io.BytesIO(pcm.tobytes() + b"\x01"))))
    samples = np.concatenate([c.samples for c in chunks])
    assert len(samples) == pytest.approx(len(pcm) * 2, abs=4)  # 8 kHz → 16 kHz
    expected = 1000 / 32768 * np.sin(2 * np.pi * 440 * np.arange(len(samples)) / SAMPLE_RATE)
    lag = int(np.argmax(np.correlate(samples[:2000], expected[:1000], "valid")))
    assert np.abs(samples[lag + 100 : lag + 40_000] - expected[100:40_000]).max() < 2e-3  # no clicks at chunk edges


def test_bad_source_specs_are_clear():
    with pytest.raises(SourceError, match="unknown source"):
        open_source("http://x")
    with pytest.raises(SourceError, match="needs a path"):
        open_source("file:")
    with pytest.raises(AudioError, match="sample rate"):
        StdinSource(rate=3)


def test_missing_device_names_what_exists():
    devices = [InputDevice(0, "Built-in Microphone", 2, 48000), InputDevice(3, "USB Headset", 1, 16000)]
    assert find_input_device("usb", devices).index == 3
    assert find_input_device("0", devices).name == "Built-in Microphone"
    with pytest.raises(SourceError, match=r"available: 0: Built-in Microphone, 3: USB Headset"):
        find_input_device("Blue Yeti", devices)
    with pytest.raises(SourceError, match="no audio input device"):
        find_input_device(None, [])


def test_microphone_listing_is_real():
    """PortAudio enumerates this machine's devices (none on a headless CI box); a missing one is a clear error."""
    devices = list_input_devices()
    if not devices:
        with pytest.raises(SourceError, match="no audio input device"):
            open_source("mic")
    else:
        with pytest.raises(SourceError, match="available"):
            open_source("mic:no-such-device-xyz")
