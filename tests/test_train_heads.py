"""Calibration and the English recipe of `pipelines.train.heads`: temperature fitting on cases with a known answer,
out-of-fold probabilities, and a tiny English training run on the real data (skipped where it is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.data import corpora as D
from pipelines.evaluate.calibration import calibration, crossfit_temper, fit_temperature
from pipelines.evaluate.metrics import expected_calibration_error
from pipelines.train.linear import oof_proba
from streamer.frames import LABELS
from streamer.heads import LinearHead, softmax, temper

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "train" / "heads.yaml"
K = len(LABELS)


def overconfident(n: int, true_t: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z / true_t) and the probabilities softmax(z) that a head reports for them: the
    head is over-confident by a factor true_t, so the right temperature is true_t."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, K)) * 3
    truth = softmax(z / true_t)
    y = np.array([LABELS[rng.choice(K, p=row)] for row in truth])
    return softmax(z), y


def test_fit_temperature_recovers_a_known_over_and_under_confidence() -> None:
    for true_t in (2.0, 0.5):
        p, y = overconfident(20_000, true_t)
        assert fit_temperature(p, y) == pytest.approx(true_t, rel=0.05)
    p, y = overconfident(20_000, 1.0)
    assert fit_temperature(p, y) == pytest.approx(1.0, rel=0.05)  # calibrated already: leave it alone


def test_calibration_lowers_ece_and_cross_fits_on_other_folds() -> None:
    p, y = overconfident(6_000, 2.0, seed=1)
    fold = np.arange(len(y)) % 3
    calib = calibration(p, y, fold, "synthetic", {"other": overconfident(3_000, 2.0, seed=2)})
    assert calib["temperature"] == pytest.approx(2.0, rel=0.1)
    assert calib["ece15_before"] > 0.1 > 0.03 > calib["ece15_after_crossfit"]
    assert calib["nll_after_crossfit"] < calib["nll_before"]
    assert calib["other"]["ece15_after"] < calib["other"]["ece15_before"]
    # each fold is tempered by a T fitted without it: a fold of pure noise does not tune its own T
    after = crossfit_temper(p, y, fold)
    for f in range(3):
        rest = fold != f
        np.testing.assert_allclose(after[~rest], temper(p[~rest], fit_temperature(p[rest], y[rest])))
    assert expected_calibration_error(after, y) == pytest.approx(calib["ece15_after_crossfit"], abs=1e-4)


def test_oof_proba_scores_every_row_once_and_never_the_extra_rows() -> None:
    rng = np.random.default_rng(0)
    y = np.array(LABELS)[rng.integers(0, K, 240)]
    X = np.eye(K)[[LABELS.index(v) for v in y]] + rng.normal(size=(240, K)) * 0.3
    groups = np.array([f"g{i % 24}" for i in range(240)])
    splits = D.grouped_folds(y, groups, 4, seed=0)
    cfg = {"class_weight": "balanced", "max_iter": 2000}
    p, fold = oof_proba(splits, X, y, 1.0, cfg, 0)
    assert p.shape == (240, K) and np.allclose(p.sum(axis=1), 1) and sorted(set(fold)) == [0, 1, 2, 3]
    assert (np.array(LABELS)[p.argmax(axis=1)] == y).mean() > 0.8
    # extra rows that all say "fear" pull every training side towards fear, and are never scored themselves
    X_extra, y_extra = rng.normal(size=(500, K)), np.array(["fear"] * 500)
    p_extra, _ = oof_proba(splits, X, y, 1.0, cfg, 0, None, X_extra, y_extra, 5.0)
    assert p_extra.shape == p.shape
    assert LABELS[2] == "fear"
    p_light, _ = oof_proba(splits, X, y, 1.0, cfg, 0, None, X_extra, y_extra, 0.2)
    assert p[:, 2].mean() < p_light[:, 2].mean() < p_extra[:, 2].mean()  # the weight sets how far they pull
    p_bias, _ = oof_proba(splits, X, y, 1.0, cfg, 0, groups)
    assert not np.allclose(p_bias, p)  # nested offsets tuned inside each training side


@pytest.mark.slow
def test_tiny_english_training_run_is_deterministic(tmp_path: Path) -> None:
    for name in (D.GOEMOTIONS, D.EMOEVENT):
        if not (D.data_dir() / name).is_dir():
            pytest.skip(f"dataset {name} not found at {D.data_dir() / name} (set EMOTION_DATA_DIR)")
    from pipelines.train.heads import main

    args = ["--config", str(CONFIG), "--heads", "text_en", "--limit", "30", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    head = LinearHead.load(tmp_path / "a" / "text_head_en.npz")
    assert head.meta["languages"] == "en" and head.meta["limit"] == 30 and head.labels == LABELS
    assert set(head.meta["heldout"]) == {D.GOEMOTIONS, D.EMOEVENT}
    for held in head.meta["heldout"].values():
        lo, hi = held["macro_f1_ci95"]
        assert held["n"] == 30 and lo <= held["macro_f1"] <= hi
    calib = head.meta["calibration"]
    assert head.temperature == calib["temperature"] > 0
    assert {f"test {n}" for n in head.meta["heldout"]} <= set(calib)
    assert {"dev", "test"} <= set(head.meta["cv"]) and len(head.meta["bias_offsets"]) == K
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    again = LinearHead.load(tmp_path / "b" / "text_head_en.npz")
    np.testing.assert_array_equal(again.coef, head.coef)
    assert again.meta == head.meta and again.temperature == head.temperature


# --------------------------------------------------------------------------- the words ensemble (default Spanish head)


def _need(*names: str) -> None:
    for name in names:
        if not (D.data_dir() / name).is_dir():
            pytest.skip(f"dataset {name} not found at {D.data_dir() / name} (set EMOTION_DATA_DIR)")


@pytest.mark.slow
def test_the_shipped_tfidf_member_is_sklearns_pipeline_without_pickles() -> None:
    """The TF-IDF member of the shipped words head, refitted with sklearn from the recipe in its meta on the same
    rows, has the same vocabulary and idf, and the numpy runtime gives sklearn's probabilities (max abs difference
    ≤ 1e-6) on 300 real transcripts and odd texts (empty, blank, emoji, other scripts, 5,000 characters)."""
    _need(D.EMOSPEECH)
    from pipelines.train.linear import proba_in_label_order
    from pipelines.train.text import fit_tfidf
    from streamer.models import TEXT_HEAD_ENSEMBLE
    from streamer.words import TfidfHead, WordsEnsembleHead
    from tests.test_classifier import ODD_TEXTS

    head = WordsEnsembleHead.load(TEXT_HEAD_ENSEMBLE)
    member = next(m for m in head.members if isinstance(m, TfidfHead))
    rows = D.read_emospeech(None, include_extra=True).records
    texts, y = np.array([r.text for r in rows], dtype=object), np.array([r.label for r in rows])
    assert len(rows) == head.meta["n_train"]
    model = fit_tfidf(member.meta["C"], texts, y, None, member.meta["seed"], member.meta["tfidf"])
    for block, (_, vectorizer) in zip(member.blocks, model[0].transformer_list, strict=True):
        assert block.vocabulary == vectorizer.vocabulary_
        np.testing.assert_array_equal(block.idf, vectorizer.idf_)
    rng = np.random.default_rng(1)
    sample = [*texts[rng.choice(len(texts), 300, replace=False)], *ODD_TEXTS, "Ñandú ÁRBOL " * 40]
    diff = np.abs(member.predict_proba(sample) - proba_in_label_order(model, sample)).max()
    assert diff <= 1e-6, diff
    assert member.meta["sklearn_parity_max_abs_diff"] <= 1e-6


@pytest.mark.slow
def test_tiny_words_ensemble_run_is_deterministic_and_compares_with_the_shipped_head(tmp_path: Path) -> None:
    _need(D.EMOSPEECH)
    from pipelines.train.heads import ensemble_oof, main
    from pipelines.train.text import words_scores
    from streamer.models import sha256_of
    from streamer.words import TfidfHead, WordsEnsemble, WordsEnsembleHead

    args = ["--config", str(CONFIG), "--heads", "text_ensemble", "--limit", "60", "--cache-dir", str(tmp_path / "c")]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    path = tmp_path / "a" / "text_head_ens.npz"
    head = WordsEnsembleHead.load(path)
    assert head.meta["limit"] == 60 and head.meta["n_train"] == 60
    assert head.meta["chosen"].removesuffix("+bias") in head.meta["recipe"]["ensembles"]
    assert abs(sum(head.weights) - 1) < 1e-9 and any(isinstance(m, TfidfHead) for m in head.members)
    assert head.temperature == head.meta["calibration"]["temperature"] > 0
    rows = {r["recipe"]: r for r in head.meta["comparison"]}
    assert {"e5", "use", "tfidf", head.meta["chosen"]} <= set(rows) and next(iter(rows)).startswith("shipped text-")
    for r in rows.values():
        lo, hi = r["pooled_macro_f1_ci95"]
        assert 0 <= lo <= hi <= 1 and set(r["per_class_f1"]) == set(LABELS)
        assert 0 <= r["macro_f1_no_fear_mean"] <= 1
    averages = [r for n, r in rows.items() if n.removesuffix("+bias") in head.meta["recipe"]["ensembles"]]
    best = max(r["macro_f1_no_fear_mean"] for r in averages)  # fear's few rows do not choose
    assert rows[head.meta["chosen"]]["macro_f1_no_fear_mean"] == best
    p = WordsEnsemble(head).predict_proba(["Estoy muy contento", ""])
    assert p.shape == (2, K) and np.allclose(p.sum(axis=1), 1)
    # the fusion evaluation's out-of-fold probabilities of the shipped recipe are the training run's own
    seed = head.meta["recipe"]["seed"]
    records = D.limit_records(D.read_emospeech(include_extra=True).records, 60, seed)
    splits = D.text_folds(records, int(head.meta["recipe"]["cv_folds"]), seed)
    fold = np.full(len(records), -1)
    for k, (_, test) in enumerate(splits):
        fold[test] = k
    oof = ensemble_oof(head, records, splits, tmp_path / "c")
    y = np.array([r.label for r in records])
    again = words_scores("again", "", oof, y, fold, 10, seed)
    assert again["macro_f1_mean"] == pytest.approx(rows[head.meta["chosen"]]["macro_f1_mean"], abs=1e-12)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert sha256_of(tmp_path / "b" / "text_head_ens.npz") == sha256_of(path)  # the same bytes for a seed
