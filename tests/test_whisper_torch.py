"""CTranslate2's model file (streamer.ct2file), the voice branch's truncated encoder (streamer.voice_encoder) and the
torch rebuild of Whisper base's encoder (pipelines.encoders.whisper), each against CTranslate2's own encoder."""

from __future__ import annotations

import ctranslate2
import numpy as np
import pytest

from streamer.ct2file import Ct2File, Ct2FormatError, truncate_encoder
from streamer.models import ModelFileError, whisper_base_dir, whisper_encoder_dir
from streamer.voice_encoder import VoiceEncoder, VoiceEncoderOptions

torch = pytest.importorskip("torch", reason="torch is installed by setup.sh for the training pipelines")

from pipelines.encoders.whisper import build_encoder, covered, mel_window  # noqa: E402


def voiced(seconds: float, seed: int = 0) -> np.ndarray:
    """A rising harmonic tone with noise: speech-like enough to give every layer varied frames."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 60 * t
    audio = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 6))
    return (0.1 * audio + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def encode(model_dir, mel: np.ndarray, compute_type: str = "float32") -> np.ndarray:
    model = ctranslate2.models.Whisper(str(model_dir), compute_type=compute_type)
    return np.array(model.encode(ctranslate2.StorageView.from_array(mel[None]), to_cpu=True))[0]


@pytest.fixture(scope="module")
def base() -> Ct2File:
    return Ct2File.read(whisper_base_dir() / "model.bin")


@pytest.fixture(scope="module")
def torch_states(base):
    """The torch encoder's states (embedding output + 6 layers) and its final frames on 1.7 s of `voiced` audio."""
    mel = mel_window(voiced(1.7), 10.0)
    net = build_encoder(base)
    with torch.inference_mode():
        states = net(torch.from_numpy(mel[None]))
        final = [net.final(s)[0].numpy() for s in states]
    return mel, states, final


def test_reads_the_bundled_spec(base):
    assert base.spec == "WhisperSpec"
    assert base.encoder_layers() == 6
    assert base.arrays("encoder/conv1/")["encoder/conv1/weight"].shape == (512, 80, 3)
    assert base.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}


def test_truncated_or_foreign_file_is_a_clear_error(tmp_path):
    raw = (whisper_base_dir() / "model.bin").read_bytes()
    bad = tmp_path / "model.bin"
    bad.write_bytes(raw[:100_000])
    with pytest.raises(Ct2FormatError, match=str(bad)):
        Ct2File.read(bad)
    bad.write_bytes(b"\x05\x00\x00\x00" + raw[4:1000])
    with pytest.raises(Ct2FormatError, match="version 5"):
        Ct2File.read(bad)


def test_torch_last_layer_matches_ctranslate2(torch_states):
    mel, states, final = torch_states
    assert len(states) == 7 and all(s.shape == (1, 500, 512) for s in states)
    theirs = encode(whisper_base_dir(), mel)
    k = covered(len(voiced(1.7)))
    assert k == 85
    assert np.abs(final[-1][:k] - theirs[:k]).max() < 5e-3
    assert np.abs(final[-1][:k] - np.roll(theirs, 1, axis=0)[:k]).max() > 0.1  # the comparison can fail


def test_truncated_model_returns_the_middle_layer(torch_states, tmp_path):
    """A copy cut after 3 layers encodes to LayerNorm(layer 3) of the full model, and to nothing else."""
    mel, _, final = torch_states
    out = truncate_encoder(whisper_base_dir(), tmp_path / "enc3", 3)
    assert Ct2File.read(out).encoder_layers() == 3
    theirs = encode(tmp_path / "enc3", mel)
    assert np.abs(final[3] - theirs).max() < 5e-3
    assert np.abs(final[2] - theirs).max() > 0.5 and np.abs(final[6] - theirs).max() > 0.5
    with pytest.raises(ValueError, match="cannot keep 7 of 6"):
        truncate_encoder(whisper_base_dir(), tmp_path / "enc7", 7)


def test_voice_encoder_builds_verifies_and_rebuilds_its_copy():
    """The cache copy is pinned by SHA-256: a damaged one is rebuilt, and its frames are the unpadded pass."""
    target = whisper_encoder_dir(3)
    model_bin = target / "model.bin"
    with open(model_bin, "r+b") as f:  # damage it in place
        f.seek(5000)
        f.write(b"\0" * 64)
    assert whisper_encoder_dir(3) == target  # rebuilt and verified
    enc = VoiceEncoder(VoiceEncoderOptions(layers=3))
    audio = voiced(2.3, seed=1)
    frames = enc.frames(audio)
    assert frames.shape == (covered(len(audio)), 512) and frames.dtype == np.float32
    assert np.all(np.isfinite(frames)) and frames.std() > 0.1
    assert enc.frames(np.zeros(0, np.float32)).shape == (1, 512)
    assert enc.frames(np.zeros(40 * 16000, np.float32)).shape == (2000, 512)  # in 30 s pieces, as recognition
    with pytest.raises(ModelFileError, match="no pinned"):
        whisper_encoder_dir(9)
