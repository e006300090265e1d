"""Leave-one-corpus-out scoring (pipelines.evaluate.cross_corpus) and the Urdu reader it needs. The real-data runs
are skipped when ../shared/data lacks a speech corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.data import corpora as D
from pipelines.evaluate import cross_corpus as X
from pipelines.evaluate.metrics import shared_label_f1
from pipelines.train.voice.inputs import FrameSource, VoiceData
from pipelines.train.voice.recipes import DEFAULT_CONFIG
from streamer.frames import LABELS


def need_corpora() -> None:
    for name in X.CORPORA:
        if not (D.data_dir() / name).is_dir():
            pytest.skip(f"{name} not found under {D.data_dir()} (set EMOTION_DATA_DIR)")


def test_loco_config_trains_every_member_on_the_other_corpora() -> None:
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    name = "L3-ens-lr+attn+aug-x3+prosody-nodur-sn"
    out = X.loco_config(cfg, name, [D.EMODB, D.URDU])
    assert out["eval_dataset"] == D.EMODB
    members = ["L3-meanstd-lr-sn", "L3-attn+aug-sn", "L3-attn+aug-s2-sn", "L3-prosody-nodur-lr-sn"]
    assert all(out["recipes"][m]["datasets"] == [D.EMODB, D.URDU] for m in members)
    assert cfg["recipes"]["L3-meanstd-lr-sn"]["datasets"][0] == D.UEM  # the config itself is untouched
    assert FrameSource.of(out["recipes"]["L3-attn+aug-sn"]) == FrameSource(0.0, 3)
    assert set(cfg["cross_corpus"]) <= set(cfg["recipes"]) and cfg["ship"] in cfg["cross_corpus"]


def test_a_fine_tuned_recipe_reads_a_layer_tuned_on_the_training_corpora_only() -> None:
    """Each split's fine-tuned layer is named by (and trained on) that split's training corpora, so the held-out
    corpus never shapes the encoder; in-corpus scoring leaves the held-out speakers out of it too."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    out = X.loco_config(cfg, "L3ft-ens-lr+attn+aug-x3+prosody-nodur-sn", [D.URDU, D.EMODB])
    source = FrameSource.of(out["recipes"]["L3ft-attn+aug-sn"])
    assert source == FrameSource(0.0, 3, f"lora8-chan@{D.EMODB}+{D.URDU}")
    assert FrameSource.of(out["recipes"]["L3-prosody-nodur-lr-sn"]).tuned is None
    rc = {**cfg["recipes"]["L3ft-meanstd-lr"], "tuned_without": ["test2", "test1"]}
    assert FrameSource.of(rc).tuned.endswith("-test1-test2")
    with pytest.raises(ValueError, match="layers"):
        FrameSource.of({"tuned": "lora8-chan", "datasets": [D.UEM]})


def test_score_argmax_is_restricted_to_the_shared_labels() -> None:
    """A clip whose top label is one the held-out corpus lacks counts as its best shared label, not as an error."""
    proba = np.zeros((4, len(LABELS)))
    proba[:, LABELS.index("fear")] = 0.9  # Urdu has no fear
    for i, label in enumerate(["anger", "joy", "neutral", "sadness"]):
        proba[i, LABELS.index(label)] = 0.1
    y = np.array(["anger", "joy", "neutral", "sadness"])
    f1, per = shared_label_f1(y, proba, ["anger", "joy", "neutral", "sadness"])
    assert f1 == 1.0 and per.tolist() == [1.0] * 4
    f1, _ = shared_label_f1(y[::-1], proba, ["anger", "joy", "neutral", "sadness"])
    assert f1 == 0.0


def test_urdu_reader() -> None:
    need_corpora()
    loaded = D.read_urdu()
    assert loaded.label_counts() == {"anger": 100, "disgust": 0, "fear": 0, "joy": 100, "neutral": 100, "sadness": 100}
    assert len({c.speaker for c in loaded.records}) == 29 and all(c.speaker.startswith("urdu-") for c in loaded.records)


def test_tiny_leave_one_corpus_out_run(tmp_path: Path, monkeypatch) -> None:
    """Each corpus held out in turn, on a few clips each: a plain LR (cold = causal) and a stream-normalised one
    (causal differs), the report listing both."""
    need_corpora()
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    data = VoiceData(None, D.REPO_ROOT / ".cache" / "features", 0, limit=48)
    plain, proba = X.evaluate("meanstd-lr", cfg, data)
    assert proba.cold.shape == (sum(h.n for h in plain), len(LABELS)) and set(proba.corpus) == set(X.CORPORA)
    assert [h.corpus for h in plain] == list(X.CORPORA)
    assert plain[2].labels == ("anger", "joy", "neutral", "sadness") and plain[0].labels == tuple(LABELS)
    assert all(0 <= h.cold <= 1 and h.cold == h.causal for h in plain)
    normed, _ = X.evaluate("meanstd-lr-sn", cfg, data)
    assert any(h.cold != h.causal for h in normed)
    out = tmp_path / "cc.md"
    monkeypatch.setattr(X, "PROBA_CACHE", tmp_path / "proba")  # not the real run's probabilities
    assert X.main(["--recipes", "meanstd-lr", "--limit", "48", "--out", str(out)]) == 0
    md = out.read_text(encoding="utf-8")
    assert "| `meanstd-lr` |" in md and X.result_path(out, "meanstd-lr").is_file()
    saved = X.Probabilities.load(tmp_path / "proba" / "meanstd-lr_proba.npz")
    np.testing.assert_allclose(saved.cold, proba.cold)
    assert "`ens-lr+attn+aug-x3`" not in md  # listed in the config, but not scored into this folder
