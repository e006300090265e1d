"""The training pipeline: data readers, grouped folds, a tiny training run, and the shipped heads.

Tests marked with real data read `$EMOTION_DATA_DIR` (default `<repo>/../shared/data`) and skip, saying where
they looked, when it is absent. Reader behaviour on bad rows is also checked on small generated fixtures.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipelines.data import corpora as D
from streamer.frames import LABELS, SAMPLE_RATE, Utterance
from streamer.heads import LinearHead, voice_features
from streamer.models import TEXT_HEAD, VOICE_HEAD
from streamer.voice_heads import load_voice_head
from streamer.words import TEXT_ENCODERS

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "train" / "heads.yaml"


def require(name: str) -> Path:
    folder = D.data_dir() / name
    if not folder.is_dir():
        pytest.skip(f"dataset {name} not found at {folder} (set EMOTION_DATA_DIR)")
    return folder


def macro_f1(y_true, y_pred) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro"))


@pytest.fixture(scope="module")
def recogniser():
    from streamer.recogniser import Recogniser, RecogniserOptions

    return Recogniser(RecogniserOptions())


# --------------------------------------------------------------------------- generated fixtures


def _tone(path: Path, seconds: float = 0.5, rate: int = SAMPLE_RATE) -> None:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)


@pytest.fixture
def fake_data(tmp_path: Path) -> Path:
    uem = tmp_path / D.UEM
    (uem / "data").mkdir(parents=True)
    _tone(uem / "data" / "Ira_1.flac")
    _tone(uem / "data" / "Sorpresa_1.flac")
    (uem / "data" / "Empty_1.flac").write_bytes(b"")
    (uem / "manifest.csv").write_text(
        "path,label_es,label,speaker,orig_split\n"
        "data/Ira_1.flac,Ira,anger,spk00,train\n"
        "data/Sorpresa_1.flac,Sorpresa,surprise,spk00,train\n"
        "data/Missing_1.flac,Miedo,fear,spk01,train\n"
        "data/Empty_1.flac,Miedo,fear,spk01,train\n"
        "data/Ira_1.flac,Ira,joy,spk00,train\n"
        "data/Ira_1.flac,Gozo,gozo,spk00,train\n"
    )
    emodb = tmp_path / D.EMODB
    (emodb / "wav").mkdir(parents=True)
    _tone(emodb / "wav" / "03a01Wa.flac", rate=22_050)
    _tone(emodb / "wav" / "03a01La.flac", rate=22_050)
    (emodb / "manifest.csv").write_text(
        "path,speaker,code,label\nwav/03a01Wa.flac,3,W,anger\nwav/03a01La.flac,3,L,boredom\n"
    )
    text = tmp_path / D.EMOSPEECH
    text.mkdir()
    (text / "train.csv").write_text(
        "id,label,transcription,youtube_key,gender\n"
        'a,joy,"¡Qué  bien!",v1,female\n'
        "b,sadness,   ,v1,male\n"
        "c,surprise,Vaya,v2,male\n"
        "d,anger,Basta ya,,male\n"
    )
    (text / "extra.csv").write_text("id,label,transcription,youtube_key,gender\ne,fear,Tengo miedo,v3,female\n")
    return tmp_path


def test_missing_dataset_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(D.DataError, match=str(tmp_path / D.UEM)):
        D.read_uem(tmp_path)
    with pytest.raises(D.DataError, match="EMOTION_DATA_DIR"):
        D.read_emospeech(tmp_path)


def test_data_dir_follows_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMOTION_DATA_DIR", str(tmp_path))
    assert D.data_dir() == tmp_path
    monkeypatch.delenv("EMOTION_DATA_DIR")
    assert D.data_dir() == (REPO.parent / "shared" / "data").resolve()


def test_readers_skip_bad_rows_with_counts_and_warnings(fake_data: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    uem = D.read_uem(fake_data)
    assert [(c.label, c.speaker, c.path.name) for c in uem.records] == [("anger", "spk00", "Ira_1.flac")]
    assert uem.skipped == Counter(
        {"label surprise": 1, "missing audio": 2, "label disagrees with file name": 1, "unknown label 'gozo'": 1}
    )
    assert "speech_es_uem: kept 1 records" in caplog.text

    emodb = D.read_emodb(fake_data)
    assert [(c.label, c.speaker) for c in emodb.records] == [("anger", "emodb03")]
    assert emodb.skipped == Counter({"label boredom": 1})

    text = D.read_emospeech(fake_data)
    assert [(r.id, r.label, r.text, r.source) for r in text.records] == [
        ("a", "joy", "¡Qué bien!", "train"),
        ("e", "fear", "Tengo miedo", "extra"),
    ]
    assert text.skipped == Counter({"empty text": 1, "unknown label 'surprise'": 1, "no youtube_key": 1})
    assert [r.id for r in D.read_emospeech(fake_data, include_extra=False).records] == ["a"]


def test_unreadable_audio_is_skipped_not_fatal(fake_data: Path, tmp_path: Path, caplog) -> None:
    from pipelines.data.features import VoiceFeaturizer

    bad = fake_data / D.UEM / "data" / "Ira_2.flac"
    bad.write_bytes(b"this is not audio at all")
    clips = [*D.read_uem(fake_data).records, D.SpeechClip(D.UEM, bad, "anger", "spk00", "train")]
    caplog.set_level(logging.WARNING)
    X, kept = VoiceFeaturizer(tmp_path / "cache").many(clips, "fixture")
    assert X.shape == (1, 1024) and [c.path.name for c in kept] == ["Ira_1.flac"]
    assert "skipped unreadable audio" in caplog.text


def test_grouped_folds_keep_groups_apart() -> None:
    rng = np.random.default_rng(1)
    groups = np.array([f"g{i % 13}" for i in range(400)])
    labels = rng.choice(LABELS, size=400)
    folds = D.grouped_folds(labels, groups, 5, seed=0)
    assert len(folds) == 5
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(400))
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
    assert [t.tolist() for _, t in folds] == [t.tolist() for _, t in D.grouped_folds(labels, groups, 5, seed=0)]


def test_limit_records_covers_every_label() -> None:
    rows = [D.TextRow(D.EMOSPEECH, str(i), LABELS[min(i // 50, 5)], "x", "v", "train") for i in range(300)]
    subset = D.limit_records(rows, 12, seed=0)
    assert len(subset) == 12 and Counter(r.label for r in subset) == dict.fromkeys(LABELS, 2)
    assert subset == D.limit_records(rows, 12, seed=0)
    assert D.limit_records(rows, None, seed=0) == rows


# --------------------------------------------------------------------------- real data


def test_uem_manifest() -> None:
    require(D.UEM)
    uem = D.read_uem()
    assert len(uem) == 1131 and uem.skipped == Counter({"label surprise": 190})
    assert uem.label_counts() == {"anger": 188, "disgust": 191, "fear": 191, "joy": 186, "neutral": 183, "sadness": 192}
    assert len({c.speaker for c in uem.records}) == 16
    held = {c.speaker for c in uem.records if c.split == "test_unseen_speaker"}
    assert held == {"test1", "test2"}
    assert all(c.path.is_file() for c in uem.records)


def test_emodb_manifest_maps_codes() -> None:
    require(D.EMODB)
    emodb = D.read_emodb()
    assert len(emodb) == 454 and emodb.skipped == Counter({"label boredom": 81})
    assert emodb.label_counts() == {"anger": 127, "disgust": 46, "fear": 69, "joy": 71, "neutral": 79, "sadness": 62}
    for clip in emodb.records:  # the 6th character of the file name is the emotion code
        assert D.EMODB_CODES[clip.path.stem[5]] == clip.label


def test_emospeech_text() -> None:
    require(D.EMOSPEECH)
    text = D.read_emospeech()
    assert len(text) == 4379 and not text.skipped
    assert Counter(r.source for r in text.records) == {"train": 3000, "extra": 1379}
    assert text.label_counts() == {
        "anger": 568,
        "disgust": 1023,
        "fear": 31,
        "joy": 553,
        "neutral": 1708,
        "sadness": 496,
    }
    assert len(D.read_emospeech(include_extra=False)) == 3000


def test_real_folds_never_share_a_speaker_or_video() -> None:
    require(D.UEM)
    require(D.EMOSPEECH)
    uem = D.read_uem().records
    speakers = np.array([c.speaker for c in uem])
    folds = D.grouped_folds([c.label for c in uem], speakers, 8, seed=0)
    assert len(folds) == 8
    for train, test in folds:
        assert not set(speakers[train]) & set(speakers[test])
        assert len(set(speakers[test])) == 2
    rows = D.read_emospeech().records
    videos = np.array([r.youtube_key for r in rows])
    for train, test in D.grouped_folds([r.label for r in rows], videos, 5, seed=0):
        assert not set(videos[train]) & set(videos[test])
        assert "fear" in {rows[i].label for i in test}


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_tiny_training_run_writes_loadable_heads(tmp_path: Path, capsys) -> None:
    for name in (D.UEM, D.EMODB, D.EMOSPEECH):
        require(name)
    from pipelines.train.heads import main

    out = tmp_path / "models"
    args = ["--config", str(CONFIG), "--out", str(out), "--limit", "24", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--report", str(tmp_path / "report.json")]) == 0
    table = capsys.readouterr().out
    assert "grouped CV" in table and "held-out speakers" in table

    rng = np.random.default_rng(0)
    text_dim = sum(TEXT_ENCODERS[e].dim for e in LinearHead.load(out / "text_head.npz").meta["encoders"])
    for filename, dim, kind in (("voice_head.npz", 1024, "voice"), ("text_head.npz", text_dim, "text")):
        head = LinearHead.load(out / filename)
        assert head.labels == LABELS and head.coef.shape == (6, dim) and head.mean.shape == (dim,)
        p = head.predict_proba(rng.normal(size=(5, dim)).astype(np.float32))
        assert p.shape == (5, 6) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5) and (p >= 0).all()
        assert head.meta["head"] == kind and head.meta["limit"] == 24 and "cv" in head.meta
        assert head.meta["train_label_counts"] and min(head.meta["train_label_counts"].values()) > 0
    text = LinearHead.load(out / "text_head.npz")
    assert "cv_bias" in text.meta["cv"] and len(text.meta["bias_offsets"]) == 6  # bias_tuning in the recipe
    assert {t["variant"].split()[-1] for t in text.meta["variants_tried"]} == {"e5", "e5+use"}
    voice = LinearHead.load(out / "voice_head.npz")
    assert voice.meta["encoder_window_s"] == 10.0 and voice.meta["id"].startswith("voice-uem")
    assert set(voice.meta["cv"]) == {"cv", "heldout"}

    # a rerun reads the feature cache and gives the same head
    out2 = tmp_path / "again"
    assert (
        main(["--config", str(CONFIG), "--out", str(out2), "--limit", "24", "--cache-dir", str(tmp_path / "cache")])
        == 0
    )
    again = LinearHead.load(out2 / "voice_head.npz")
    assert np.array_equal(again.coef, voice.coef) and again.meta == voice.meta


@pytest.mark.slow
def test_tiny_text_recipes_run_writes_the_table(tmp_path: Path) -> None:
    """Every recipe of `pipelines.train.text` (embeddings, TF-IDF, averages, EmoEvent, nested bias) on 60 rows."""
    for name in (D.EMOSPEECH, D.EMOEVENT):
        require(name)
    from pipelines.train.text import main

    out = tmp_path / "recipes.md"
    args = ["--limit", "60", "--quick", "--folds", "3", "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    md = out.read_text()
    for recipe in (
        "e5",
        "use",
        "e5+use",
        "tfidf",
        "avg(e5,use,tfidf)",
        "e5+emoevent",
        "tfidf+emoevent",
        "e5+bias",
        "avg(e5,use)+bias",
    ):
        assert f"| `{recipe}` |" in md
    assert "--limit 60" in md


def test_bias_tuning_raises_macro_f1_on_a_skewed_model() -> None:
    from pipelines.train.linear import apply_bias, tune_bias

    rng = np.random.default_rng(0)
    y = np.array(LABELS)[rng.integers(0, 6, 600)]
    logits = np.eye(6)[[LABELS.index(v) for v in y]] * 1.5 + rng.normal(size=(600, 6))
    logits[:, LABELS.index("neutral")] += 2.0  # a model that over-predicts neutral
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    b = tune_bias(p, y)
    assert b.shape == (6,) and abs(b.sum()) < 1e-9 and b[LABELS.index("neutral")] < 0
    before = macro_f1(y, np.array(LABELS)[p.argmax(axis=1)])
    after = macro_f1(y, np.array(LABELS)[apply_bias(p, b).argmax(axis=1)])
    assert after > before + 0.1
    np.testing.assert_allclose(apply_bias(p, b).sum(axis=1), 1.0)


def test_emoevent_reader_maps_others_and_drops_surprise(tmp_path: Path) -> None:
    folder = tmp_path / D.EMOEVENT
    folder.mkdir()
    (folder / "emoevent_es.csv").write_text(
        "id\ttweet\temotion\toffensive\n"
        '1\tUSER qué "alegría" HASHTAG... URL\tjoy\t0\n'
        "2\tNo me lo esperaba\tsurprise\t0\n"
        "3\tHoy hay partido\tothers\t0\n"
        "4\tUSER URL\tanger\t0\n",
        encoding="utf-8",
    )
    loaded = D.read_emoevent(tmp_path)
    assert [(r.label, r.text, r.source) for r in loaded.records] == [
        ("joy", 'qué "alegría" ...', "emoevent"),
        ("neutral", "Hoy hay partido", "emoevent"),
    ]
    assert loaded.skipped == Counter({"label surprise": 1, "empty text": 1})


# --------------------------------------------------------------------------- shipped heads


def test_shipped_heads_load_with_the_right_shapes() -> None:
    from streamer.recogniser import RecogniserOptions

    text_dim = sum(TEXT_ENCODERS[e].dim for e in LinearHead.load(TEXT_HEAD).meta.get("encoders", ["e5"]))
    assert TEXT_HEAD.is_file(), f"{TEXT_HEAD} missing: run python -m pipelines.train.heads --config {CONFIG}"
    assert TEXT_HEAD.stat().st_size < 500_000
    head = LinearHead.load(TEXT_HEAD)
    assert head.coef.shape == (6, text_dim) and head.mean.shape == head.scale.shape == (text_dim,)
    assert head.intercept.shape == (6,) and (head.scale > 0).all()
    # the voice head: a LinearHead (pipelines.train.heads) or an attention/ensemble head (pipelines.train.voice --ship)
    assert VOICE_HEAD.is_file() and VOICE_HEAD.stat().st_size < 3_000_000
    voice = load_voice_head(VOICE_HEAD)
    p = voice.predict_frames(np.random.default_rng(0).normal(size=(120, 512)).astype(np.float32))
    assert p.shape == (6,) and abs(p.sum() - 1) < 1e-5
    # the voice branch's own pass is unpadded; a head on recognition's frames reads the runtime's window
    window = 0.0 if voice.meta.get("encoder_layers") else RecogniserOptions().encoder_window_s
    assert voice.meta["encoder_window_s"] == window
    for h in (head, voice):
        assert h.meta["limit"] is None, "shipped head comes from a --limit run"
        assert h.meta["cv"]["cv"]["macro_f1_mean"] > 0.4


@pytest.mark.slow
def test_shipped_voice_head_on_real_clips(recogniser) -> None:
    """Runtime path (Recogniser.recognise → the frames the head reads → voice head) on speaker test1's clips.

    The shipped head was refitted on all 16 UEM speakers, so this is a check that runtime features match the
    training features (a window or pooling mismatch falls towards chance), not a generalisation estimate:
    those are the grouped-CV figures in the head's meta.
    """
    require(D.UEM)
    from pipelines.data.features import VoiceFeaturizer
    from streamer.adaptation import StreamHistory
    from streamer.voice_heads import VoiceModel

    voice = VoiceModel.load(VOICE_HEAD)
    clips = [c for c in D.read_uem().records if c.speaker == "test1"]
    clips = D.limit_records(clips, 36, seed=0)
    from streamer.audio import load_audio

    # one speaker: one stream, its clips in order (a stream-normalised head reads them against the stream's past)
    feats, pred, history = [], [], StreamHistory()
    for clip in clips:
        a = load_audio(clip.path)
        frames = voice.frames_of(a, recogniser.recognise(Utterance.whole(a, "test")).encoder_frames)
        feats.append(voice_features(frames))
        prosody = voice.prosody_of(a)
        pred.append(LABELS[int(np.argmax(voice.predict(frames, history, prosody)))])
        history = history.add(frames, prosody)
    # CTranslate2's int8 kernels differ by CPU (AVX2 vs AVX-512 VNNI) and so do the frames a little: measured
    # 0.7+ on an AVX2 machine, 0.632 on an AVX-512 one. Chance is 0.17; a window or pooling mismatch falls to it.
    assert macro_f1([c.label for c in clips], pred) > 0.5

    # the training featurizer gives the runtime's features
    train_feat = VoiceFeaturizer(cache_dir=None, layers=voice.head.meta.get("encoder_layers")).one(clips[0].path)
    np.testing.assert_allclose(train_feat, feats[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_shipped_text_head_on_real_texts() -> None:
    """EmoSPeech rows (in the head's training data: a consistency check, the CV estimate is in the meta)."""
    require(D.EMOSPEECH)
    from streamer.words import TextModel

    rows = D.read_emospeech(include_extra=False).records[::15]
    p = TextModel.load(TEXT_HEAD, threads=2).predict_proba([r.text for r in rows])
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert macro_f1([r.label for r in rows], [LABELS[i] for i in p.argmax(axis=1)]) > 0.6
