"""Voice recipes (issue #3): the attention head (torch training, numpy runtime), the recipes on tiny generated data,
the evaluation reports, and the shipped voice head. A real-data smoke run is skipped when ../shared/data is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.data import corpora as D
from pipelines.evaluate import metrics as M
from pipelines.evaluate import report as R
from pipelines.train.voice import cli as VC
from pipelines.train.voice import inputs as VI
from pipelines.train.voice import models as VM
from pipelines.train.voice import norm as VN
from pipelines.train.voice import recipes as VR
from pipelines.train.voice import ship as VS
from streamer.frames import LABELS
from streamer.heads import LinearHead, voice_features
from streamer.models import VOICE_HEAD
from streamer.voice_heads import AttentionHead, load_voice_head

torch = pytest.importorskip("torch", reason="torch (train extra / setup.sh) is needed to train the attention heads")
CONFIG = yaml.safe_load(VR.DEFAULT_CONFIG.read_text(encoding="utf-8"))
E = 512


def tiny_cfg(**attention) -> dict:
    cfg = {**CONFIG, "cv_folds": 2, "n_boot": 50}
    cfg["attention"] = {**CONFIG["attention"], "epochs": 2, "hidden": 16, "batch": 8, **attention}
    cfg["mlp"] = {**CONFIG["mlp"], "epochs": 3, "hidden": 16}
    return cfg


def random_net(stats: bool, seed: int = 0):
    torch.manual_seed(seed)
    net = VM.make_attention_net(E, 32, 0.1, stats)
    with torch.no_grad():  # non-trivial LayerNorm parameters, so they are exercised too
        net.ln.weight.uniform_(0.5, 1.5)
        net.ln.bias.uniform_(-0.2, 0.2)
    return net.eval()


# --------------------------------------------------------------------------- attention head: torch ⇔ numpy


@pytest.mark.parametrize("stats", [False, True])
def test_numpy_attention_head_equals_torch(stats: bool) -> None:
    rng = np.random.default_rng(1)
    mean, scale = rng.normal(0, 0.3, E).astype(np.float32), rng.uniform(0.5, 2, E).astype(np.float32)
    net = random_net(stats)
    head = VM.to_head(net, mean, scale, stats, {"id": "t"})
    for length in (1, 7, 333):
        frames = rng.normal(0, 1, (length, E)).astype(np.float32)
        with torch.no_grad():
            expected = torch.softmax(net(torch.from_numpy((frames - mean) / scale)[None]), dim=1)[0].numpy()
        np.testing.assert_allclose(head.predict_frames(frames), expected, atol=2e-5)


def test_attention_head_roundtrip_and_voice_head_loader(tmp_path: Path) -> None:
    head = VM.to_head(random_net(True), np.zeros(E, np.float32), np.ones(E, np.float32), True, {"id": "attn-x"})
    path = tmp_path / "voice_head.npz"
    head.save(path)
    with np.load(path, allow_pickle=False) as z:  # arrays only, no pickles
        assert str(z["kind"]) == "attention"
    loaded = load_voice_head(path)
    assert isinstance(loaded, AttentionHead) and loaded.stats and loaded.model_id == "attn-x"
    frames = np.random.default_rng(0).normal(size=(50, E)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict_frames(frames), head.predict_frames(frames), atol=1e-7)
    with pytest.raises(ValueError, match="not an attention head"):
        AttentionHead.load(_linear_head(tmp_path))
    assert isinstance(load_voice_head(_linear_head(tmp_path)), LinearHead)


def test_ensemble_head_averages_its_members(tmp_path: Path) -> None:
    from streamer.voice_heads import EnsembleHead

    attn = VM.to_head(random_net(False), np.zeros(E, np.float32), np.ones(E, np.float32), False, {"id": "a"})
    linear = LinearHead.load(_linear_head(tmp_path))
    rng = np.random.default_rng(2)
    linear = LinearHead(
        LABELS,
        linear.mean,
        linear.scale,
        rng.normal(0, 0.1, linear.coef.shape).astype(np.float32),
        linear.intercept,
        linear.meta,
    )
    ens = EnsembleHead((linear, attn), {"id": "ens", "encoder_window_s": 10.0})
    path = tmp_path / "ens.npz"
    ens.save(path)
    loaded = load_voice_head(path)
    assert isinstance(loaded, EnsembleHead) and loaded.model_id == "ens"
    assert [type(m) for m in loaded.members] == [LinearHead, AttentionHead]
    frames = rng.normal(size=(40, E)).astype(np.float32)
    expected = (linear.predict_frames(frames) + attn.predict_frames(frames)) / 2
    np.testing.assert_allclose(loaded.predict_frames(frames), expected, atol=1e-6)
    with pytest.raises(ValueError, match="not a linear one"):
        LinearHead.load(path)


def _linear_head(tmp_path: Path) -> Path:
    d = 2 * E
    head = LinearHead(
        LABELS,
        np.zeros(d, np.float32),
        np.ones(d, np.float32),
        np.zeros((6, d), np.float32),
        np.zeros(6, np.float32),
        {"id": "lin"},
    )
    path = tmp_path / "linear.npz"
    head.save(path)
    return path


def test_shipped_voice_head_loads_and_runs_on_frames() -> None:
    """(Its cost per utterance is a benchmark figure: `python -m pipelines.train.voice --runtime-cost`.)"""
    from streamer.recogniser import RecogniserOptions

    head = load_voice_head(VOICE_HEAD)
    window = 0.0 if head.meta.get("encoder_layers") else RecogniserOptions().encoder_window_s  # the own pass: unpadded
    assert head.meta["encoder_window_s"] == window
    assert head.meta["limit"] is None, "shipped head comes from a --limit run"
    assert head.meta["recipe"]["name"] == CONFIG["ship"], "the shipped head is not the config's `ship` recipe"
    frames = np.random.default_rng(0).normal(size=(350, E)).astype(np.float32)  # a 7 s utterance
    p = head.predict_frames(frames)  # without prosody (a benchmark of the frames alone): the stream's average one
    assert p.shape == (6,) and abs(p.sum() - 1) < 1e-6 and (p >= 0).all()
    if isinstance(head, LinearHead):
        np.testing.assert_allclose(p, head.predict_proba(voice_features(frames))[0])


# --------------------------------------------------------------------------- training pieces


def test_crop_repeat_pads_short_and_windows_long() -> None:
    rng = np.random.default_rng(0)
    short = np.arange(3)[:, None].repeat(2, 1)
    np.testing.assert_array_equal(VM.crop(short, 7, rng)[:, 0], [0, 1, 2, 0, 1, 2, 0])
    long = np.arange(50)[:, None]
    window = VM.crop(long, 10, rng)[:, 0]
    assert len(window) == 10 and (np.diff(window) == 1).all()


def test_class_weights_balance_counts() -> None:
    y = np.array(["anger"] * 6 + ["joy"] * 2)
    w = VM.class_weights(y)
    assert w[LABELS.index("anger")] * 6 == pytest.approx(w[LABELS.index("joy")] * 2)
    assert w[LABELS.index("fear")] == 0


def synthetic_sequences(n_per_label: int, seed: int, shift: float = 1.5):
    """Frame sequences whose label is a shift of a few dimensions: learnable in a couple of epochs."""
    rng = np.random.default_rng(seed)
    seqs, y = [], []
    for k, label in enumerate(LABELS):
        for _ in range(n_per_label):
            s = rng.normal(0, 1, (int(rng.integers(20, 140)), E)).astype(np.float32)
            s[:, k * 8 : k * 8 + 8] += shift
            seqs.append(s.astype(np.float16))
            y.append(label)
    return seqs, np.array(y)


def test_train_attention_learns_and_is_deterministic() -> None:
    seqs, y = synthetic_sequences(6, 0)
    acfg = {**tiny_cfg()["attention"], "epochs": 8}
    a = VM.train_attention(seqs, y, acfg, True, seed=3, aug=[[s * np.float16(0.9) for s in seqs]])
    b = VM.train_attention(seqs, y, acfg, True, seed=3, aug=[[s * np.float16(0.9) for s in seqs]])
    np.testing.assert_array_equal(a.w1, b.w1)
    test, y_test = synthetic_sequences(3, 1)
    pred = np.array(LABELS)[a.predict_many(test).argmax(axis=1)]
    assert np.mean(pred == y_test) > 0.6


def test_augment_audio_is_seeded_and_changes_the_clip() -> None:
    from pipelines.data.features import augment_audio

    audio = (0.3 * np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000)).astype(np.float32)
    a, applied = augment_audio(audio, np.random.default_rng([0, 0, 7]))
    b, _ = augment_audio(audio, np.random.default_rng([0, 0, 7]))
    np.testing.assert_array_equal(a, b)
    assert applied and np.isfinite(a).all() and np.abs(a).max() <= 0.99
    assert 16000 / 1.1 - 2 <= len(a) <= 16000 / 0.9 + 2
    assert not np.allclose(a[: min(len(a), 16000)], audio[: min(len(a), 16000)], atol=1e-3)
    applied_all = [n for seed in range(30) for n in augment_audio(audio, np.random.default_rng(seed))[1]]
    for kind in ("speed", "noise", "reverb"):
        assert any(n.startswith(kind) for n in applied_all), kind


def test_feature_cache_writes_of_two_processes_do_not_collide(tmp_path: Path, monkeypatch) -> None:
    """Two runs filling the same cache (a test beside a long pipeline run) write the same file: each through its own
    temporary name, so neither renames the other's away (that once dropped a clip from a run as "unreadable")."""
    import itertools
    import os

    from pipelines.data import features as F

    pids = itertools.count(1000)
    monkeypatch.setattr(os, "getpid", lambda: next(pids))
    target = tmp_path / "cache" / "x.npy"
    real_save, nested = np.save, []

    def save_while_another_process_writes(path, array):
        real_save(path, array)
        if not nested:  # the other process writes the same entry between our save and our rename
            nested.append(path)
            F._atomic_save(target, array + 1)

    monkeypatch.setattr(np, "save", save_while_another_process_writes)
    F._atomic_save(target, np.zeros(3))
    assert nested and np.load(target).tolist() == [0, 0, 0]  # last rename wins; both writes succeeded
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.npy"]


