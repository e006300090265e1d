"""`pipelines.train.finetune_e5_en`: the English head's rows (train capped per label, dev and test whole), and a tiny
real run that fine-tunes, scores as shipped and writes its section (skipped where GoEmotions is absent)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipelines.data import corpora as D

pytest.importorskip("torch", reason="the fine-tuning path needs torch (setup.sh installs it)")
pytest.importorskip("transformers", reason="the fine-tuning path needs the train extra (transformers)")


def _need_goemotions() -> None:
    if not (D.data_dir() / D.GOEMOTIONS).is_dir():
        pytest.skip(f"dataset {D.GOEMOTIONS} not found at {D.data_dir() / D.GOEMOTIONS} (set EMOTION_DATA_DIR)")


def test_english_rows_are_the_english_heads() -> None:
    _need_goemotions()
    from pipelines.train.finetune_e5_en import HEADS
    from pipelines.train.heads_en import split_rows

    cfg = yaml.safe_load(HEADS.read_text())["text_en"]
    cap = cfg["datasets"][D.GOEMOTIONS]["train_cap_per_label"]
    rows = split_rows(D.GOEMOTIONS, cfg["datasets"][D.GOEMOTIONS], 0, None, None)
    records = D.read_english(D.GOEMOTIONS, None).records
    counts = Counter(r.label for r in rows["train"])
    assert max(counts.values()) == cap and len(counts) == 6
    for split in ("dev", "test"):
        assert len(rows[split]) == sum(r.source == split for r in records)
    ids = [{r.id for r in rs} for rs in rows.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


@pytest.mark.slow
def test_tiny_run_fine_tunes_and_writes_the_section(tmp_path: Path) -> None:
    _need_goemotions()
    from pipelines.train.finetune_e5_en import SECTION, main

    config = tmp_path / "text_finetune.yaml"
    config.write_text(
        "seed: 0\nenglish: {recipe: tiny}\nrecipes:\n"
        "  tiny: {about: two layers from the probe, train_layers: 2, four_bit: false, pool_layers: [10, 12],"
        " probe_C: 0.1, lr: 1.0e-4, head_lr: 1.0e-3, epochs: 2, batch_size: 16, threads: 1}\n"
    )
    page = tmp_path / "text_recipes.md"
    page.write_text("# Tables\n\n## Later section\n\nkept\n")
    assert main(["--config", str(config), "--out", str(page), "--limit", "60"]) == 0
    text = page.read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["e5layers", "e5layers+use", "tiny", "avg(tiny,use)"]
    assert "best epoch" in rows[2] and "GoEmotions train 60" in section
    assert text.startswith("# Tables\n") and "## Later section\n\nkept\n" in text
