"""`pipelines.train.distil_text`: soft-label weighting equals the hard recipe at α = 1, and no test-fold row (nor a
copy of its text in the pseudo pool) reaches a teacher or a student; a tiny real-data run writes the table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.data import corpora as D
from pipelines.train.distil_text import CvData, distil_cv, fit_soft, one_hot, soft_rows
from pipelines.train.linear import make_model, proba_in_label_order
from pipelines.train.text import LR_CFG, fit_embedding
from streamer.frames import LABELS


def _toy(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Separable-ish features: each label shifts its own coordinate; every label present, fear rare."""
    rng = np.random.default_rng(seed)
    y = np.array([LABELS[i % len(LABELS)] for i in range(n)])
    y[rng.choice(np.flatnonzero(y == "fear"), n // 12, replace=False)] = "neutral"
    X = rng.normal(size=(n, d))
    for k, label in enumerate(LABELS):
        X[y == label, k] += 1.5
    return X, y


def test_soft_rows_mix_gold_and_teacher() -> None:
    gold = one_hot(["joy", "fear", "anger"])
    gold[2] = 0  # a pool row: no gold, the teacher alone
    q = np.full((3, 6), 1 / 6)
    rows, labels, w = soft_rows(gold, q, 0.5, np.array([1.0, 1.0, 0.3]), balance="none")
    assert len(rows) == len(labels) == len(w) == 3 * len(LABELS)
    w = w.reshape(3, 6)
    assert w[0, LABELS.index("joy")] == pytest.approx(0.5 + 0.5 / 6) and w[0, 0] == pytest.approx(0.5 / 6)
    assert np.allclose(w[2], 0.3 / 6)
    with pytest.raises(ValueError):
        soft_rows(gold, q, 0.5, balance="balanced")


def test_gold_balance_weights_the_gold_term_like_the_hard_recipe() -> None:
    gold = one_hot(["anger", "anger", "anger", "disgust"])
    q = np.tile(np.eye(6)[2], (4, 1))  # the teacher says fear everywhere
    w = soft_rows(gold, q, 0.5, balance="gold")[2].reshape(4, 6)
    # balanced weights from the gold counts (anger 3, disgust 1): 4/(2·3) and 4/(2·1); the teacher term unweighted
    assert w[0, 0] == pytest.approx(0.5 * 4 / 6) and w[3, 1] == pytest.approx(0.5 * 2)
    assert np.allclose(w[:, 2], 0.5)
    m = soft_rows(gold, q, 0.5, balance="soft_mass")[2].reshape(4, 6)
    # soft mass: anger 1.5, disgust 0.5, fear 2 → each class weighs N/K' = 4/3 in all
    assert np.allclose(m.sum(axis=0)[:3], 4 / 3) and not m[:, 3:].any()


@pytest.mark.parametrize("balance", ["gold", "soft_mass"])
def test_alpha_one_is_the_hard_label_recipe(balance: str) -> None:
    X, y = _toy(150, 8, 0)
    q = np.random.default_rng(1).dirichlet(np.ones(6), len(y))
    soft = fit_soft(0.1, X, one_hot(y), q, 1.0, None, 0, balance)
    hard = make_model(0.1, LR_CFG, 0).fit(X, y)
    assert np.abs(proba_in_label_order(soft, X) - proba_in_label_order(hard, X)).max() < 2e-3
    half = fit_soft(0.1, X, one_hot(y), q, 0.5, None, 0, balance)
    assert np.abs(proba_in_label_order(half, X) - proba_in_label_order(hard, X)).max() > 0.01  # α matters


class _Spy:
    """A fitted model that remembers the row ids (feature column 0) it was trained on and refuses to predict them."""

    def __init__(self, model, ids: np.ndarray, seen: list, test_ids: set) -> None:
        self.model, self.ids, self.classes_ = model, set(ids.astype(int).tolist()), model.classes_
        leaked = self.ids & test_ids
        assert not leaked, f"test-fold rows reached a training side: {sorted(leaked)[:5]}"
        seen.append(self.ids)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        again = self.ids & set(X[:, 0].astype(int).tolist())
        assert not again, f"a model predicts rows it was trained on: {sorted(again)[:5]}"
        return self.model.predict_proba(X)


def test_no_test_fold_row_reaches_teacher_or_student() -> None:
    n, m = 180, 30
    X, y = _toy(n + m, 6, 1)
    X[:, 0] = np.arange(n + m)  # column 0 = row id; scaled away by the standardiser, kept for the spies
    groups = np.array([f"v{i // 4}" for i in range(n)] + [f"pool:{i}" for i in range(m)])
    texts = np.array([f"text {i}" for i in range(n + m)], dtype=object)
    splits = D.grouped_folds(y[:n], groups[:n], 3, 0)
    train, test = splits[0]
    texts[n] = "TEXT  " + texts[test[0]].split()[1]  # a pool row copying a test transcript (case, spaces)
    d = CvData(y=y, groups=groups, texts=texts, feats={"x": X}, n=n)
    teacher_seen: list[set] = []
    student_seen: list[set] = []
    test_ids = set(test.tolist())

    def spy_teacher(C, Xt, yt, w, seed):
        return _Spy(fit_embedding(C, Xt, yt, w, seed), Xt[:, 0], teacher_seen, test_ids)

    def spy_student(C, Xt, gold, q, alpha, r, seed, balance):
        assert not gold[Xt[:, 0] >= n].any()  # pool rows carry no gold
        return _Spy(fit_soft(C, Xt, gold, q, alpha, r, seed, balance), Xt[:, 0], student_seen, test_ids)

    cfg = {"inner_folds": 3, "bias_for": ["x"], "pseudo": {"pool": {"weight": 0.5}}}
    res = distil_cv(d, [(train, test)], [(spy_teacher, X, 0.1)], {"x": [0.1]}, [0.0, 0.5], cfg, 0, spy_student)

    assert len(teacher_seen) == 3 + 1  # inner cross-fit + the training-fold teacher
    assert all(ids <= set(train.tolist()) for ids in teacher_seen)  # the teacher never sees the pool either
    assert max(len(ids) for ids in teacher_seen) == len(train)
    assert student_seen and all(not ids & test_ids for ids in student_seen)
    assert n not in set().union(*student_seen), "a pool copy of a test transcript was used"
    assert any(ids & set(range(n + 1, n + m)) for ids in student_seen)  # the rest of the pool is used
    assert res.dropped_pseudo == [1]
    assert set(res.students) == {
        f"student x α={a}{p}{b}" for a in ("0", "0.5") for p, b in (("", ""), (" +pseudo", ""), ("", " +bias"),
                                                                    (" +pseudo", " +bias"))
    }  # fmt: skip
    scored = np.zeros(n, bool)
    scored[test] = True
    assert np.allclose(res.teacher_oof[scored].sum(axis=1), 1) and not res.teacher_oof[~scored].any()


@pytest.mark.slow
def test_tiny_real_run_writes_the_table(tmp_path: Path) -> None:
    for name in (D.EMOSPEECH, D.EMOEVENT):
        if not (D.data_dir() / name).is_dir():
            pytest.skip(f"dataset {name} not found at {D.data_dir() / name} (set EMOTION_DATA_DIR)")
    from pipelines.train.distil_text import CONFIG, main

    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["students"] = {k: v[1:2] for k, v in cfg["students"].items()}
    (tmp_path / "distil.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "heads.yaml").write_text((CONFIG.parent / "heads.yaml").read_text())
    out = tmp_path / "distillation.md"
    args = ["--config", str(tmp_path / "distil.yaml"), "--out", str(out), "--limit", "60", "--no-timing"]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 0
    md = out.read_text()
    for row in ("teacher avg(e5,use,tfidf)", "shipped recipe (e5 +bias)", "student e5 α=0.5 +pseudo +bias"):
        assert f"| `{row}` |" in md
    assert "--limit 60" in md and (tmp_path / "distillation").is_dir()