def test_mfcc_mean_shape() -> None:
    from pipelines.data.features import mfcc_mean

    rng = np.random.default_rng(0)
    for n in (100, 16000):
        m = mfcc_mean(rng.normal(0, 0.1, n).astype(np.float32))
        assert m.shape == (128,) and np.isfinite(m).all()


# --------------------------------------------------------------------------- stream (speaker) normalisation


def one_stream(n: int = 12, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """n clips of two speakers (offset frames, as speakers differ), half of them neutral."""
    rng = np.random.default_rng(seed)
    seqs = [rng.normal(3.0 * (i % 2), 1 + i % 3, (int(rng.integers(5, 30)), 8)) for i in range(n)]
    groups = np.array([f"spk{i % 2}" for i in range(n)])
    y = np.array(["neutral" if i % 4 < 2 else LABELS[i % len(LABELS)] for i in range(n)])
    return seqs, groups, y


def causal_norm(seqs: list[np.ndarray], groups: np.ndarray, y: np.ndarray, n0: float) -> list[np.ndarray]:
    sums = VN.FrameSums.of(seqs)
    histories = VN.stream_histories(groups, y, VN.CAUSAL, np.random.default_rng(5))
    prior = (np.zeros(8), np.ones(8))
    return VN.normalise_clips(seqs, sums, histories, prior, n0, std=True)


def test_causal_histories_hold_only_earlier_clips_of_the_same_stream() -> None:
    _, groups, y = one_stream()
    histories = VN.stream_histories(groups, y, VN.CAUSAL, np.random.default_rng(0))
    for g in set(groups):
        members = np.flatnonzero(groups == g)
        assert sorted(len(histories[i]) for i in members) == list(range(len(members)))  # an order of the stream
        for i in members:
            assert i not in histories[i] and set(groups[histories[i]]) <= {g}
            assert all(set(histories[j]) < set(histories[i]) for j in histories[i])  # the past's past, nothing else


def test_causal_normaliser_ignores_future_clips() -> None:
    """Changing the stream's last clip (or the other stream) changes no other clip's normalised frames."""
    seqs, groups, y = one_stream()
    before = causal_norm(seqs, groups, y, n0=2)
    histories = VN.stream_histories(groups, y, VN.CAUSAL, np.random.default_rng(5))
    last = max(np.flatnonzero(groups == "spk0"), key=lambda i: len(histories[i]))
    changed = list(seqs)
    changed[last] = seqs[last] * 50 + 7
    after = causal_norm(changed, groups, y, n0=2)
    for i in range(len(seqs)):
        if i != last:
            np.testing.assert_array_equal(after[i], before[i])
    # whereas the transductive (upper-bound) view does use them
    sums_b, sums_a = VN.FrameSums.of(seqs), VN.FrameSums.of(changed)
    all_clips = VN.stream_histories(groups, y, VN.TRANSDUCTIVE, None)
    first = next(i for i in np.flatnonzero(groups == "spk0") if i != last)
    assert not np.allclose(sums_b.moments(all_clips[first])[0], sums_a.moments(all_clips[first])[0])


def test_shrinkage_starts_at_the_prior_and_moves_to_the_stream() -> None:
    seqs, _, _ = one_stream()
    sums = VN.FrameSums.of(seqs)
    prior = (np.full(8, 10.0), np.full(8, 4.0))
    mean, var = VN.shrunk_stats(sums, np.zeros(0, int), prior, n0=5)
    np.testing.assert_array_equal(mean, prior[0])
    np.testing.assert_array_equal(var, prior[1])
    own = np.array([0, 2, 4, 6, 8])
    frames = np.concatenate([seqs[i] for i in own])
    np.testing.assert_allclose(VN.shrunk_stats(sums, own, prior, n0=0)[0], frames.mean(axis=0))
    np.testing.assert_allclose(VN.shrunk_stats(sums, own, prior, n0=0)[1], frames.var(axis=0))
    half = VN.shrunk_stats(sums, own, prior, n0=len(own))[0]  # k = n0: halfway
    np.testing.assert_allclose(half, (frames.mean(axis=0) + prior[0]) / 2)


def test_pipeline_normalisation_equals_the_runtimes() -> None:
    """A stream's clips normalised by the pipeline (causal history) as `streamer.adaptation` does at run time."""
    from streamer.adaptation import FrameMoments, StreamNorm

    seqs, groups, y = one_stream()
    histories = VN.stream_histories(groups, y, VN.CAUSAL, np.random.default_rng(5))
    prior = (np.full(8, 0.5), np.full(8, 2.0))
    ours = VN.normalise_clips(seqs, VN.FrameSums.of(seqs), histories, prior, n0=5, std=True)
    norm = StreamNorm(prior[0], prior[1], n0=5)
    for g in set(groups):
        state = None  # the runtime's per-stream moments, fed in the stream's order
        for i in sorted(np.flatnonzero(groups == g), key=lambda i: len(histories[i])):
            np.testing.assert_allclose(ours[i], norm.apply(seqs[i], state), rtol=2e-3, atol=2e-3)  # ours: float16
            state = FrameMoments.of(seqs[i]) if state is None else state.add(seqs[i])


def test_skewed_history_is_mostly_neutral_and_excludes_the_clip() -> None:
    groups = np.array(["a"] * 60)
    y = np.array(["neutral"] * 20 + ["anger", "joy", "sadness", "fear"] * 10)
    histories = VN.stream_histories(groups, y, VN.SKEWED, np.random.default_rng(0), neutral_share=0.65)
    longest = max(histories, key=len)
    assert len(longest) == int(20 / 0.65)  # a non-neutral clip's: all 20 neutral clips can be in its history
    assert np.mean(y[longest] == "neutral") == pytest.approx(0.65, abs=0.03)
    assert all(i not in h and len(set(h)) == len(h) for i, h in enumerate(histories))
    assert min(len(h) for h in histories) == 0  # the stream's first clip has heard nothing


# --------------------------------------------------------------------------- every recipe on a tiny generated set


def fake_data(tmp_path: Path) -> VI.VoiceData:
    """A VoiceData with made-up clips and cached views (no audio, no Whisper): 4 UEM speakers incl. test1/test2."""
    data = VI.VoiceData(root=tmp_path, cache_dir=None, seed=0, limit=None)
    rng = np.random.default_rng(0)
    for name, speakers in ((D.UEM, ["spk00", "spk01", "test1", "test2"]), (D.EMODB, ["emodb03"])):
        seqs, y = synthetic_sequences(len(speakers), seed=len(name))
        clips = [
            D.SpeechClip(name, tmp_path / f"{name}{i}.flac", label, speakers[i % len(speakers)], "x")
            for i, label in enumerate(y)
        ]
        data.clips[name] = clips
        for source in (VI.RECOGNITION, VI.FrameSource(0.0), VI.FrameSource(0.0, 3)):
            data._views[(name, source, None)] = seqs
        for source in (VI.RECOGNITION, VI.FrameSource(0.0, 3)):
            data._views[(name, source, 0)] = [s + np.float16(0.1) for s in seqs]
            data._views[(name, source, 1)] = [s - np.float16(0.1) for s in seqs]
        data._views[(name, "mfcc")] = rng.normal(0, 1, (len(clips), 128)).astype(np.float32)
        data._views[(name, "prosody")] = fake_prosody(clips, rng)
    return data


def fake_prosody(clips: list, rng: np.random.Generator, speaker_offset: float = 0.0) -> np.ndarray:
    """Prosody vectors whose label moves one column each (learnable), plus a per-speaker offset on every column."""
    from streamer.prosody import PROSODY_NAMES

    out = rng.normal(0, 1, (len(clips), len(PROSODY_NAMES)))
    offsets = {s: speaker_offset * rng.normal(0, 1, len(PROSODY_NAMES)) for s in sorted({c.speaker for c in clips})}
    for i, c in enumerate(clips):
        out[i, LABELS.index(c.label)] += 2.0
        out[i] += offsets[c.speaker]
    return out.astype(np.float32)


@pytest.mark.parametrize(
    "recipe",
    [
        "meanstd-lr",
        "meanstd-lr+aug",
        "mfcc-mlp",
        "attn-uem",
        "attn+aug",
        "attn-stats-w0",
        "ens-lr+attn+aug",
        "attn+aug2",
        "meanstd-lr-sn",
        "attn+aug-sn",
        "ens-lr+attn+aug-sn",
        "prosody-lr",
        "prosody-lr-sn",
        "meanstd+prosody-lr-sn",
        "ens-lr+prosody+attn+aug-x3-sn",
        "ens-lr+attn+aug-x3+prosody-sn",
        "ens-lr+attn+aug-x3+prosody-nodur-sn",
    ],
)
def test_each_recipe_runs_on_a_tiny_generated_set(tmp_path: Path, recipe: str) -> None:
    cfg = tiny_cfg()
    data = fake_data(tmp_path)
    result = VR.evaluate(recipe, cfg["recipes"][recipe], data, cfg)
    n_uem = len(data.clips[D.UEM])
    assert len(result.cv.y_true) == n_uem and set(result.cv.y_pred) <= set(LABELS)
    assert len(np.unique(result.cv.fold)) == 2
    held = sum(c.speaker in ("test1", "test2") for c in data.clips[D.UEM])
    assert result.heldout is not None and len(result.heldout.y_true) == held
    assert float(result.extras["head ms/utt"]) < 5
    if recipe in ("meanstd-lr", "attn+aug", "ens-lr+attn+aug"):  # scored on augmented test clips too
        assert len(result.more[VR.AUG_TEST].y_true) == n_uem
    if recipe.endswith("-sn"):  # stream normalisation: hidden views folded into three summary columns
        assert {"cv|causal 1", "cv|skewed 0", "heldout|transductive"} <= set(result.more)
        VN.stream_columns(result)
        assert not result.more and all(" / " in result.extras[c] for c in VN.STREAM_COLUMNS.values())


def test_prosody_recipes_append_the_speaker_normalised_prosody(tmp_path: Path) -> None:
    """`meanstd+prosody-lr-sn`: 1024 pooled frame columns, then the prosody columns, each block normalised by the
    same causal histories with its own moments, as the runtime's `StreamNorm` would (clip 0 of a stream: prior)."""
    from streamer.adaptation import FrameMoments, StreamNorm
    from streamer.prosody import PROSODY_NAMES

    cfg = tiny_cfg()
    data = fake_data(tmp_path)
    rc = cfg["recipes"]["meanstd+prosody-lr-sn"]
    inp = VI.recipe_inputs(rc, data, cfg)
    split = VN.stream_norm_splits(inp, rc, data, cfg)
    cv, _ = VI.splits_for(data, cfg)
    train, test = cv[0]
    rows, aug, views = split("cv", train, test)
    assert aug is None and rows.shape == (len(train) + len(inp.extra), 1024 + len(PROSODY_NAMES))
    main = views[VI.MAIN]
    assert main.shape == (len(test), 1024 + len(PROSODY_NAMES))
    # the prosody block, recomputed as the runtime does: prior = global moments of the training side's vectors
    pros = data.prosody(D.UEM)
    prior_rows = np.concatenate([pros[train], data.prosody(D.EMODB)]).astype(np.float64)
    norm = StreamNorm(prior_rows.mean(axis=0), prior_rows.var(axis=0), CONFIG["stream_norm"]["n0"])
    speakers = np.array([c.speaker for c in data.clips[D.UEM]])[test]
    y = data.labels(D.UEM)[test]
    histories = VN.stream_histories(speakers, y, VN.CAUSAL, np.random.default_rng([0, 0, 0]))
    for i, h in enumerate(histories):
        past = None
        for j in h:
            past = FrameMoments.of(pros[test][j][None]) if past is None else past.add(pros[test][j][None])
        np.testing.assert_allclose(main[i, 1024:], norm.apply(pros[test][i][None], past)[0], rtol=2e-3, atol=2e-3)
    # the frame block is that of `meanstd-lr-sn` (the same histories)
    plain = VN.stream_norm_splits(VI.recipe_inputs(cfg["recipes"]["meanstd-lr-sn"], data, cfg), rc, data, cfg)
    np.testing.assert_array_equal(plain("cv", train, test)[2][VI.MAIN], main[:, :1024])


def test_speaker_normalisation_removes_speaker_offsets_from_prosody(tmp_path: Path) -> None:
    """Speakers far apart in pitch and loudness (offsets larger than the emotions' effect): the per-speaker
    normalised prosody LR beats the same LR on raw prosody."""
    cfg = {**tiny_cfg(), "cv_folds": 4}
    data = VI.VoiceData(root=tmp_path, cache_dir=None, seed=0, limit=None)
    rng = np.random.default_rng(1)
    for name, speakers in ((D.UEM, [f"spk{i:02d}" for i in range(8)] + ["test1", "test2"]), (D.EMODB, ["e1", "e2"])):
        clips = [
            D.SpeechClip(name, tmp_path / f"{name}{i}", label, s, "x")
            for s in speakers
            for i, label in enumerate(LABELS * 4)
        ]
        data.clips[name] = clips
        data._views[(name, "prosody")] = fake_prosody(clips, rng, speaker_offset=6.0)
    f1 = {}
    for recipe in ("prosody-lr", "prosody-lr-sn"):
        result = VR.evaluate(recipe, cfg["recipes"][recipe], data, cfg)
        f1[recipe] = M.macro_f1(result.cv.y_true, result.cv.y_pred)
    assert f1["prosody-lr-sn"] > f1["prosody-lr"] + 0.1, f1


def test_prosody_recipes_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    data = fake_data(tmp_path)
    for bad in (
        {"model": "attention", "prosody": True, "datasets": [D.UEM]},
        {"model": "logreg", "C": 1, "prosody": True, "augment": True, "datasets": [D.UEM]},
    ):
        with pytest.raises(ValueError, match="prosody"):
            VI.recipe_inputs(bad, data, cfg)


def test_prosody_cache_and_result_key(tmp_path: Path, speak, monkeypatch) -> None:
    """Prosody is cached per audio file and spec; a prosody recipe's result key depends on the prosody spec."""
    import soundfile as sf

    from pipelines.data.features import ProsodyFeaturizer
    from streamer.prosody import prosody_features

    wav = tmp_path / "a.wav"
    sf.write(wav, speak("Hola, ¿qué tal?"), 16000, subtype="FLOAT")
    featurizer = ProsodyFeaturizer(tmp_path / "cache")
    first, again = featurizer.one(wav), featurizer.one(wav)
    assert (featurizer.misses, featurizer.hits) == (1, 1)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, prosody_features(sf.read(wav, dtype="float32")[0]))

    cfg = tiny_cfg()
    data = fake_data(tmp_path)
    for c in data.clips[D.UEM] + data.clips[D.EMODB]:
        c.path.write_bytes(b"x")
    keys = {n: VR.result_key(cfg["recipes"][n], data, cfg) for n in ("prosody-lr-sn", "meanstd-lr-sn")}
    monkeypatch.setattr("streamer.prosody.PROSODY_SPEC", "prosody-v0")
    assert VR.result_key(cfg["recipes"]["prosody-lr-sn"], data, cfg) != keys["prosody-lr-sn"]
    assert VR.result_key(cfg["recipes"]["meanstd-lr-sn"], data, cfg) == keys["meanstd-lr-sn"]


