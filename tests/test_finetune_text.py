"""The transformers fine-tuning path on a tiny randomly initialised BERT that the test builds (no hub, no weights)."""

import json

import numpy as np
import pytest

from pipelines.data.corpora import TextRow
from pipelines.evaluate.report import macro_f1
from pipelines.train.finetune_text import FinetuneOptions, finetune
from streamer.frames import LABELS

pytest.importorskip("transformers", reason="the fine-tuning path needs the train extra (transformers)")

CUES = {"anger": "furioso", "disgust": "asco", "fear": "miedo", "joy": "feliz", "neutral": "mesa", "sadness": "triste"}
FILLER = ["el", "la", "de", "que", "un", "muy", "hoy", "casa", "coche", "perro", "calle", "ayer"]


def _rows(n_per_label: int = 24) -> list[TextRow]:
    """Sentences whose only signal is one cue word per label, among random filler; one video per 4 rows."""
    rng = np.random.default_rng(0)
    rows = []
    for label in LABELS:
        for k in range(n_per_label):
            words = [*rng.choice(FILLER, size=5), CUES[label]]
            rng.shuffle(words)
            rows.append(TextRow("synthetic", f"{label}{k}", label, " ".join(words), f"{label}-video{k // 4}", "train"))
    return rows


@pytest.fixture
def tiny_bert(tmp_path):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *CUES.values()]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)}, do_lower_case=True)
    assert tokenizer.unk_token_id not in tokenizer("hoy feliz")["input_ids"]  # a real vocabulary
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,  # another head than ours: fine-tuning must replace it
    )
    model_dir = tmp_path / "tiny-bert"
    torch.manual_seed(0)  # the random initial weights: the run is deterministic
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def test_finetuning_learns_keeps_the_best_epoch_and_reloads(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "run"
    opts = FinetuneOptions(lr=3e-3, batch_size=8, epochs=10, val_folds=5, threads=1)
    metrics = finetune(_rows(), tiny_bert, out, opts)
    scores = [e["val_macro_f1"] for e in metrics["epochs"]]
    assert metrics["best_val_macro_f1"] == max(scores) and scores[metrics["best_epoch"] - 1] == max(scores)
    assert metrics["best_val_macro_f1"] > 0.5  # chance is 1/6, an untrained head 0.04: the cue words were learnt
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == metrics["best_epoch"]
    assert (out / "model.safetensors").is_file()

    model = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    rows = _rows()
    logits = model(**tokenizer([r.text for r in rows], return_tensors="pt", padding=True)).logits
    predicted = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    assert macro_f1([r.label for r in rows], predicted) > 0.5  # the saved epoch, not an untrained head


def test_a_model_that_is_not_on_disk_is_an_error_not_a_download(tmp_path):
    with pytest.raises(OSError):
        finetune(_rows(4), "dccuchile/bert-base-spanish-wwm-cased", tmp_path / "run", FinetuneOptions(epochs=1))
