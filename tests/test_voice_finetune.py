"""Fine-tuning the voice branch's Whisper layers (pipelines.train.voice.finetune): the channel copies, the batched
prefix pass against one clip at a time, and a tiny LoRA training run."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

torch = pytest.importorskip("torch", reason="torch is installed by setup.sh for the training pipelines")

from pipelines.encoders.whisper import mel_window  # noqa: E402
from pipelines.train.voice.finetune import (  # noqa: E402
    Clip,
    PrefixCache,
    channel_audio,
    lora_arrays,
    predict,
    train,
)
from streamer.ct2file import Ct2FormatError  # noqa: E402
from streamer.models import ModelFileError, tuned_encoder_dir  # noqa: E402
from tests.test_whisper_torch import encode, voiced  # noqa: E402


def band_energy(audio: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(audio)) ** 2
    f = np.fft.rfftfreq(len(audio), 1 / 16000)
    return float(spec[(f >= lo) & (f < hi)].sum())


def test_channel_copies_are_deterministic_and_keep_length():
    audio = voiced(1.3)
    a, applied = channel_audio(audio, np.random.default_rng(3))
    b, _ = channel_audio(audio, np.random.default_rng(3))
    assert np.array_equal(a, b) and len(a) == len(audio) and a.dtype == np.float32
    assert np.all(np.abs(a) <= 1.0) and np.isfinite(a).all()
    assert applied[-1].startswith("gain")


def test_telephone_copy_removes_the_band_above_4khz():
    noise = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    for seed in range(20):  # the telephone band is drawn with p = 0.5: find a copy that has it
        out, applied = channel_audio(noise, np.random.default_rng(seed))
        if "tel8k" in applied:
            break
    else:
        pytest.fail("no telephone copy in 20 draws")
    gain = 10 ** (float(applied[-1][4:-2]) / 20)
    ratio = band_energy(out / gain, 4500, 8000) / band_energy(noise, 4500, 8000)
    assert ratio < 1e-3, f"energy above 4.5 kHz kept {ratio:.2e} of the input"


def test_batched_prefix_equals_each_clip_alone(tmp_path):
    """Clips of unequal length encoded in one padded batch (padding masked) give each clip's own unpadded pass."""
    cache = PrefixCache(2, tmp_path / "cache", batch=8)
    paths = []
    for i, seconds in enumerate([0.7, 1.9, 1.2]):
        paths.append(tmp_path / f"c{i}.wav")
        sf.write(paths[-1], voiced(seconds, seed=i), 16000)
    cache.fill(paths, "clean", 0, "test")
    for p in paths:
        mel = cache._mel(p, "clean", 0)
        with torch.inference_mode():
            alone = cache.net(torch.from_numpy(mel[None]), upto=2)[-1][0].numpy()
        batched = cache.states(p, "clean", 0).astype(np.float32)
        assert batched.shape == alone.shape
        assert np.abs(batched - alone).max() < 5e-3  # float16 storage


def test_unreadable_clip_is_left_out_with_an_error(tmp_path):
    cache = PrefixCache(2, tmp_path / "cache")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not audio")
    cache.fill([bad], "clean", 0, "test")
    with pytest.raises(OSError):
        cache.states(bad, "clean", 0)


@pytest.fixture(scope="module")
def toy_model():
    """A LoRA (rank 4) and head trained for a few epochs on two 'emotions' that differ only in the frozen prefix's
    statistics, with its clips."""
    rng = np.random.default_rng(0)
    clips = []
    for i in range(24):
        label = i % 2
        states = rng.standard_normal((60, 512)).astype(np.float32) * (0.5 if label else 1.5)
        clips.append(Clip("toy", label, f"s{i}", [states.astype(np.float16)]))
    rc = {"rank": 4, "lr": 1e-3, "head_lr": 1e-2, "epochs": 6, "batch": 8, "crop": 40, "aug_p": 0.0}
    return train(clips, rc, frozen=2, layers=3, seed=0), clips