def test_recipe_results_are_cached(tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_cfg()
    data = fake_data(tmp_path)
    for c in data.clips[D.UEM] + data.clips[D.EMODB]:
        c.path.write_bytes(b"x")
    first = VR.evaluate("meanstd-lr", cfg["recipes"]["meanstd-lr"], data, cfg, tmp_path)
    monkeypatch.setattr(VR, "_evaluate", lambda *a: pytest.fail("refitted despite a cached result"))
    again = VR.evaluate("meanstd-lr", cfg["recipes"]["meanstd-lr"], data, cfg, tmp_path)
    np.testing.assert_array_equal(first.cv.y_pred, again.cv.y_pred)


# --------------------------------------------------------------------------- reports


def test_bootstrap_ci_brackets_the_score_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    y = rng.choice(LABELS, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.choice(LABELS, 300))
    lo, hi = M.bootstrap_ci(y, pred, n_boot=200, seed=1)
    assert lo < M.macro_f1(y, pred) < hi and hi - lo < 0.2
    assert (lo, hi) == M.bootstrap_ci(y, pred, n_boot=200, seed=1)
    assert M.bootstrap_ci(y, y, n_boot=50) == (1.0, 1.0)


def test_write_report_keeps_the_rows_of_recipes_not_rerun(tmp_path: Path) -> None:
    """A run of some recipes rewrites their rows and keeps the others' (matched by column name, in the given order)."""
    y = np.array(LABELS * 5)
    folds = np.arange(len(y)) % 2

    def result(name: str, extras: dict) -> R.RecipeResult:
        return R.RecipeResult(name, f"recipe {name}", R.Predictions(y, np.roll(y, len(name)), folds), extras=extras)

    out = tmp_path / "t.md"
    R.write_report([result("a", {"old col": "7"}), result("b", {"old col": "8"})], out, "T", n_boot=20)
    kept = R.read_table(out)
    assert set(kept) == {"a", "b"} and kept["a"]["old col"] == "7" and kept["a"]["what"] == "recipe a"
    new_b = result("bb", {"new col": "9"})
    R.write_report([new_b], out, "T", n_boot=20, kept={"a": kept["a"]}, order=["a", "bb"])
    table = R.read_table(out)
    assert list(table) == ["a", "bb"]
    assert table["a"] == {**kept["a"], "new col": "–"}
    assert table["bb"]["old col"] == "–" and table["bb"]["new col"] == "9"
    md = out.read_text(encoding="utf-8")
    assert "| CV acc | new col | old col | confusion |" in md  # a new column after its left neighbour
    assert "- `a`: [classification report](t/a_report.txt)" in md and "- `bb`:" in md


def test_write_report_table_png_and_predictions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.array(LABELS * 10)
    pred_a = np.where(rng.random(len(y)) < 0.8, y, "neutral")
    folds = np.arange(len(y)) % 3
    results = [
        R.RecipeResult(
            "a",
            "recipe a",
            R.Predictions(y, pred_a, folds),
            R.Predictions(y[:12], y[:12], np.zeros(12)),
            {"cost": "1 ms"},
        ),
        R.RecipeResult("b/c", "recipe b", R.Predictions(y, np.roll(y, 1), folds)),
    ]
    out = R.write_report(results, tmp_path / "docs" / "t.md", "T", intro="intro", notes="notes", n_boot=50)
    md = out.read_text(encoding="utf-8")
    assert "| `a` | recipe a |" in md and "| `b/c` | recipe b |" in md and "1 ms" in md and "–" in md
    folder = tmp_path / "docs" / "t"
    png = (folder / "a_cv.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "b_c_cv.png").is_file() and "precision" in (folder / "a_report.txt").read_text()
    back = R.read_predictions(folder / "a_cv.csv")
    np.testing.assert_array_equal(back.y_pred, pred_a)
    assert R.main([str(folder / "a_cv.csv"), "--out", str(tmp_path / "again.md"), "--n-boot", "20"]) == 0
    with pytest.raises(ValueError, match="unknown labels"):
        R.Predictions(np.array(["happy"]), np.array(["joy"]), np.array([0]))


# --------------------------------------------------------------------------- real data (skipped without it)


def test_tiny_real_run_writes_the_table(tmp_path: Path) -> None:
    for name in (D.UEM, D.EMODB):
        if not (D.data_dir() / name).is_dir():
            pytest.skip(f"{name} not found under {D.data_dir()} (set EMOTION_DATA_DIR); generated fixtures above")
    cfg = tiny_cfg()
    cfg_path = tmp_path / "voice.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    out = tmp_path / "voice.md"
    args = ["--config", str(cfg_path), "--limit", "12", "--recipes", "meanstd-lr", "attn-stats", "--no-cost"]
    assert VC.main([*args, "--out", str(out), "--refit"]) == 0
    md = out.read_text(encoding="utf-8")
    assert "`attn-stats`" in md and "label surprise" in md  # skipped labels are reported with their counts
    assert (tmp_path / "voice" / "attn-stats_cv.png").is_file()


def test_fit_final_builds_a_shippable_ensemble(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    model, info = VS.fit_final("ens-lr+attn+aug", cfg, fake_data(tmp_path))
    head = model.head
    assert info["encoder_window_s"] == 10.0 and [m["recipe_name"] for m in info["members"]] == [
        "meanstd-lr",
        "attn+aug",
    ]
    path = tmp_path / "voice_head.npz"
    head.save(path)
    frames = np.random.default_rng(0).normal(size=(30, E)).astype(np.float32)
    np.testing.assert_allclose(load_voice_head(path).predict_frames(frames), head.predict_frames(frames), atol=1e-6)
    assert model.norm is None and model.prosody is None  # raw frames: no stream normalisation, no prosody
    with pytest.raises(ValueError, match="cannot be shipped"):
        VS.fit_final("mfcc-mlp", cfg, fake_data(tmp_path))


def test_fit_final_of_a_stream_norm_recipe_writes_its_normalisation(tmp_path: Path) -> None:
    """An `-sn` ensemble refitted on speaker-normalised frames, and the runtime's `StreamNorm` in its file: the prior
    is the raw clean training frames' global mean / variance (every frame alike), n0 and std from the config."""
    from streamer.adaptation import FrameMoments, StreamNorm
    from streamer.voice_heads import EnsembleHead

    cfg = tiny_cfg()
    data = fake_data(tmp_path)
    model, info = VS.fit_final("ens-lr+attn+aug-sn", cfg, data)
    head, norm = model.head, model.norm
    assert isinstance(head, EnsembleHead) and isinstance(norm, StreamNorm) and model.prosody is None
    assert norm.n0 == CONFIG["stream_norm"]["n0"] == 5 and norm.std and norm.mean.shape == norm.var.shape == (E,)
    raw = np.concatenate([np.asarray(s, np.float64) for n in (D.UEM, D.EMODB) for s in data.frames(n, VI.RECOGNITION)])
    np.testing.assert_allclose(norm.mean, raw.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(norm.var, raw.var(axis=0), rtol=1e-6)
    assert info["stream_norm"]["n0"] == 5 and info["stream_norm"]["prior_frames"] == len(raw)
    assert all("stream_norm" in m for m in info["members"])
    # the members learned on each speaker's own normalised frames: the attention head's standardiser is ~ (0, 1)
    attn = next(m for m in head.members if not isinstance(m, LinearHead))
    assert np.abs(attn.mean).max() < 0.02 and np.abs(attn.scale - 1).max() < 0.02

    path = tmp_path / "voice_head.npz"
    model.save(path)
    back = StreamNorm.load(path)
    assert back is not None and back.n0 == 5 and back.std
    np.testing.assert_array_equal(back.mean, norm.mean)
    np.testing.assert_array_equal(back.var, norm.var)
    loaded = load_voice_head(path)
    frames = np.random.default_rng(0).normal(size=(30, E)).astype(np.float32)
    history = FrameMoments.of(frames[:10])
    np.testing.assert_allclose(
        loaded.predict_frames(back.apply(frames, history)), head.predict_frames(norm.apply(frames, history)), atol=1e-6
    )

    # every member normalised alike, or none: the runtime normalises the frames once, before all of them
    cfg["recipes"] = {**cfg["recipes"], "mixed": {"model": "ensemble", "members": ["meanstd-lr", "attn+aug-sn"]}}
    with pytest.raises(ValueError, match="differ in stream normalisation"):
        VS.fit_final("mixed", cfg, fake_data(tmp_path))


def test_nested_ensemble_is_flattened_with_weights(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    cfg["recipes"] = {
        **cfg["recipes"],
        "x2": {"model": "ensemble", "members": ["attn+aug", "attn-uem"]},
        "top": {"model": "ensemble", "members": ["meanstd-lr", "x2"]},
    }
    head = VS.fit_final("top", cfg, fake_data(tmp_path))[0].head
    assert [type(m).__name__ for m in head.members] == ["LinearHead", "AttentionHead", "AttentionHead"]
    assert head.weights == (0.5, 0.25, 0.25)
    path = tmp_path / "v.npz"
    head.save(path)
    frames = np.random.default_rng(0).normal(size=(30, E)).astype(np.float32)
    expected = sum(w * m.predict_frames(frames) for w, m in zip(head.weights, head.members, strict=True))
    np.testing.assert_allclose(load_voice_head(path).predict_frames(frames), expected, atol=1e-6)


PROSODY_LATE = "lr+attn+prosody-nodur-sn"  # the shipped late fusion in small: one attention head instead of three
CUT_DEPENDENT = {"voiced_rate", "active_ratio", "log_active_s"}


def prosody_cfg() -> dict:
    cfg = tiny_cfg()
    late = {"model": "ensemble", "members": ["meanstd-lr-sn", "attn+aug-sn", "prosody-nodur-lr-sn"]}
    cfg["recipes"] = {**cfg["recipes"], PROSODY_LATE: late}
    return cfg


def test_fit_final_of_a_late_prosody_fusion_writes_what_the_runtime_reads(tmp_path: Path) -> None:
    """The shipped kind of recipe: an LR and attention on stream-normalised frames plus an LR on stream-normalised
    prosody, a third each. The file carries the frames' and the prosody's normalisation and the prosody columns;
    loaded back it predicts as fitted, and the prosody moves the probabilities."""
    from streamer.adaptation import StreamHistory
    from streamer.prosody import PROSODY_NAMES
    from streamer.voice_heads import VoiceModel

    cfg = prosody_cfg()
    data = fake_data(tmp_path)
    model, info = VS.fit_final(PROSODY_LATE, cfg, data)
    head, reader = model.head, model.prosody
    assert [m.inputs if isinstance(m, LinearHead) else "attention" for m in head.members] == [
        "frames",
        "attention",
        "prosody",
    ]
    assert head.weights == pytest.approx((1 / 3, 1 / 3, 1 / 3)) and head.reads_prosody and model.adapts
    assert reader.names == tuple(n for n in PROSODY_NAMES if n not in CUT_DEPENDENT)
    assert head.members[2].coef.shape == (6, len(reader.names))
    # the prosody prior: the raw training vectors' global mean / variance (UEM and EmoDB, the head's columns)
    raw = np.concatenate([data.prosody(n) for n in (D.UEM, D.EMODB)])[:, reader.columns].astype(np.float64)
    np.testing.assert_allclose(reader.norm.mean, raw.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(reader.norm.var, raw.var(axis=0), rtol=1e-6)
    assert reader.norm.n0 == CONFIG["stream_norm"]["n0"] and info["prosody"]["names"] == list(reader.names)
    assert info["inputs"] == "frames+prosody" and info["prosody_norm"]["prior_rows"] == len(raw)

    path = tmp_path / "voice_head.npz"
    model.save(path)
    back = VoiceModel.load(path)
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(30, E)).astype(np.float32)
    calm, tense = raw[0].astype(np.float32), (raw[0] + 3 * np.sqrt(raw.var(axis=0))).astype(np.float32)
    history = StreamHistory().add(frames[:10], raw[1]).add(frames[10:], raw[2])
    for past in (None, history):
        np.testing.assert_allclose(back.predict(frames, past, calm), model.predict(frames, past, calm), atol=1e-6)
    assert not np.allclose(back.predict(frames, history, calm), back.predict(frames, history, tense), atol=1e-3)
    # the same prosody vector reads differently after a stream's own past: it is normalised by it
    assert not np.allclose(back.predict(frames, None, calm), back.predict(frames, StreamHistory().add(frames, calm)))


def test_fit_final_of_frames_and_prosody_in_one_lr(tmp_path: Path) -> None:
    """`meanstd+prosody-nodur-lr-sn`: one LR over the pooled frames and then the prosody columns."""
    model, _ = VS.fit_final("meanstd+prosody-nodur-lr-sn", tiny_cfg(), fake_data(tmp_path))
    assert isinstance(model.head, LinearHead) and model.head.inputs == "frames+prosody"
    assert model.head.coef.shape == (6, 2 * E + 12) and len(model.prosody.names) == 12 and model.norm is not None
    frames = np.random.default_rng(0).normal(size=(30, E)).astype(np.float32)
    row = np.concatenate([voice_features(model.norm.apply(frames, None)), model.prosody.normalise(np.ones(12), None)])
    np.testing.assert_allclose(model.predict(frames, None, np.ones(12)), model.head.predict_proba(row)[0], atol=1e-6)


def test_members_must_agree_on_the_prosody_they_read(tmp_path: Path) -> None:
    cfg = prosody_cfg()
    cfg["recipes"] = {
        **cfg["recipes"],
        "two-prosodies": {"model": "ensemble", "members": ["prosody-lr-sn", "prosody-nodur-lr-sn"]},
    }
    with pytest.raises(ValueError, match="differ in prosody"):
        VS.fit_final("two-prosodies", cfg, fake_data(tmp_path))


def test_pipeline_prosody_normalisation_equals_the_runtimes(tmp_path: Path) -> None:
    """The prosody a `-sn` recipe is scored on (each test speaker one stream, causal order) is what the runtime
    computes: the shipped `ProsodyReader` normalising each utterance's vector by the `StreamHistories` of the stream's
    earlier final utterances."""
    from streamer.adaptation import StreamHistories, StreamHistory

    cfg = tiny_cfg()
    data = fake_data(tmp_path)
    rc = cfg["recipes"]["prosody-nodur-lr-sn"]
    reader = VS.fit_final("prosody-nodur-lr-sn", cfg, data)[0].prosody  # prior: all training vectors
    inp = VI.recipe_inputs(rc, data, cfg)
    side = VN.stream_sides(inp, rc, data, cfg)["prosody"]
    test = np.arange(len(inp.ev))
    speakers = side.ev_groups[test]
    histories = VN.stream_histories(speakers, side.y_ev[test], VN.CAUSAL, np.random.default_rng(3))
    norm = reader.norm
    pipeline = VN._rows(side.testing(test, histories, (norm.mean, norm.var), norm.n0))
    raw = data.prosody(D.UEM)[:, reader.columns]
    runtime = StreamHistories()
    frames = np.zeros((2, E), np.float32)
    for i in sorted(test, key=lambda i: len(histories[i])):  # each stream's utterances in its order
        got = reader.normalise(raw[i], (runtime.get(speakers[i]) or StreamHistory()).prosody)
        np.testing.assert_allclose(pipeline[i], got, rtol=2e-3, atol=2e-3)  # the pipeline's: float16
        runtime.remember(speakers[i], frames, raw[i])
    assert runtime.get(speakers[0]).prosody.utterances == np.sum(speakers == speakers[0])


def test_a_shipped_head_file_is_byte_for_byte_reproducible(tmp_path: Path) -> None:
    """Fitting and saving the same recipe twice gives the same bytes (fixed zip timestamps; np.savez stamps the
    time), so a reshipped head has the same SHA-256."""
    import hashlib
    import zipfile

    cfg = prosody_cfg()
    digests = []
    for run in ("a", "b"):
        path = tmp_path / f"{run}.npz"
        VS.fit_final(PROSODY_LATE, cfg, fake_data(tmp_path))[0].save(path)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
        with zipfile.ZipFile(path) as z:
            assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert digests[0] == digests[1]


def test_calibrating_a_stream_normalised_head_keeps_its_normalisation(tmp_path: Path, monkeypatch) -> None:
    """`pipelines.train.heads --calibrate-voice` rewrites the head file with its temperature: the `norm.*` and
    `prosody.*` arrays stay, and the temperature is fitted on the causal-history predictions, also scored on the
    mostly-neutral histories."""
    import dataclasses

    from pipelines.train import heads as T
    from streamer.adaptation import StreamNorm
    from streamer.prosody import ProsodyReader

    name = PROSODY_LATE
    cfg = {**prosody_cfg(), "ship": name}
    config = tmp_path / "voice.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    model = VS.fit_final(name, cfg, fake_data(tmp_path))[0]
    norm = model.norm
    head = dataclasses.replace(model.head, meta={"id": "x", "recipe": {"name": name}, "limit": None})
    path = tmp_path / "voice_head.npz"
    dataclasses.replace(model, head=head).save(path)
    data = fake_data(tmp_path)
    monkeypatch.setattr(VI, "VoiceData", lambda *a: data)
    T.calibrate_voice(config, path, None, None)
    back, calibrated = StreamNorm.load(path), load_voice_head(path)
    assert back is not None and back.n0 == norm.n0
    np.testing.assert_array_equal(back.mean, norm.mean)
    prosody = ProsodyReader.load(path)
    assert prosody.names == model.prosody.names
    np.testing.assert_array_equal(prosody.norm.var, model.prosody.norm.var)
    calib = calibrated.meta["calibration"]
    assert calibrated.temperature == calib["temperature"] > 0 and "causal" in calib["fitted_on"]
    assert "cv, mostly-neutral history" in calib and "heldout test1+test2" in calib
