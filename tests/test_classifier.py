"""Heads' softmax temperature, the expected calibration error, and the words head picked by the transcript's language.

Temperature and ECE are checked on made-up heads and distributions where the right answer is known; routing and
the English head on the shipped files with the real encoders.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pipelines.evaluate.metrics import expected_calibration_error
from streamer import models
from streamer.classifier import EmotionClassifier
from streamer.frames import LABELS, Transcript
from streamer.heads import LinearHead, softmax, temper
from streamer.models import TEXT_HEAD, TEXT_HEADS, VOICE_HEAD, ModelFileError
from streamer.voice_heads import AttentionHead, EnsembleHead, load_voice_head
from streamer.words import TextModel, WordsEnsembleHead, load_words_model
from tests.conftest import ANGRY_EN, ANGRY_ES, HAPPY_EN, HAPPY_ES

K = len(LABELS)
SAD_ES = "Estoy muy triste, hoy es un día muy malo para mí."


def linear_head(rng: np.random.Generator, dim: int = 4, temperature: float = 1.0, **meta) -> LinearHead:
    return LinearHead(
        LABELS, rng.random(dim), rng.random(dim) + 0.5, rng.normal(size=(K, dim)) * 3, rng.normal(size=K),
        {"id": "lin", **meta}, temperature,
    )  # fmt: skip


def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(p)).sum(axis=-1)


# --------------------------------------------------------------------------- temperature


def test_linear_head_temperature_is_saved_loaded_and_divides_the_logits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    head = linear_head(rng, temperature=2.5)
    head.save(tmp_path / "h.npz")
    loaded = LinearHead.load(tmp_path / "h.npz")
    assert loaded.temperature == 2.5
    x = rng.normal(size=(20, 4))
    logits = ((x - head.mean) / head.scale) @ head.coef.T + head.intercept
    np.testing.assert_allclose(loaded.predict_proba(x), softmax(logits / 2.5), atol=1e-5)
    cold = dataclasses.replace(loaded, temperature=1.0)
    # softer, same decisions
    assert (entropy(loaded.predict_proba(x)) > entropy(cold.predict_proba(x))).all()
    assert (loaded.predict_proba(x).argmax(axis=1) == cold.predict_proba(x).argmax(axis=1)).all()
    np.testing.assert_allclose(temper(cold.predict_proba(x), 2.5), loaded.predict_proba(x), atol=1e-9)


def test_head_files_without_temperature_load_at_one_and_bad_ones_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    head = linear_head(rng, temperature=3.0)
    old = {k: v for k, v in head.arrays().items() if k != "temperature"}  # a file written before calibration
    np.savez(tmp_path / "old.npz", **old)
    loaded = LinearHead.load(tmp_path / "old.npz")
    assert loaded.temperature == 1.0
    x = rng.normal(size=(3, 4))
    np.testing.assert_allclose(
        loaded.predict_proba(x), dataclasses.replace(head, temperature=1.0).predict_proba(x), rtol=1e-5, atol=1e-7
    )
    for bad in (0.0, -1.0, np.nan):
        np.savez(tmp_path / "bad.npz", **{**old, "temperature": np.array(bad)})
        with pytest.raises(ValueError, match="temperature"):
            LinearHead.load(tmp_path / "bad.npz")


def attention_head(rng: np.random.Generator, temperature: float = 1.0) -> AttentionHead:
    e, h = 8, 5
    return AttentionHead(
        LABELS, rng.normal(size=e), rng.random(e) + 0.5, rng.normal(size=e), rng.normal(size=(h, e)),
        rng.normal(size=h), rng.random(h) + 0.5, rng.normal(size=h), rng.normal(size=(K, h)) * 2, rng.normal(size=K),
        meta={"id": "attn"}, temperature=temperature,
    )  # fmt: skip


def test_attention_and_ensemble_heads_apply_their_temperature(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    frames = rng.normal(size=(30, 8)).astype(np.float32)
    attn = attention_head(rng)
    hot = dataclasses.replace(attn, temperature=0.5)
    hot.save(tmp_path / "a.npz")
    loaded = load_voice_head(tmp_path / "a.npz")
    assert isinstance(loaded, AttentionHead) and loaded.temperature == 0.5
    np.testing.assert_allclose(loaded.predict_frames(frames), temper(attn.predict_frames(frames), 0.5), atol=1e-6)
    assert entropy(loaded.predict_frames(frames)) < entropy(attn.predict_frames(frames))  # sharper

    members = (attn, attention_head(rng))
    ens = EnsembleHead(members, {"id": "ens"}, (0.25, 0.75), temperature=1.7)
    ens.save(tmp_path / "e.npz")
    loaded = load_voice_head(tmp_path / "e.npz")
    assert isinstance(loaded, EnsembleHead) and loaded.temperature == 1.7
    assert [m.temperature for m in loaded.members] == [1.0, 1.0]  # the ensemble's own, applied after the vote
    vote = 0.25 * members[0].predict_frames(frames) + 0.75 * members[1].predict_frames(frames)
    np.testing.assert_allclose(loaded.predict_frames(frames), temper(vote, 1.7), atol=1e-6)


def test_shipped_heads_carry_the_temperature_fitted_on_held_out_predictions() -> None:
    heads = [
        load_voice_head(VOICE_HEAD),
        LinearHead.load(TEXT_HEAD),
        *(WordsEnsembleHead.load(p) for p in TEXT_HEADS.values()),
    ]
    for head in heads:
        calib = head.meta["calibration"]
        assert head.temperature == calib["temperature"] > 0
        # a temperature far from 1 says the head was mis-calibrated: then calibration must have lowered the ECE
        # (cross-fitted: measured on rows the temperature was not fitted on); near 1 it must not raise it much
        if abs(np.log(head.temperature)) > 0.1:
            assert calib["ece15_after_crossfit"] < calib["ece15_before"], head.model_id
        assert calib["ece15_after_crossfit"] <= calib["ece15_before"] + 0.005, head.model_id


# --------------------------------------------------------------------------- ECE


def test_ece_on_known_cases() -> None:
    joy, sad = LABELS.index("joy"), LABELS.index("sadness")

    def sure(p_top: float, top: int) -> np.ndarray:
        p = np.full(K, (1 - p_top) / (K - 1))
        p[top] = p_top
        return p

    # confidence 0.8 and right 8 times out of 10: calibrated
    p = np.stack([sure(0.8, joy)] * 10)
    y = ["joy"] * 8 + ["sadness"] * 2
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-12)
    # always certain, right half the time: ECE 0.5
    p = np.stack([sure(1.0, joy)] * 4)
    assert expected_calibration_error(p, ["joy", "joy", "anger", "fear"]) == pytest.approx(0.5)
    # two bins: 0.9 (4 rows, 2 right → gap 0.4) and 0.5 (6 rows, 3 right → gap 0): (4/10)·0.4 = 0.16
    p = np.stack([sure(0.9, joy)] * 4 + [sure(0.5, sad)] * 6)
    y = ["joy", "joy", "anger", "anger", *["sadness"] * 3, *["fear"] * 3]
    assert expected_calibration_error(p, y) == pytest.approx(0.16)
    assert expected_calibration_error(np.zeros((0, K)), []) == 0.0


# --------------------------------------------------------------------------- routing by language


def constant_text_head(label: str, model_id: str, dim: int = 384) -> LinearHead:
    """A words head on e5 (384-d) that says `label` with probability ≈ 0.99 whatever the text."""
    intercept = np.zeros(K)
    intercept[LABELS.index(label)] = 6.0
    return LinearHead(LABELS, np.zeros(dim), np.ones(dim), np.zeros((K, dim)), intercept, {"id": model_id})


def transcript(text: str, language: str) -> Transcript:
    frames = np.random.default_rng(0).normal(size=(60, 512)).astype(np.float32)
    return Transcript(text, language, 1.0, 0.0, -0.2, 1.2, None, frames, 0.0, 0.0)


@pytest.mark.slow
def test_the_words_head_follows_the_transcript_language(tmp_path: Path) -> None:
    constant_text_head("sadness", "es-head").save(tmp_path / "es.npz")
    constant_text_head("joy", "en-head").save(tmp_path / "en.npz")
    clf = EmotionClassifier(text_heads={"en": tmp_path / "en.npz"}, default_text_head=tmp_path / "es.npz")
    assert clf.text_models["en"].encoders == clf.text_model.encoders  # one e5 for both heads
    said = {lang: clf.classify(transcript("hola, hello", lang)).text_scores for lang in ("en", "es", "de", "")}
    assert max(said["en"], key=said["en"].get) == "joy"
    for lang in ("es", "de", ""):  # Spanish and every language without its own head: the default head
        assert max(said[lang], key=said[lang].get) == "sadness"
    assert "text:en-head" in clf.model_id_for("en") and "es-head" not in clf.model_id_for("en")
    assert "text:es-head" in clf.model_id_for("fr")
    assert "text:es-head+text-en:en-head" in clf.model_id
    np.testing.assert_allclose(clf.classify_text(["x"], "en"), clf.text_models["en"].predict_proba(["x"]))
    np.testing.assert_allclose(clf.classify_text(["x"]), clf.text_model.predict_proba(["x"]))  # no language: default
    assert clf.classify(transcript("", "en")).text_scores is None  # no words, no words head


@pytest.mark.slow
def test_the_gate_reads_the_words_vote_before_its_temperature(tmp_path: Path) -> None:
    """A head whose own vote says sadness 0.7 (under the 0.8 gate) and whose temperature 0.5 sharpens that to 0.97:
    the published words scores are the sharpened ones, and the gate stays shut, so the voice alone decides."""
    head = constant_text_head("sadness", "sharp")
    head.intercept[LABELS.index("sadness")] = np.log(0.7 / 0.3 * (K - 1))  # softmax → 0.7 for sadness
    dataclasses.replace(head, temperature=0.5).save(tmp_path / "sharp.npz")
    clf = EmotionClassifier(default_text_head=tmp_path / "sharp.npz")
    e = clf.classify(transcript("hola", "es"))
    assert e.text_scores["sadness"] == pytest.approx(0.7**2 / (0.7**2 + (K - 1) * 0.06**2), abs=1e-3)
    assert e.scores == e.audio_scores and not e.incongruent


@pytest.mark.slow
def test_shipped_english_head_reads_anger_and_joy() -> None:
    model = load_words_model(TEXT_HEADS["en"])
    assert model.head.meta["languages"] == "en" and model.head.meta["limit"] is None
    p = model.predict_proba([ANGRY_EN, HAPPY_EN])
    assert p.shape == (2, K) and np.allclose(p.sum(axis=1), 1, atol=1e-6)
    assert LABELS[int(np.argmax(p[0]))] == "anger"
    assert LABELS[int(np.argmax(p[1]))] == "joy"


@pytest.mark.slow
def test_shipped_spanish_head_reads_anger_and_joy() -> None:
    p = TextModel.load(TEXT_HEAD).predict_proba([ANGRY_ES, HAPPY_ES])
    assert LABELS[int(np.argmax(p[0]))] == "anger"
    assert LABELS[int(np.argmax(p[1]))] == "joy"


@pytest.mark.slow
def test_shipped_classifier_routes_english_to_the_english_head() -> None:
    clf = EmotionClassifier()
    en_id, es_id = clf.text_models["en"].model_id, clf.text.model_id
    assert en_id != es_id and f"text-en:{en_id}" in clf.model_id
    angry = clf.classify(transcript(ANGRY_EN, "en"))
    np.testing.assert_allclose(
        [angry.text_scores[k] for k in LABELS], clf.text_models["en"].predict_proba([ANGRY_EN])[0], atol=1e-4
    )
    assert max(angry.text_scores, key=angry.text_scores.get) == "anger"
    assert f"text:{en_id}" in clf.model_id_for("en") and f"text:{es_id}" in clf.model_id_for("es")


# --------------------------------------------------------------------------- the voice head's prosody

SENTENCE_ES = "Buenos días, quiero consultar el estado de mi pedido."
CUT_DEPENDENT = {"voiced_rate", "active_ratio", "log_active_s"}  # depend on where the VAD cuts: not shipped


def test_the_shipped_voice_head_reads_the_utterances_prosody(speak) -> None:
    """The same frames with the prosody of two voices (espeak-ng's male and female variants of one sentence) give
    different probabilities: the shipped head reads prosody, normalised per stream, without the cut-dependent
    columns."""
    from streamer.voice_heads import VoiceModel

    model = VoiceModel.load(VOICE_HEAD)
    assert model.head.reads_prosody and model.prosody is not None and model.prosody.norm is not None
    assert model.norm is not None and model.adapts and model.model_id.endswith("-v5")
    assert not CUT_DEPENDENT & set(model.prosody.names) and len(model.prosody.names) == 12
    frames = np.random.default_rng(0).normal(size=(120, 512)).astype(np.float32)
    low, high = model.prosody_of(speak(SENTENCE_ES, "es")), model.prosody_of(speak(SENTENCE_ES, "es+f3"))
    assert low.shape == high.shape == (12,)
    p, q = model.predict(frames, None, low), model.predict(frames, None, high)
    for d in (p, q):
        assert d.shape == (K,) and abs(d.sum() - 1) < 1e-6
    assert np.abs(p - q).max() > 0.01


def test_a_linear_voice_head_reads_what_its_file_says(tmp_path: Path) -> None:
    """`inputs` is saved only when it is not the frames (files before v4 load as frames heads); a head that reads
    prosody needs its file's prosody block, and only such a head may have one."""
    from streamer.adaptation import StreamNorm
    from streamer.prosody import ProsodyReader
    from streamer.voice_heads import VoiceModel

    rng = np.random.default_rng(5)
    frames = rng.normal(size=(20, 4)).astype(np.float32)
    both = dataclasses.replace(linear_head(rng, dim=8 + 3), inputs="frames+prosody")
    both.save(tmp_path / "both.npz")
    loaded = load_voice_head(tmp_path / "both.npz")
    assert loaded.inputs == "frames+prosody" and loaded.reads_prosody
    prosody = np.array([1.0, -2.0, 0.5], np.float32)
    row = np.concatenate([frames.mean(axis=0), frames.std(axis=0), prosody])
    np.testing.assert_allclose(loaded.predict_frames(frames, prosody), both.predict_proba(row)[0], atol=1e-6)
    unknown = np.concatenate([row[:8], np.zeros(3)])  # no prosody given: the stream's average one
    np.testing.assert_allclose(loaded.predict_frames(frames), both.predict_proba(unknown)[0], atol=1e-6)
    linear_head(rng, dim=8).save(tmp_path / "frames.npz")
    with np.load(tmp_path / "frames.npz") as z:
        assert "inputs" not in z.files
    assert load_voice_head(tmp_path / "frames.npz").inputs == "frames"

    with pytest.raises(ValueError, match=r"prosody\.\* arrays"):
        VoiceModel.load(tmp_path / "both.npz")
    reader = ProsodyReader(("f0_mean", "energy_mean", "tilt"), StreamNorm(np.zeros(3), np.ones(3), n0=5.0))
    VoiceModel(loaded, None, reader).save(tmp_path / "both.npz")
    assert VoiceModel.load(tmp_path / "both.npz").prosody.names == reader.names
    VoiceModel(load_voice_head(tmp_path / "frames.npz"), None, reader).save(tmp_path / "frames.npz")
    with pytest.raises(ValueError, match=r"prosody\.\* arrays"):
        VoiceModel.load(tmp_path / "frames.npz")
    np.savez(tmp_path / "odd.npz", **{**both.arrays(), "inputs": np.array("spectrogram")})
    with pytest.raises(ValueError, match="unknown inputs"):
        load_voice_head(tmp_path / "odd.npz")


def test_sentence_encoder_files_are_verified(monkeypatch):
    """Both sentence encoders' weights match their pinned SHA-256 (USE is read by the shipped English head, so it is
    a run-time dependency); a changed file is refused."""
    models.e5_small_path()
    models.verify_use()
    monkeypatch.setitem(models.USE_SHA256, "weights.npz", "0" * 64)
    with pytest.raises(ModelFileError, match="SHA-256"):
        models.verify_use()


# --------------------------------------------------------------------------- the default words head: a soft vote

ODD_TEXTS = [
    "",
    " ",
    "\t\n",
    "a",
    "ab",
    "¡¡¡ NO !!!",
    "🙂" * 50,
    "Ты меня бесишь!",
    "我很生气",
    "İstanbul ÇOK güzel",
    "straße STRASSE",
    "hola    mundo\t\tadiós\n\nyo  ",
    "hola\u00a0mundo\u2028línea",
    "12 345 6_7 e\u0301 é",
    "ＡＢＣ ｆｕｌｌ",
    "x" * 5000,
    "no " * 1700,
]


@pytest.mark.parametrize(
    "analyzer, ngram_range", [("word", (1, 2)), ("word", (2, 3)), ("char_wb", (2, 5)), ("char_wb", (1, 1))]
)
def test_tfidf_terms_are_sklearns(analyzer: str, ngram_range: tuple[int, int]) -> None:
    """The runtime's n-grams equal sklearn's analyzer's, in order, on real and odd texts (whitespace runs,
    other scripts, letters whose lower case is longer, words shorter than n)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from streamer.words import tfidf_terms

    sk = TfidfVectorizer(analyzer=analyzer, ngram_range=ngram_range, lowercase=True).build_analyzer()
    for text in [ANGRY_ES, HAPPY_ES, ANGRY_EN, *ODD_TEXTS]:
        assert tfidf_terms(text, analyzer, ngram_range) == sk(text), text[:40]


def tfidf_member(rng: np.random.Generator, constant: str | None = None):
    from streamer.words import TfidfBlock, TfidfHead

    vocab = {t: j for j, t in enumerate(["muy", "contento", "harto", "muy contento"])}
    chars = {t: j for j, t in enumerate([" m", "mu", "uy", "y ", " h"])}
    blocks = (
        TfidfBlock("word", (1, 2), vocab, rng.random(4) + 1),
        TfidfBlock("char_wb", (2, 5), chars, rng.random(5) + 1),
    )
    coef = rng.normal(size=(K, 9)).astype(np.float32).astype(np.float64)
    intercept = rng.normal(size=K) if constant is None else np.where(np.array(LABELS) == constant, 5.0, 0.0)
    return TfidfHead(LABELS, blocks, coef, intercept, {"id": "tfidf"})


def test_words_ensemble_votes_with_its_weights_offsets_and_temperature(tmp_path: Path) -> None:
    from streamer.words import TfidfHead, WordsEnsemble

    rng = np.random.default_rng(0)
    a, b = tfidf_member(rng), tfidf_member(rng, constant="joy")
    offsets = rng.normal(size=K)
    head = WordsEnsembleHead((a, b), (0.25, 0.75), offsets, {"id": "ens"}, 1.7)
    head.save(tmp_path / "ens.npz")
    model = load_words_model(tmp_path / "ens.npz")
    assert isinstance(model, WordsEnsemble) and model.model_id == "ens" and model.encoders == []
    texts = ["Estoy muy contento", "harto", "", "🙂"]
    mean = 0.25 * a.predict_proba(texts) + 0.75 * b.predict_proba(texts)
    expected = softmax((np.log(mean) + offsets) / 1.7)
    np.testing.assert_allclose(model.predict_proba(texts), expected, atol=1e-12)
    np.testing.assert_allclose(model.head.members[0].coef, a.coef)  # float32 storage: exact for these
    assert (
        isinstance(model.head.members[1], TfidfHead)
        and model.head.members[1].blocks[1].vocabulary == b.blocks[1].vocabulary
    )
    # an empty text has no terms: the member says its intercept's softmax
    np.testing.assert_allclose(b.predict_proba([""])[0], softmax(b.intercept))
    with np.load(tmp_path / "ens.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    models.save_arrays(tmp_path / "bad.npz", {**arrays, "weights": np.array([0.5, 0.6])})
    with pytest.raises(ValueError, match=r"weights summing to 1\.1"):
        load_words_model(tmp_path / "bad.npz")
    models.save_arrays(tmp_path / "bad.npz", {**arrays, "m1.kind": np.array("bert")})
    with pytest.raises(ValueError, match="unknown member kind 'bert'"):
        load_words_model(tmp_path / "bad.npz")
    models.save_arrays(tmp_path / "bad.npz", {**arrays, "m0.b0.idf": np.ones(3)})
    with pytest.raises(ValueError, match="block 0 has 4 terms"):
        load_words_model(tmp_path / "bad.npz")


@pytest.mark.slow
def test_the_default_words_head_is_the_shipped_ensemble() -> None:
    """`classifier.words_head` defaults to `ensemble`: an LR on e5's layers 6, 9, 12 ⊕ USE and a TF-IDF LR
    soft-voted, USE shared with the English head; hard transcripts (empty, blank, 5,000 characters, emoji,
    other scripts) get a distribution each, and Spanish anger and joy still read as such. `frozen` is the single e5
    head."""
    from streamer.classifier import ClassifierOptions, valence_arousal
    from streamer.words import TfidfHead, WordsEnsemble

    assert ClassifierOptions().words_head == models.DEFAULT_WORDS_HEAD == "ensemble"
    clf = EmotionClassifier()
    model = clf.text_model
    assert isinstance(model, WordsEnsemble) and models.TEXT_HEAD_ENSEMBLE.stat().st_size <= 5_000_000
    assert model.encoder_names == ("e5layers", "use") and any(isinstance(m, TfidfHead) for m in model.head.members)
    assert clf.text_models["en"].encoder_names == ("e5layers-en", "use")  # its own fine-tuned e5
    assert clf.text_models["en"].encoders[1] is model.encoders[1]  # USE loaded once for both
    assert f"text:{model.model_id}" in clf.model_id and model.head.meta["limit"] is None
    texts = [ANGRY_ES, HAPPY_ES, *ODD_TEXTS]
    p = clf.classify_text(texts, "es")
    assert p.shape == (len(texts), K) and np.isfinite(p).all() and np.allclose(p.sum(axis=1), 1, atol=1e-9)
    # the complaint reads as negative, anger among the top two (sadness 0.48, anger 0.39: the single e5 head said
    # anger 0.41 first); joy is joy
    assert "anger" in [LABELS[i] for i in np.argsort(p[0])[-2:]] and valence_arousal(p[0])[0] < -0.3
    assert LABELS[int(p[1].argmax())] == "joy"
    complaint, sad = clf.classify_text(["Estoy muy enfadado con este servicio, es una vergüenza.", SAD_ES])
    assert LABELS[int(complaint.argmax())] == "anger" and LABELS[int(sad.argmax())] == "sadness"
    np.testing.assert_allclose(p, model.head.vote(model.member_proba(texts)))
    said = clf.classify(transcript(ANGRY_ES, "es")).text_scores
    np.testing.assert_allclose([said[k] for k in LABELS], p[0], atol=1e-4)
    frozen = EmotionClassifier(ClassifierOptions(words_head="frozen"))
    assert isinstance(frozen.text_model, TextModel) and frozen.text.model_id == TextModel.load(TEXT_HEAD).model_id
