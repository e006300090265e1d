"""Fusion recipes (issue #3, part 4): ITST max, hard voting with its tie-break and nested choice, and the learned
recipes (early-fusion MLP, concatenated attention, stacking, learned gate) trained on tiny generated data with a
planted signal (a recipe that learns nothing scores near chance, 1/6, and fails)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.evaluate import fusion as E
from pipelines.train import fusion as F
from streamer.frames import LABELS

pytest.importorskip("torch", reason="torch (train extra / setup.sh) is needed to train the learned fusion recipes")
K = len(LABELS)
MLP = {"width": 16, "hidden": 32, "dropout": 0.5, "lr": 0.01, "epochs": 15, "batch": 32}
ATTENTION = {"width": 16, "hidden": 32, "dropout": 0.1, "lr": 0.01, "weight_decay": 0.01, "epochs": 6, "batch": 32}
ATTENTION["crop_frames"] = 8


def test_max_rule_is_the_renormalised_elementwise_max() -> None:
    pv = np.array([[0.7, 0.1, 0.05, 0.05, 0.05, 0.05]])
    pt = np.array([[0.1, 0.1, 0.1, 0.1, 0.5, 0.1]])
    fused = F.max_rule(pv, pt)
    np.testing.assert_allclose(fused, [[0.7, 0.1, 0.1, 0.1, 0.5, 0.1]] / np.float64(1.6))
    assert fused.argmax() == 0  # the surer modality's label survives, as ITST intends


def test_hard_vote_majority_and_tie_break() -> None:
    best, second, third = np.array([0, 1, 2, 3]), np.array([1, 1, 4, 5]), np.array([1, 2, 2, 0])
    vote = F.hard_vote([best, second, third])
    # clip 0: 2 of 3 say 1 (the best model is outvoted); clip 1: 1; clip 2: 2; clip 3: three-way tie → best model
    np.testing.assert_array_equal(vote.argmax(axis=1), [1, 1, 2, 3])
    np.testing.assert_allclose(vote.max(axis=1), [2 / 3, 2 / 3, 2 / 3, 1 / 3])  # confidence: the share of votes
    np.testing.assert_allclose(vote.sum(axis=1), 1)
    vote = F.hard_vote([third, second, best])  # the same votes ranked otherwise: the tie follows the rank
    np.testing.assert_array_equal(vote.argmax(axis=1), [1, 1, 2, 0])
    # four voters, 2–2: the label of the best-ranked model among the tied
    vote = F.hard_vote([np.array([5]), np.array([3]), np.array([3]), np.array([5])])
    assert vote.argmax() == 5 and vote.max() == 0.5
    with pytest.raises(ValueError, match="hard vote"):
        F.hard_vote([best] * K)  # as many voters as labels: the argmax could miss the winner


def test_nested_vote_never_picks_on_the_test_fold() -> None:
    y = np.repeat(np.array(LABELS), 4)
    idx = np.array([LABELS.index(v) for v in y])
    splits = [(np.flatnonzero(np.arange(len(y)) % 2 != k), np.flatnonzero(np.arange(len(y)) % 2 == k)) for k in (0, 1)]
    right, wrong = np.eye(K)[idx], np.eye(K)[(idx + 1) % K]
    good, bad = E.Fused(right, [right]), E.Fused(wrong, [wrong])
    fused, chosen = E.nested_vote({"bad": bad, "a": good, "b": good, "c": good}, y, splits, 3)
    np.testing.assert_array_equal(fused.uem.argmax(axis=1), idx)
    assert chosen == {"a + b + c": 2}
    # a candidate that is perfect on fold 0 only is picked for fold 1 (chosen on fold 0), not for fold 0
    half = E.Fused(np.where((np.arange(len(y)) % 2 == 0)[:, None], right, np.eye(K)[(idx + 2) % K]), [right])
    _, chosen = E.nested_vote({"half": half, "a": good, "b": good, "bad": bad}, y, splits, 1)
    assert chosen == {"a": 1, "half": 1}


def test_draw_pairs_keeps_the_label() -> None:
    rng = np.random.default_rng(0)
    pool_y = np.array(["joy", "anger", "joy", "fear"])
    y = np.array(["joy", "fear", "joy", "anger", "joy"])
    pairs = F.draw_pairs(y, pool_y, rng)
    np.testing.assert_array_equal(pool_y[pairs], y)
    with pytest.raises(ValueError, match="sadness"):
        F.draw_pairs(np.array(["sadness"]), pool_y, rng)


def planted(n: int, dim: int, rng: np.random.Generator, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels and rows whose mean is a label-specific random direction × signal (noise sd 1)."""
    centres = np.random.default_rng(99 + dim).normal(size=(K, dim))  # fixed per dim: train and test agree
    y = np.array(LABELS)[np.arange(n) % K]
    idx = np.arange(n) % K
    return y, centres[idx] * signal + rng.normal(size=(n, dim))


