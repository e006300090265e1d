"""The English words head on fine-tuned e5 (`pipelines.train.finetune_e5_en`): its rows (train capped per label, dev
and test whole), a tiny real run that fine-tunes, scores as shipped, writes its section and ships; the shipped delta
(small files, built once into the cache by its pinned hash, a corrupt file a clear error) and the shipped head on
hard transcripts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
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
    out = tmp_path / "models"
    assert main(["--config", str(config), "--out", str(page), "--limit", "60", "--ship", "--out-dir", str(out)]) == 0
    text = page.read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["e5layers", "e5layers+use", "tiny", "avg(tiny,use)"]
    assert "best epoch" in rows[2] and "GoEmotions train 60" in section and "EmoEvent en 60" in section
    assert text.startswith("# Tables\n") and "## Later section\n\nkept\n" in text
    # what --ship wrote: the vote of the fine-tuned head and USE's, with dev offsets and temperature, and the delta
    from streamer.e5file import E5File
    from streamer.e5onnx import apply_delta, layer_weights
    from streamer.models import e5_small_path
    from streamer.words import WordsEnsembleHead

    head = WordsEnsembleHead.load(out / "text_head_en_ft.npz")
    assert [m.meta["encoders"] for m in head.members] == [["e5layers-en"], ["use"]] and head.weights == (0.5, 0.5)
    assert head.temperature == head.meta["calibration"]["temperature"] and head.meta["limit"] == 60
    deltas = sorted(out.glob("text_encoder_en_delta*.npz"))
    assert deltas and all(p.stat().st_size <= 5_000_000 for p in deltas)
    delta = {}
    for path in deltas:
        with np.load(path) as z:
            delta |= {k: z[k] for k in z.files}
    layers = apply_delta(layer_weights(E5File.read(e5_small_path())), delta)
    assert {name.split(".")[0] for name in layers} == {"l10", "l11"}  # the two trained layers, nothing else


def test_delta_files_hold_whole_tensors_under_the_limit() -> None:
    from pipelines.train.finetune_e5_en import delta_files

    arrays = {f"t{i}": np.zeros(n, np.int8) for i, n in enumerate([400, 500, 300, 900, 100])}
    parts = delta_files(arrays, limit=1000)
    assert [list(p) for p in parts] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    with pytest.raises(ValueError, match="t0: 400 bytes"):
        delta_files(arrays, limit=300)


# --------------------------------------------------------------------------- the shipped English words model


def test_shipped_english_delta_is_small_and_builds_the_pinned_layers_once(tmp_path, monkeypatch) -> None:
    from streamer import models
    from streamer.e5file import E5File
    from streamer.e5onnx import layer_weights

    assert all(path.stat().st_size <= 5_000_000 for path in models.TEXT_ENCODER_EN_DELTA)
    monkeypatch.setenv("EMOTION_MONITOR_CACHE", str(tmp_path))
    layers = models.english_e5_layers()
    (built,) = (tmp_path / "e5-en-ft").iterdir()
    assert models.sha256_of(built) == models.E5_EN_LAYERS_SHA256
    mtime = built.stat().st_mtime_ns
    again = models.english_e5_layers()
    assert built.stat().st_mtime_ns == mtime  # not rebuilt
    assert all(np.array_equal(again[k], v) for k, v in layers.items())
    # the top 6 layers changed, every tensor of them, by a small step; nothing below
    base = layer_weights(E5File.read(models.e5_small_path()))
    assert {name.split(".")[0] for name in layers} == {f"l{i}" for i in range(6, 12)}
    assert set(layers) == {n for n in base if n.split(".")[0] in {f"l{i}" for i in range(6, 12)}}
    change = np.abs(layers["l11.fo.w"] - base["l11.fo.w"])
    assert 0 < change.mean() < 0.1 * np.abs(base["l11.fo.w"]).mean()
    # a truncated build in the cache is rebuilt, never loaded
    built.write_bytes(built.read_bytes()[:1000])
    models.english_e5_layers()
    assert models.sha256_of(built) == models.E5_EN_LAYERS_SHA256


def test_a_corrupt_english_delta_is_a_clear_error_naming_the_file(tmp_path, monkeypatch) -> None:
    from streamer import models

    (first, sha), *rest = models.TEXT_ENCODER_EN_DELTA.items()
    bad = tmp_path / first.name
    bad.write_bytes(first.read_bytes()[:-10])
    monkeypatch.setattr(models, "TEXT_ENCODER_EN_DELTA", {bad: sha, **dict(rest)})
    monkeypatch.setenv("EMOTION_MONITOR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(models.ModelFileError, match=rf"{first.stem}\.npz has SHA-256"):
        models.english_e5_layers()
    monkeypatch.setattr(models, "TEXT_ENCODER_EN_DELTA", {tmp_path / "gone.npz": sha})
    with pytest.raises(models.ModelFileError, match=r"model file missing: .*gone\.npz"):
        models.english_e5_layers()


@pytest.mark.slow
def test_the_english_words_model_reads_hard_transcripts() -> None:
    """The classifier's English head is the fine-tuned vote: anger and joy read right; empty, blank, 5,000
    characters, emoji, other scripts give a distribution each."""
    from streamer.classifier import EmotionClassifier
    from streamer.frames import LABELS
    from tests.conftest import ANGRY_EN, HAPPY_EN

    clf = EmotionClassifier()
    model = clf.text_models["en"]
    assert model.encoder_names == ("e5layers-en", "use") and "goemotions-ft" in model.encoders[0].model_id
    # the frozen head read this first-person anger as sadness (0.55 vs anger 0.27)
    furious = "I am absolutely furious with you"
    texts = [ANGRY_EN, HAPPY_EN, furious, "", "   ", "no " * 1700, "🙂" * 50, "Ты меня бесишь!", "我很生气"]
    p = clf.classify_text(texts, "en")
    assert p.shape == (len(texts), 6) and np.isfinite(p).all() and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    assert [LABELS[int(i)] for i in p[:3].argmax(1)] == ["anger", "joy", "anger"]
    # the fine-tuned layers are not the packaged ones: the same transcript reads differently from the Spanish e5
    ours = model.encoders[0].encode([ANGRY_EN])
    packaged = clf.text_model.encoders[clf.text_model.encoder_names.index("e5layers")].encode([ANGRY_EN])
    assert np.allclose(ours[:, :384], packaged[:, :384], atol=1e-5)  # layer 6: below the trained layers
    assert float(ours[0, -384:] @ packaged[0, -384:]) < 0.999