def test_lora_learns_a_tiny_task_and_leaves_the_base_weights(toy_model):
    model, clips = toy_model
    pred = predict(model, clips).argmax(1)
    assert (pred == np.array([c.label for c in clips])).mean() >= 0.9
    lora = [m for m in model.modules() if type(m).__name__ == "LoRA"]
    assert len(lora) == 4 and all(float(m.b.detach().abs().max()) > 0 for m in lora)
    assert not any(p.requires_grad for m in lora for p in m.linear.parameters())


def test_shipped_delta_merged_into_ctranslate2_matches_the_torch_model(toy_model, tmp_path):
    """The delta (LoRA factors under CTranslate2's names) merged into the cut encoder: CTranslate2's `encode` gives
    the fine-tuned torch model's normed layer-3 frames; the build is content-addressed and checked."""
    model, _ = toy_model
    delta = tmp_path / "delta.npz"
    np.savez(delta, **lora_arrays(model, 2))
    target = tuned_encoder_dir(3, delta)
    audio = voiced(1.5)
    mel = mel_window(audio, 1.5)
    with torch.inference_mode():
        base = PrefixCache(2, tmp_path / "cache").net
        states = base(torch.from_numpy(mel[None]), upto=2)[-1]
        for layer in model.layers:
            states = layer(states)
        ours = model.norm(states)[0].numpy()
        untuned = base.final(base(torch.from_numpy(mel[None]), upto=3)[-1])[0].numpy()
    theirs = encode(target, mel)
    error, change = np.abs(ours - theirs), np.abs(untuned - ours)
    assert error.max() < 0.05  # float16 weights in the file
    assert error.mean() < 0.1 * change.mean(), f"merge error {error.mean():.4f}, the delta's change {change.mean():.4f}"
    assert tuned_encoder_dir(3, delta) == target  # built once, then found
    (target / "model.bin").write_bytes(b"damaged")
    assert tuned_encoder_dir(3, delta) == target and np.allclose(encode(target, mel), theirs)  # rebuilt


def test_a_delta_that_does_not_fit_is_refused(tmp_path):
    bad = tmp_path / "bad.npz"
    name = "encoder/layer_2/ffn/linear_0/weight"
    np.savez(bad, **{f"lora:{name}:a": np.zeros((4, 100), np.float32), f"lora:{name}:b": np.zeros((2048, 4))})
    with pytest.raises(Ct2FormatError, match="does not fit"):
        tuned_encoder_dir(3, bad)
    with pytest.raises(ModelFileError, match="missing"):
        tuned_encoder_dir(3, tmp_path / "nope.npz")


def test_a_voice_head_on_tuned_layers_loads_its_delta_and_refuses_a_changed_one(toy_model, tmp_path):
    """A head whose meta names `encoder_delta` runs the voice pass through the merged encoder; a delta that is not
    the one the head recorded is an error naming the file, never a silently different encoder."""
    import dataclasses

    from streamer.models import VOICE_HEAD, sha256_of
    from streamer.voice_heads import VoiceModel

    model, _ = toy_model
    delta = tmp_path / "voice_encoder_delta.npz"
    np.savez(delta, **lora_arrays(model, 2))
    shipped = VoiceModel.load(VOICE_HEAD)
    meta = {**shipped.head.meta, "encoder_delta": delta.name, "encoder_delta_sha256": sha256_of(delta)}
    path = tmp_path / "voice_head.npz"
    dataclasses.replace(shipped, head=dataclasses.replace(shipped.head, meta=meta), encoder=None).save(path)
    tuned = VoiceModel.load(path)
    audio = voiced(1.2)
    assert tuned.encoder.model_id.endswith(sha256_of(delta)[:12])
    frames = tuned.frames_of(audio, np.zeros((1, 512), np.float32))
    assert frames.shape == shipped.frames_of(audio, None).shape
    assert np.abs(frames - shipped.frames_of(audio, None)).mean() > 1e-3
    np.savez(delta, **{k: v * 2 for k, v in lora_arrays(model, 2).items()})
    with pytest.raises(ModelFileError, match=r"voice_encoder_delta\.npz"):
        VoiceModel.load(path)
    delta.unlink()
    with pytest.raises(ModelFileError, match="reinstall"):
        VoiceModel.load(path)


