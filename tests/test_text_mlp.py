"""`pipelines.train.text_mlp`: the MLP seed ensemble learns, is deterministic and survives a class missing from its
training rows; the draws table counts wins against the default; `write_section` replaces only its own section;
and a tiny run on real data writes the section (skipped where the data is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.data import corpora as D
from pipelines.train.text import write_section
from pipelines.train.text_mlp import SECTION, MlpRecipe, draws_table, mlp_proba
from streamer.frames import LABELS

TINY = MlpRecipe(hidden=16, input_dropout=0.1, dropout=0.1, epochs=30, seeds=(0, 1), threads=1)


def _clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each label a cluster of its own in 20-d noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(LABELS)
    centres = np.random.default_rng(99).normal(0, 3, (len(LABELS), 20))
    return centres[y] + rng.normal(0, 1, (n, 20)), y


def test_mlp_learns_and_is_deterministic() -> None:
    X, y = _clusters(300, 0)
    X_test, y_test = _clusters(120, 1)
    p = mlp_proba(TINY, X, y, X_test)
    assert p.shape == (120, len(LABELS))
    assert np.allclose(p.sum(axis=1), 1.0)
    assert (p.argmax(axis=1) == y_test).mean() >= 0.9
    assert np.array_equal(p, mlp_proba(TINY, X, y, X_test))
    other_seeds = mlp_proba(MlpRecipe(**{**TINY.__dict__, "seeds": (2,)}), X, y, X_test)
    assert not np.allclose(p, other_seeds)


def test_a_class_without_training_rows_is_never_chosen_and_nothing_breaks() -> None:
    X, y = _clusters(300, 0)
    keep = y != LABELS.index("fear")
    p = mlp_proba(TINY, X[keep], y[keep], _clusters(60, 1)[0])
    assert np.isfinite(p).all()
    assert (p.argmax(axis=1) != LABELS.index("fear")).all()


def test_draws_table_counts_wins_against_the_default() -> None:
    def draw(default: tuple[float, float], mlp_tf: tuple[float, float]) -> dict[str, tuple[float, float]]:
        rest = {"lr": (0.6, 0.6), "mlp": (0.6, 0.6), "avg(lr,mlp,tfidf)": (0.6, 0.6)}
        return rest | {"avg(lr,tfidf)": default, "avg(mlp,tfidf)": mlp_tf}

    lines = draws_table([draw((0.66, 0.68), (0.67, 0.67)), draw((0.65, 0.68), (0.64, 0.69))])
    row = next(line for line in lines if line.startswith("| `avg(mlp,tfidf)`"))
    assert "0.655 [0.640, 0.670]" in row  # mean [min, max] of its macro-F1 over the draws
    assert row.endswith("| 1 of 2, 1 of 2 |")
    default = next(line for line in lines if line.startswith("| `avg(lr,tfidf)`"))
    assert default.endswith("| – |")


def test_write_section_replaces_only_its_section(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A\n\nold a\n\n## B\n\nb\n")
    write_section(page, "## A", "## A\n\nnew a\n")
    assert page.read_text() == "# Title\n\n## A\n\nnew a\n\n## B\n\nb\n"
    write_section(page, "## B", "## B\n\nnew b")
    assert page.read_text() == "# Title\n\n## A\n\nnew a\n\n## B\n\nnew b\n"
    write_section(page, "## C", "## C\n\nc\n")
    assert page.read_text().endswith("## B\n\nnew b\n\n## C\n\nc\n")


@pytest.mark.slow
def test_tiny_run_writes_the_section(tmp_path: Path) -> None:
    for name in (D.EMOSPEECH, D.EMOEVENT):
        if not (D.data_dir() / name).is_dir():
            pytest.skip(f"dataset {name} not found at {D.data_dir() / name} (set EMOTION_DATA_DIR)")
    from pipelines.train.text_mlp import main

    config = tmp_path / "text_mlp.yaml"
    config.write_text(
        "seed: 0\ncv_folds: 3\ndraws: 2\n"
        "mlp: {hidden: 8, input_dropout: 0.5, dropout: 0.5, epochs: 3, lr: 1.0e-3, weight_decay: 1.0e-2,"
        " batch_size: 64, seeds: [0], threads: 1}\n"
    )
    page = tmp_path / "text_recipes.md"
    page.write_text("# Spanish table\n\n## Later section\n\nkept\n")
    assert main(["--config", str(config), "--out", str(page), "--limit", "240"]) == 0
    text = page.read_text()
    assert text.startswith("# Spanish table\n")
    section = text.split(SECTION, 1)[1]
    assert "| `avg(lr,tfidf)` | **the shipped default words recipe** |" in section
    assert "240 EmoEvent Spanish tweets" in section
    assert "## Later section\n\nkept\n" in text
