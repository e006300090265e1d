"""The late-fusion rule and the words model: properties on made-up distributions, and the shipped files."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.classifier import FUSION_RULES, ClassifierOptions, certainty, fuse, text_gate
from streamer.frames import LABELS
from streamer.heads import LinearHead
from streamer.models import TEXT_HEAD
from streamer.words import TEXT_ENCODERS, TextModel

K = len(LABELS)
UNIFORM = np.full(K, 1 / K)


def dist(*values: float) -> np.ndarray:
    p = np.array(values, dtype=np.float64)
    return p / p.sum()


def test_certainty_is_zero_for_uniform_and_one_for_one_hot() -> None:
    one_hot = np.eye(K)[2]
    for rule in ("entropy", "maxprob"):
        assert certainty(UNIFORM, rule) == pytest.approx(0.0, abs=1e-9)
        assert certainty(one_hot, rule) == pytest.approx(1.0, abs=1e-6)
        sure, unsure = dist(8, 1, 1, 1, 1, 1), dist(2, 1, 1, 1, 1, 1)
        assert certainty(sure, rule) > certainty(unsure, rule) > 0
    assert certainty(np.stack([UNIFORM, one_hot])).shape == (2,)


@pytest.mark.parametrize("rule", ["gated", "entropy", "maxprob"])
def test_uniform_words_leave_the_voice_unchanged(rule: str) -> None:
    voice = dist(5, 1, 1, 2, 1, 1)
    np.testing.assert_allclose(fuse(voice, UNIFORM, rule), voice, atol=1e-12)
    # and the other way round: an uninformative voice leaves clearly emotional words unchanged
    words = dist(1, 1, 1, 1, 1, 12)
    np.testing.assert_allclose(fuse(UNIFORM, words, rule), words, atol=1e-12)


def test_gated_words_abstain_when_they_say_neutral_or_hesitate() -> None:
    voice = dist(6, 1, 1, 1, 1, 1)
    sure_neutral_words = dist(1, 1, 1, 1, 30, 1)
    hesitant_words = dist(1, 1, 1, 3, 1, 2)  # joy at 0.33: below the gate
    assert text_gate(sure_neutral_words) == 0 and text_gate(hesitant_words) == 0
    for words in (sure_neutral_words, hesitant_words):
        np.testing.assert_allclose(fuse(voice, words, "gated"), voice, atol=1e-12)
    # the mean rule, by contrast, lets sure "neutral" words flip an angry voice
    assert LABELS[int(np.argmax(fuse(voice, sure_neutral_words, "mean")))] == "neutral"
    # clear emotional words do count, and more the clearer they are
    sad_words = dist(1, 1, 1, 1, 1, 30)
    assert text_gate(sad_words) == pytest.approx((30 / 35 - 0.6) / 0.4)
    fused = fuse(voice, sad_words, "gated")
    assert fused[LABELS.index("sadness")] > voice[LABELS.index("sadness")] + 0.2
    assert text_gate(dist(1, 1, 1, 1, 1, 4)) < text_gate(sad_words)
    assert text_gate(sad_words, threshold=0.99) == 0


def test_mean_rule_is_dragged_by_uniform_words() -> None:
    voice = dist(5, 1, 1, 2, 1, 1)
    np.testing.assert_allclose(fuse(voice, UNIFORM, "mean"), (voice + UNIFORM) / 2)
    np.testing.assert_allclose(fuse(voice, UNIFORM, "mean", text_weight=0.25), 0.75 * voice + 0.25 * UNIFORM)


@pytest.mark.parametrize("rule", ["gated", "entropy", "maxprob"])
def test_a_confident_modality_dominates_an_unsure_one(rule: str) -> None:
    sure_voice = dist(20, 1, 1, 1, 1, 1)  # anger
    unsure_words = dist(1, 1, 1, 1.6, 1, 1)  # slightly joy
    fused = fuse(sure_voice, unsure_words, rule)
    assert LABELS[int(np.argmax(fused))] == "anger"
    # the fused distribution sits closer to the sure modality than the plain mean does
    mean = fuse(sure_voice, unsure_words, "mean")
    assert np.abs(fused - sure_voice).sum() < np.abs(mean - sure_voice).sum()
    # symmetric: sure words beat an unsure voice
    assert LABELS[int(np.argmax(fuse(unsure_words[::-1], dist(1, 1, 1, 30, 1, 1), rule)))] == "joy"


def test_confidence_rule_arithmetic() -> None:
    voice, words = dist(4, 2, 1, 1, 1, 1), dist(1, 1, 1, 1, 3, 1)
    cv, ct = certainty(voice), certainty(words)
    expected = (0.5 * cv * voice + 0.5 * ct * words) / (0.5 * cv + 0.5 * ct)
    np.testing.assert_allclose(fuse(voice, words, "entropy"), expected, atol=1e-12)
    w = 0.3
    expected = ((1 - w) * cv * voice + w * ct * words) / ((1 - w) * cv + w * ct)
    np.testing.assert_allclose(fuse(voice, words, "entropy", w), expected, atol=1e-12)
    # gated: the words' weight is also multiplied by the gate
    words = dist(1, 1, 1, 1, 1, 9)
    ct, g = certainty(words), text_gate(words)
    assert g == pytest.approx((9 / 14 - 0.6) / 0.4)
    expected = (0.5 * cv * voice + 0.5 * ct * g * words) / (0.5 * cv + 0.5 * ct * g)
    np.testing.assert_allclose(fuse(voice, words, "gated"), expected, atol=1e-12)


@pytest.mark.parametrize("rule", FUSION_RULES)
def test_every_rule_gives_a_distribution_and_handles_missing_words(rule: str) -> None:
    rng = np.random.default_rng(0)
    voice, words = rng.dirichlet(np.ones(K), size=50), rng.dirichlet(np.ones(K), size=50)
    fused = fuse(voice, words, rule)
    assert fused.shape == (50, K) and np.allclose(fused.sum(axis=1), 1) and (fused >= 0).all()
    np.testing.assert_array_equal(fuse(voice[0], None, rule), voice[0])
    both_uniform = fuse(UNIFORM, UNIFORM, rule)
    np.testing.assert_allclose(both_uniform, UNIFORM, atol=1e-12)
    assert fuse(voice[0], words[0], rule).shape == (K,)
    # text weight 0 means voice only, whatever the rule
    np.testing.assert_allclose(fuse(voice, words, rule, text_weight=0.0), voice, atol=1e-9)


def test_unknown_rule_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown fusion rule"):
        fuse(UNIFORM, UNIFORM, "max")
    from streamer.classifier import EmotionClassifier

    with pytest.raises(ValueError, match="unknown fusion rule"):
        EmotionClassifier(ClassifierOptions(fusion="max"))


def test_default_fusion_is_the_safe_rule() -> None:
    assert ClassifierOptions().fusion == "gated" and ClassifierOptions().text_gate == 0.8


# --------------------------------------------------------------------------- shipped words model


def test_shipped_text_head_names_its_encoders_and_is_small() -> None:
    head = LinearHead.load(TEXT_HEAD)
    encoders = head.meta.get("encoders", ["e5"])
    assert set(encoders) <= set(TEXT_ENCODERS)
    assert head.coef.shape == (K, sum(TEXT_ENCODERS[e].dim for e in encoders)) == (K, head.meta["input_dim"])
    assert TEXT_HEAD.stat().st_size < 5_000_000
    assert head.meta["limit"] is None
    if "bias_offsets" in head.meta:
        assert len(head.meta["bias_offsets"]) == K and "cv_bias" in head.meta["cv"]


def test_text_model_concatenates_encoders_in_order(monkeypatch) -> None:
    class Fake:
        def __init__(self, dim: int, value: float) -> None:
            self.dim, self.value = dim, value

        def encode(self, texts):
            return np.full((len(texts), self.dim), self.value, np.float32)

    monkeypatch.setitem(TEXT_ENCODERS, "e5", lambda threads: Fake(2, 1.0))
    monkeypatch.setitem(TEXT_ENCODERS, "use", lambda threads: Fake(3, 2.0))
    rng = np.random.default_rng(0)
    meta = {"encoders": ["e5", "use"]}
    head = LinearHead(LABELS, np.zeros(5), np.ones(5), rng.normal(size=(K, 5)), np.zeros(K), meta)
    model = TextModel(head)
    np.testing.assert_array_equal(model.encode(["a", "b"]), [[1, 1, 2, 2, 2]] * 2)
    np.testing.assert_allclose(model.predict_proba(["a"]), head.predict_proba(np.array([[1, 1, 2, 2, 2.0]])))
    legacy = LinearHead(LABELS, np.zeros(2), np.ones(2), rng.normal(size=(K, 2)), np.zeros(K), {})
    assert TextModel(legacy).encoder_names == ("e5",)
    with pytest.raises(ValueError, match="unknown encoders"):
        TextModel(LinearHead(LABELS, np.zeros(2), np.ones(2), np.zeros((K, 2)), np.zeros(K), {"encoders": ["bert"]}))


@pytest.mark.slow
def test_shipped_text_model_reads_emotion_from_words() -> None:
    model = TextModel.load()
    p = model.predict_proba(
        [
            "Estoy harto, es la tercera vez que llamo y nadie me soluciona nada. Es una vergüenza.",
            "Muchas gracias, estoy muy contento con el paquete.",
        ]
    )
    assert p.shape == (2, K) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    assert p[0, LABELS.index("anger")] + p[0, LABELS.index("disgust")] > p[0, LABELS.index("joy")]
    assert LABELS[int(np.argmax(p[1]))] == "joy"


def test_valence_and_arousal_follow_the_circumplex():
    from streamer.classifier import valence_arousal

    one_hot = np.eye(6)
    joy, sadness, anger, neutral = (one_hot[LABELS.index(x)] for x in ("joy", "sadness", "anger", "neutral"))
    assert valence_arousal(joy)[0] > 0.5 and valence_arousal(sadness)[0] < -0.5
    assert valence_arousal(anger)[1] > 0.5 > valence_arousal(sadness)[1]
    assert valence_arousal(neutral) == (0.0, 0.0)
    assert valence_arousal(np.full(6, 1 / 6))[0] == pytest.approx(np.mean([-0.6, -0.6, -0.6, 0.8, 0.0, -0.6]), abs=1e-3)


def test_incongruent_flags_happy_voice_with_sad_words_only():
    from streamer.classifier import incongruent

    def dist(label, p):
        out = np.full(6, (1 - p) / 5)
        out[LABELS.index(label)] = p
        return out

    assert incongruent(dist("joy", 0.7), dist("sadness", 0.9), gate=0.6, min_gap=0.8)
    assert not incongruent(dist("joy", 0.7), dist("joy", 0.9), gate=0.6, min_gap=0.8)  # they agree
    assert not incongruent(dist("joy", 0.7), dist("neutral", 0.9), gate=0.6, min_gap=0.8)  # words abstain
    assert not incongruent(dist("joy", 0.3), dist("sadness", 0.9), gate=0.6, min_gap=0.8)  # voice unsure
    assert not incongruent(dist("joy", 0.7), None, gate=0.6, min_gap=0.8)
