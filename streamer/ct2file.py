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


def truncate_encoder(src: Path, dst: Path, layers: int) -> Path:
    """Copy the CTranslate2 Whisper model directory `src` to `dst`, keeping only the first `layers` encoder layers
    (the decoder is kept, so the model loads as a Whisper; only `encode` is meant to be called on it). The new
    `model.bin` is written under a temporary name and renamed, so a crash leaves no half file."""
    model = Ct2File.read(Path(src) / "model.bin")
    have = model.encoder_layers()
    if not 1 <= layers <= have:
        raise ValueError(f"{src}: cannot keep {layers} of {have} encoder layers")
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
            f.seek(v.offset)
            out.write(f.read(v.nbytes))
        out.write(struct.pack("I", len(model.aliases)))
        for alias, name in model.aliases.items():
            out.write(_string(alias) + _string(name))
    return partial.replace(dst / "model.bin")