def test_delta_for_trains_on_the_named_corpora_only(tmp_path, monkeypatch):
    """A tiny real run (6 clips per corpus, 1 epoch): the delta holds LoRA factors under CTranslate2's names and
    records what it was trained on; the held-out speakers it is told to leave out are left out."""
    import json

    from pipelines.data import corpora as D
    from pipelines.train.voice import finetune as F
    from tests.conftest import DATA, data_dir

    data_dir(D.UEM)
    data_dir(D.EMODB)
    monkeypatch.setenv("EMOTION_DATA_DIR", str(DATA))
    monkeypatch.setattr(F, "DELTA_CACHE", tmp_path / "deltas")
    config = tmp_path / "finetune.yaml"
    cfg = F.yaml.safe_load(F.CONFIG.read_text())
    cfg["recipes"]["tiny"] = {"rank": 2, "lr": 1e-3, "epochs": 1, "augment": ["chan"]}
    config.write_text(F.yaml.safe_dump(cfg))
    path = F.delta_for(f"tiny@{D.EMODB}+{D.UEM}-test1", 0, limit=6, config=config)
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        lora = sorted(k for k in z.files if k.startswith("lora:"))
    assert meta["trained_on"] == [D.EMODB, D.UEM] and meta["without_speakers"] == ["test1"]
    assert meta["clips"] <= 12 and len(lora) == 8
    assert "lora:encoder/layer_2/self_attention/linear_0/weight:a" in lora
    assert F.delta_for(f"tiny@{D.EMODB}+{D.UEM}-test1", 0, limit=6, config=config) == path  # cached
    with pytest.raises(ValueError, match="unknown fine-tuned encoder"):
        F.delta_for("nope@speech_es_uem", 0, config=config)
    with pytest.raises(ValueError, match="only a LoRA"):
        F.delta_for(f"frozen@{D.UEM}", 0, config=config)


def test_shipping_a_fine_tuned_recipe_ships_its_delta_and_loads(tmp_path, monkeypatch):
    """`--ship` of a `tuned:` recipe (a tiny real run: 8 clips per corpus) writes the head and the delta its meta
    names and pins; the runtime's `VoiceModel` then runs the voice pass through the merged encoder."""
    import yaml

    from pipelines.data import corpora as D
    from pipelines.train.voice import finetune as F
    from pipelines.train.voice import ship as VS
    from pipelines.train.voice.inputs import VoiceData
    from pipelines.train.voice.recipes import DEFAULT_CONFIG
    from streamer.models import sha256_of
    from streamer.voice_heads import VoiceModel
    from tests.conftest import DATA, data_dir

    for name in (D.UEM, D.EMODB, D.URDU):
        data_dir(name)
    monkeypatch.setenv("EMOTION_DATA_DIR", str(DATA))
    monkeypatch.setattr(F, "DELTA_CACHE", tmp_path / "deltas")
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    data = VoiceData(None, tmp_path / "features", 0, 8)
    out = tmp_path / "models"
    path = VS.ship("L3ft-meanstd-lr", cfg, data, out, None, DEFAULT_CONFIG)
    model = VoiceModel.load(path)
    meta = model.head.meta
    assert meta["encoder_delta"] == VS.DELTA_FILE and meta["encoder_delta_sha256"] == sha256_of(out / VS.DELTA_FILE)
    assert meta["encoder_tuned"] == f"lora8-chan@{D.EMODB}+{D.UEM}+{D.URDU}" and "-v6" in meta["id"]
    assert model.encoder.model_id.endswith(meta["encoder_delta_sha256"][:12])
    p = model.predict(model.frames_of(voiced(1.0), None))
    assert p.shape == (6,) and abs(p.sum() - 1) < 1e-5
