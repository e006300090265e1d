import subprocess

import numpy as np
import pytest
import soundfile as sf

from streamer.audio import AudioError, condition, load_audio, pcm16_to_float
from streamer.frames import SAMPLE_RATE


@pytest.mark.parametrize(
    ("ext", "rate", "channels"),
    [("wav", 8000, 1), ("flac", 44100, 2), ("ogg", 48000, 2), ("mp3", 22050, 1), ("wav", 16000, 6)],
)
def test_files_of_any_format_rate_and_channels_become_16k_mono(tmp_path, speak, ext, rate, channels):
    speech = speak("Hola, buenos días.")
    src = tmp_path / "src.wav"
    sf.write(src, speech, SAMPLE_RATE)
    out = tmp_path / f"speech.{ext}"
    subprocess.run(["sox", str(src), "-r", str(rate), "-c", str(channels), str(out)], check=True)
    audio = load_audio(out)
    assert audio.dtype == np.float32
    assert audio.ndim == 1
    assert abs(len(audio) / SAMPLE_RATE - len(speech) / SAMPLE_RATE) < 0.1
    assert 0.05 < np.abs(audio).max() <= 1.0


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(empty)
    garbage = tmp_path / "garbage.flac"
    garbage.write_bytes(b"this is not audio at all" * 100)
    with pytest.raises(AudioError, match="unreadable"):
        load_audio(garbage)


def test_truncated_file_keeps_what_is_there(tmp_path, speak):
    path = tmp_path / "speech.wav"
    sf.write(path, speak("Hola, buenos días a todos."), SAMPLE_RATE, subtype="PCM_16")
    data = path.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2 + 1])
    audio = load_audio(cut)
    assert 0 < len(audio) < (len(data) - 44) // 2


def test_condition_cleans_nan_inf_and_extremes():
    x = np.array([0.1, np.nan, np.inf, -np.inf, 5.0, -7.0], np.float32)
    y = condition(x, SAMPLE_RATE)
    assert np.isfinite(y).all()
    assert y.tolist() == pytest.approx([0.1, 0, 0, 0, 1.0, -1.0])


def test_condition_scales_integers_and_rejects_absurd_rates():
    y = condition(np.array([[32767, -32768]], np.int16), SAMPLE_RATE)
    assert y.tolist() == pytest.approx([(32767 - 32768) / 2 / 32768])
    for rate in (0, 10, 10_000_000):
        with pytest.raises(AudioError, match="sample rate"):
            condition(np.zeros(100, np.float32), rate)
    with pytest.raises(AudioError, match="odd number"):
        pcm16_to_float(b"\x00\x01\x02")
