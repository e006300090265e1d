"""Decoding and conditioning of audio: anything in, 16 kHz mono float32 out, or a clear `AudioError`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from streamer.frames import SAMPLE_RATE

log = logging.getLogger(__name__)

MAX_RATE = 384_000


class AudioError(ValueError):
    """Audio that cannot be used, with a message a person can act on."""


def condition(samples: np.ndarray, rate: int) -> np.ndarray:
    """Return 16 kHz mono float32 in [-1, 1]; NaN/inf become silence, extreme values are clipped.

    `samples` is [n] or [n, channels]. Integer PCM is scaled to [-1, 1].
    """
    if not 1_000 <= rate <= MAX_RATE:
        raise AudioError(f"sample rate {rate} Hz is outside 1000..{MAX_RATE} Hz")
    x = np.asarray(samples)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    if x.ndim == 2:
        if x.shape[1] == 0:
            raise AudioError("audio has no channels")
        x = x.mean(axis=1)
    elif x.ndim != 1:
        raise AudioError(f"audio must be [samples] or [samples, channels], got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x)
    if bad.any():
        log.warning("replaced %d non-finite samples (NaN/inf) with silence", int(bad.sum()))
        x = np.where(bad, np.float32(0.0), x)
    if rate != SAMPLE_RATE and len(x):
        x = soxr.resample(np.clip(x, -1.0, 1.0), rate, SAMPLE_RATE)
    return np.ascontiguousarray(np.clip(x, -1.0, 1.0), dtype=np.float32)  # again: resampling rings past ±1


class StreamConditioner:
    """`condition` for a live stream: the resampler keeps its state across chunks (no clicks at chunk edges)."""

    def __init__(self, rate: int, channels: int = 1) -> None:
        condition(np.zeros((0, channels), np.float32), rate)  # validates rate and channels
        self.rate, self.channels = rate, channels
        self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32") if rate != SAMPLE_RATE else None

    def __call__(self, pcm: np.ndarray, last: bool = False) -> np.ndarray:
        """`pcm`: int16 [n, channels] → 16 kHz mono float32."""
        mono = condition(pcm.reshape(-1, self.channels), SAMPLE_RATE)
        if self._resampler is None:
            return mono
        return np.clip(self._resampler.resample_chunk(mono, last=last), -1.0, 1.0)


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Signed 16-bit little-endian PCM → float32; a trailing odd byte is an error, not silently dropped."""
    if len(data) % 2:
        raise AudioError(f"PCM16 data has an odd number of bytes ({len(data)})")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def _ulaw_table() -> np.ndarray:
    """G.711 μ-law byte → linear PCM16 (ITU-T G.711; the decoder `audioop.ulaw2lin` had before Python 3.13)."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.int16)


ULAW_TO_PCM16 = _ulaw_table()


def ulaw_to_pcm16(data: bytes) -> np.ndarray:
    """μ-law bytes (8-bit G.711, as telephony sends them) → int16 samples."""
    return ULAW_TO_PCM16[np.frombuffer(data, dtype=np.uint8)]


def load_audio(path: str | Path) -> np.ndarray:
    """Decode a file (wav/flac/ogg/mp3 via libsndfile, anything else via PyAV) to 16 kHz mono float32."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: file is empty")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as sf_error:  # libsndfile cannot read it: try FFmpeg's decoders
        samples, rate = _decode_with_av(path, sf_error)
    return condition(samples, int(rate))


def _decode_with_av(path: Path, first_error: Exception) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioError(f"{path}: no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            parts = [
                out.to_ndarray().reshape(-1) for frame in container.decode(stream) for out in resampler.resample(frame)
            ]
    except AudioError:
        raise
    except Exception as av_error:
        raise AudioError(f"{path}: unreadable audio ({first_error}; {av_error})") from av_error
    if not parts:
        raise AudioError(f"{path}: unreadable audio, no samples could be decoded ({first_error})")
    return np.concatenate(parts)[:, None], SAMPLE_RATE
