"""Prosody features (`streamer.prosody`, issue #3) on real espeak-ng speech and on signals whose pitch we set:
pitch, loudness, voicing, slope and robustness to bad input. The run-time cost is a benchmark figure, not a test:
`python -m pipelines.train.voice --runtime-cost`."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.frames import SAMPLE_RATE
from streamer.prosody import PROSODY_NAMES, prosody_features, track

SENTENCE = "Buenos días, quiero consultar el estado de mi pedido."
F = {name: i for i, name in enumerate(PROSODY_NAMES)}


def glide(f_start: float, f_end: float, seconds: float = 2.0, amplitude: float = 0.3) -> np.ndarray:
    """A tone whose pitch moves geometrically from f_start to f_end (a steady tone when they are equal)."""
    n = int(seconds * SAMPLE_RATE)
    phase = 2 * np.pi * np.cumsum(np.geomspace(f_start, f_end, n)) / SAMPLE_RATE
    return (amplitude * np.sin(phase)).astype(np.float32)


def test_names_and_shape(speak) -> None:
    feats = prosody_features(speak(SENTENCE))
    assert feats.shape == (len(PROSODY_NAMES),) == (15,) and feats.dtype == np.float32
    assert len(set(PROSODY_NAMES)) == len(PROSODY_NAMES) and np.isfinite(feats).all()


@pytest.mark.parametrize("hz", [90.0, 200.0, 400.0])
def test_tracks_the_pitch_of_a_steady_tone(hz: float) -> None:
    f0, _, _ = track(glide(hz, hz))
    voiced = f0[f0 > 0]
    assert len(voiced) > 0.9 * len(f0)
    assert np.median(voiced) == pytest.approx(hz, rel=0.01)
    assert prosody_features(glide(hz, hz))[F["f0_mean"]] == pytest.approx(12 * np.log2(hz / 100), abs=0.2)


def test_a_higher_voice_has_a_higher_pitch(speak) -> None:
    """espeak-ng's female variant speaks the same sentence higher than its default male voice."""
    male, female = prosody_features(speak(SENTENCE, "es")), prosody_features(speak(SENTENCE, "es+f3"))
    assert female[F["f0_mean"]] > male[F["f0_mean"]] + 4  # semitones
    f0, _, _ = track(speak(SENTENCE, "es"))
    assert 70 < np.median(f0[f0 > 0]) < 200  # a male register, not an octave error
    assert 0.2 < male[F["voiced_ratio"]] < 0.9


def test_louder_speech_has_more_energy_and_the_same_pitch(speak) -> None:
    audio = speak(SENTENCE)
    quiet, loud = prosody_features(audio * 0.25), prosody_features(audio)
    # ≈ 12 dB: the quieter copy loses a few faint frames under the absolute floor, which moves its mean a little
    assert loud[F["energy_mean"]] - quiet[F["energy_mean"]] == pytest.approx(20 * np.log10(4), abs=0.5)
    for name in ("f0_mean", "f0_std", "voiced_ratio", "tilt"):
        assert loud[F[name]] == pytest.approx(quiet[F[name]], abs=0.05), name


def test_rising_and_falling_pitch_slopes() -> None:
    rising, falling = prosody_features(glide(150, 250)), prosody_features(glide(250, 150))
    expected = 12 * np.log2(250 / 150) / 2.0  # semitones per second over the 2 s glide
    assert rising[F["f0_slope"]] == pytest.approx(expected, rel=0.05)
    assert falling[F["f0_slope"]] == pytest.approx(-expected, rel=0.05)
    assert rising[F["f0_range"]] > 6 and prosody_features(glide(200, 200))[F["f0_range"]] < 0.2


def test_silence_and_empty_input_are_unvoiced_and_finite() -> None:
    for audio in (np.zeros(3 * SAMPLE_RATE, np.float32), np.zeros(0, np.float32), np.zeros(7, np.float32)):
        feats = prosody_features(audio)
        assert np.isfinite(feats).all()
        assert feats[F["voiced_ratio"]] == 0 and feats[F["active_ratio"]] == 0 and feats[F["f0_mean"]] == 0