def log_probs(label_idx: np.ndarray, rng: np.random.Generator, signal: float = 2.0) -> np.ndarray:
    """Log-probabilities of a head that favours the given labels (logit + signal, noise sd 1)."""
    z = signal * np.eye(K)[label_idx] + rng.normal(size=(len(label_idx), K))
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def paired_set(rng: np.random.Generator, n: int, kind: str):
    """Voice with a planted signal, UEM-like real transcripts (`features`/`sequences`: noise; `probabilities`: a words
    head sure of "neutral" whatever the label), a text pool with a planted signal; as features (12-d voice, 10-d
    words), frame sequences of the voice, or head log-probabilities."""
    if kind == "probabilities":
        y = np.array(LABELS)[np.arange(n) % K]
        pool_y = np.array(LABELS)[np.arange(300) % K]
        neutral = np.full(n, LABELS.index("neutral"))
        return (
            y,
            log_probs(np.arange(n) % K, rng),
            log_probs(neutral, rng, 3.0),
            pool_y,
            log_probs(np.arange(300) % K, rng),
        )
    y, voice = planted(n, 12, rng, 1.2)
    if kind == "sequences":  # frames of varying length around the clip's pooled row
        voice = [row + rng.normal(size=(int(rng.integers(3, 20)), 12)) for row in voice]
    pool_y, pool = planted(300, 10, rng, 1.2)
    return y, voice, rng.normal(size=(n, 10)), pool_y, pool


def accuracy(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.array(LABELS)[p.argmax(axis=1)] == y))


CFG = {
    "mlp": MLP,
    "attention": ATTENTION,
    "stack": {"lr": 0.05, "epochs": 10, "batch": 32},
    "gate": {"hidden": 8, "lr": 0.05, "epochs": 15, "batch": 32},
}


@pytest.mark.parametrize(
    ("rc", "kind"),
    [
        ({"model": "mlp", "modality_dropout": 0.0}, "features"),
        ({"model": "mlp", "modality_dropout": 0.5}, "features"),
        ({"model": "attention", "modality_dropout": 0.5}, "sequences"),
        ({"model": "stack", "modality_dropout": 0.0}, "probabilities"),
        ({"model": "gate", "modality_dropout": 0.0}, "probabilities"),
    ],
)
def test_learned_recipes_learn_the_planted_signal(rc: dict, kind: str) -> None:
    y, voice, real, pool_y, pool = paired_set(np.random.default_rng(1), 240, kind)
    model = F.make_learned(rc, CFG, seed=0).fit(F.PairedTrain(voice, real, y, pool, pool_y))
    y_te, voice_te, real_te, pool_te_y, pool_te = paired_set(np.random.default_rng(2), 120, kind)
    pool_te_y, pool_te = pool_te_y[:120], pool_te[:120]
    assert (pool_te_y == y_te).all()  # row i of the test pool pairs with test clip i
    missing = np.full_like(real_te, np.nan)
    with_noise, with_words, voice_only = model.predict(voice_te, [real_te, pool_te, missing])
    assert with_noise.shape == (120, K) and np.allclose(with_noise.sum(axis=1), 1)
    assert accuracy(with_noise, y_te) > 0.5, "voice with uninformative words"
    assert accuracy(with_words, y_te) > 0.8, "both modalities informative"
    assert accuracy(with_words, y_te) > accuracy(with_noise, y_te), "informative words must help"
    if rc["modality_dropout"] or rc["model"] == "gate":
        assert accuracy(voice_only, y_te) > 0.5, "a missing transcript leaves the voice"
    if rc["model"] in ("attention", "gate"):
        w_noise, w_words = model.words_weight(voice_te, [real_te, pool_te])
        assert ((w_noise > 0) & (w_noise < 1)).all() and w_words.shape == (120,)
        if rc["model"] == "gate":  # the learned gate listens less to words that always say "neutral"
            assert w_noise.mean() < w_words.mean() - 0.1


def test_learned_recipe_is_deterministic_and_rejects_unknown_models() -> None:
    rng = np.random.default_rng(4)
    y, voice, real, pool_y, pool = paired_set(rng, 60, "features")
    cfg = {"mlp": {**MLP, "epochs": 2}}
    rc = {"model": "mlp", "modality_dropout": 0.5}
    a = F.make_learned(rc, cfg, 0).fit(F.PairedTrain(voice, None, y, pool, pool_y)).predict(voice, [real])[0]
    b = F.make_learned(rc, cfg, 0).fit(F.PairedTrain(voice, None, y, pool, pool_y)).predict(voice, [real])[0]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown fusion model"):
        F.make_learned({"model": "transformer"}, cfg, 0)
