"""CTranslate2's `model.bin`: read its variables, and write a Whisper whose encoder stops after its first layers.

The layout is that of `ctranslate2.specs.model_spec.ModelSpec._serialize` (binary version 6): the spec's name and
revision, then each variable (name, shape, dtype id, bytes), then aliases. CTranslate2's `encode` returns only the
last encoder layer (after the final LayerNorm), but the middle layers carry more of the voice's emotion across
speakers and rooms (docs/models/cross_corpus.md). CTranslate2 builds as many encoder layers as the file holds, so a
copy without the upper layers is an encoder whose `encode` returns LayerNorm(layer k): no new weights to ship.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = 6
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class Ct2FormatError(ValueError):
    """The file is not a CTranslate2 model this reader understands (the message names the file)."""


@dataclass(frozen=True)
class Variable:
    name: str
    shape: tuple[int, ...]
    dtype: int
    offset: int  # of the data, in the file
    nbytes: int


@dataclass(frozen=True)
class Ct2File:
    path: Path
    spec: str
    revision: int
    variables: dict[str, Variable]
    aliases: dict[str, str]

    @classmethod
    def read(cls, path: Path) -> Ct2File:
        raw = Path(path).read_bytes()
        at = 0

        def take(fmt: str) -> int:
            nonlocal at
            if at + struct.calcsize(fmt) > len(raw):
                raise Ct2FormatError(f"{path}: truncated at byte {at} of {len(raw)}")
            (value,) = struct.unpack_from(fmt, raw, at)
            at += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal at
            n = take("H")
            if n == 0 or at + n > len(raw):
                raise Ct2FormatError(f"{path}: bad string at byte {at}")
            text = raw[at : at + n - 1].decode("utf-8", errors="replace")
            at += n
            return text

        version = take("I")
        if version != VERSION:
            raise Ct2FormatError(f"{path}: binary version {version}, this reader knows version {VERSION}")
        spec, revision = string(), take("I")
        variables = {}
        for _ in range(take("I")):
            name = string()
            shape = tuple(take("I") for _ in range(take("B")))
            dtype, nbytes = take("B"), take("I")
            if dtype not in DTYPES or at + nbytes > len(raw):
                raise Ct2FormatError(f"{path}: variable {name}: dtype id {dtype}, {nbytes} B at byte {at}")
            variables[name] = Variable(name, shape, dtype, at, nbytes)
            at += nbytes
        aliases = {string(): string() for _ in range(take("I"))}
        if at != len(raw):
            raise Ct2FormatError(f"{path}: {len(raw) - at} trailing bytes")
        return cls(Path(path), spec, revision, variables, aliases)

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The variables whose names start with `prefix`, as numpy arrays in the file's dtypes."""
        raw = self.path.read_bytes()
        out = {}
        for v in self.variables.values():
            if v.name.startswith(prefix):
                dtype = np.dtype(DTYPES[v.dtype])
                out[v.name] = np.frombuffer(raw, dtype, v.nbytes // dtype.itemsize, v.offset).reshape(v.shape)
        return out

    def encoder_layers(self) -> int:
        """How many encoder layers the file holds (`encoder/layer_<i>/…`)."""
        parts = (name.split("/") for name in self.variables)
        return len({p[1] for p in parts if p[0] == "encoder" and p[1].startswith("layer_") and p[1][6:].isdigit()})


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("H", len(data) + 1) + data + b"\0"


def truncate_encoder(src: Path, dst: Path, layers: int, replace: dict[str, np.ndarray] | None = None) -> Path:
    """Copy the CTranslate2 Whisper model directory `src` to `dst`, keeping only the first `layers` encoder layers
    (the decoder is kept, so the model loads as a Whisper; only `encode` is meant to be called on it), with the
    variables named in `replace` given new values (same shape, cast to the file's dtype: a fine-tuned layer). The
    new `model.bin` is written under a temporary name and renamed, so a crash leaves no half file."""
    model = Ct2File.read(Path(src) / "model.bin")
    have = model.encoder_layers()
    if not 1 <= layers <= have:
        raise ValueError(f"{src}: cannot keep {layers} of {have} encoder layers")
    replace = replace or {}
    for name, value in replace.items():
        if name not in model.variables or tuple(np.shape(value)) != model.variables[name].shape:
            known = model.variables[name].shape if name in model.variables else "no such variable"
            raise ValueError(f"{src}: cannot replace {name} ({known}) by an array of shape {np.shape(value)}")
    dropped = {f"encoder/layer_{i}/" for i in range(layers, have)}
    kept = [v for v in model.variables.values() if not any(v.name.startswith(d) for d in dropped)]
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for other in Path(src).iterdir():
        if other.is_file() and other.name != "model.bin":
            shutil.copyfile(other, dst / other.name)
    partial = dst / "model.bin.partial"
    with open(model.path, "rb") as f, open(partial, "wb") as out:
        out.write(struct.pack("I", VERSION) + _string(model.spec) + struct.pack("I", model.revision))
        out.write(struct.pack("I", len(kept)))
        for v in kept:
            out.write(_string(v.name) + struct.pack("B", len(v.shape)) + struct.pack(f"{len(v.shape)}I", *v.shape))
            out.write(struct.pack("B", v.dtype) + struct.pack("I", v.nbytes))
            if v.name in replace:
                out.write(np.ascontiguousarray(replace[v.name], DTYPES[v.dtype]).tobytes())
            else:
                f.seek(v.offset)
                out.write(f.read(v.nbytes))
        out.write(struct.pack("I", len(model.aliases)))
        for alias, name in model.aliases.items():
            out.write(_string(alias) + _string(name))
    return partial.replace(dst / "model.bin")


def lora_merged(model: Ct2File, delta: Path) -> dict[str, np.ndarray]:
    """The weights of `model` that the low-rank delta file `delta` updates, merged (W + B·A, float32): its arrays
    are `lora:<variable>:a` [rank, in] and `lora:<variable>:b` [out, rank] (`pipelines.train.voice.finetune`)."""
    with np.load(delta, allow_pickle=False) as z:
        names = sorted({k.split(":")[1] for k in z.files if k.startswith("lora:")})
        if not names:
            raise Ct2FormatError(f"{delta}: no lora:<variable>:a/b arrays")
        current = model.arrays("encoder/")
        out = {}
        for name in names:
            if name not in current:
                raise Ct2FormatError(f"{delta}: {name} is not a variable of {model.path}")
            a, b = z[f"lora:{name}:a"].astype(np.float32), z[f"lora:{name}:b"].astype(np.float32)
            shape = current[name].shape
            if a.ndim != 2 or b.ndim != 2 or (b.shape[0], a.shape[1]) != shape or a.shape[0] != b.shape[1]:
                raise Ct2FormatError(f"{delta}: {name}: B {b.shape} · A {a.shape} does not fit {shape}")
            out[name] = current[name].astype(np.float32) + b @ a
        return out