def test_noise_is_unvoiced_and_nan_inf_are_harmless(pink_noise) -> None:
    white = np.random.default_rng(0).normal(0, 0.1, 3 * SAMPLE_RATE).astype(np.float32)
    for noise in (white, pink_noise):
        feats = prosody_features(noise)
        assert np.isfinite(feats).all() and feats[F["voiced_ratio"]] < 0.1
    tone = glide(200, 200)
    tone[100:200] = np.nan
    tone[5000] = np.inf
    feats = prosody_features(tone)
    assert np.isfinite(feats).all() and feats[F["voiced_ratio"]] > 0.9
    with pytest.raises(ValueError, match="16000 Hz"):
        track(tone, 8000)


def test_pauses_lower_the_active_ratio(speak) -> None:
    speech = speak(SENTENCE)
    pause = np.zeros(len(speech), np.float32)
    plain, paused = prosody_features(speech), prosody_features(np.concatenate([speech, pause]))
    assert paused[F["active_ratio"]] == pytest.approx(plain[F["active_ratio"]] / 2, abs=0.02)
    assert paused[F["log_active_s"]] == pytest.approx(plain[F["log_active_s"]], abs=0.02)


def test_a_reader_takes_its_columns_and_normalises_them_by_the_streams_past(speak, tmp_path) -> None:
    """`ProsodyReader`: the head's columns of the vector, normalised by the prior for a stream's first utterance and
    by the stream's own past vectors later; saved into a head file and read back, refused when the extraction
    changed."""
    from streamer.adaptation import StreamHistory, StreamNorm
    from streamer.prosody import PROSODY_SPEC, ProsodyReader

    names = ("f0_mean", "energy_mean", "tilt")
    prior = StreamNorm(np.array([2.0, -30.0, -10.0]), np.array([4.0, 25.0, 9.0]), n0=5.0)
    reader = ProsodyReader(names, prior)
    vector = reader.features(speak(SENTENCE))
    np.testing.assert_array_equal(vector, prosody_features(speak(SENTENCE))[[F[n] for n in names]])
    np.testing.assert_allclose(reader.normalise(vector, None), (vector - prior.mean) / np.sqrt(prior.var), rtol=1e-5)
    # a stream whose past vectors were this one ± 1: its own mean and variance 1, weighted 100 / (100 + n0)
    history = StreamHistory()
    for other in [vector - 1, vector + 1] * 50:
        history = history.add(np.zeros((3, 512)), other)
    assert history.prosody.utterances == 100 and history.frames.utterances == 100
    w = 100 / 105
    mean, var = w * vector + (1 - w) * prior.mean, w * 1.0 + (1 - w) * prior.var
    np.testing.assert_allclose(reader.normalise(vector, history.prosody), (vector - mean) / np.sqrt(var), rtol=1e-4)

    path = tmp_path / "head.npz"
    np.savez(path, other=np.arange(3))
    reader.save_into(path)
    back = ProsodyReader.load(path)
    assert back.names == names and back.norm.n0 == 5.0
    np.testing.assert_array_equal(back.norm.var, prior.var)
    with np.load(path) as z:
        assert str(z["prosody.spec"]) == PROSODY_SPEC and z["other"].tolist() == [0, 1, 2]
    np.savez(tmp_path / "none.npz", other=np.arange(3))
    assert ProsodyReader.load(tmp_path / "none.npz") is None  # a head that reads no prosody

    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(path, **{**arrays, "prosody.spec": np.array("prosody-v1")})
    with pytest.raises(ValueError, match="retrain"):
        ProsodyReader.load(path)
    with pytest.raises(ValueError, match="unknown"):
        ProsodyReader(("f0_mean", "loudness"))
    with pytest.raises(ValueError, match="3 columns"):
        ProsodyReader(names, StreamNorm(np.zeros(2), np.ones(2), n0=5.0))
