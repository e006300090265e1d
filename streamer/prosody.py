"""Prosody of one utterance: pitch (F0), energy, spectral tilt, zero crossings and rhythm, as a small vector.

Whisper's encoder frames were trained for speech recognition and are partly blind to pitch and loudness, the classic
carriers of arousal. `prosody_features` summarises them cheaply (numpy only, one core: median 2 ms for a UEM clip of
2.3 s, about 5 ms for 7 s of continuous speech) for the voice head's prosody member (`pipelines.train.voice`,
recipes `prosody-*`, issue #3).

F0 is tracked YIN-style (de Cheveigné & Kawahara 2002) on the audio decimated to 8 kHz: per 20 ms hop, the
difference function of a 39 ms frame (25 ms plus the longest lag) over lags of 70–450 Hz is computed from one FFT
autocorrelation (per overlapping sample), cumulative-mean normalised, and the first dip under `YIN_THRESHOLD`
(refined to its local minimum and by parabolic interpolation) gives the period. Only active frames are searched, in
blocks small enough that no temporary array is served by a fresh mmap (page faults doubled the cost). A frame is
voiced when it has such a dip and its energy is within `ACTIVE_DB` of the utterance's loudest frame and above
`FLOOR_DB`. Pitch is in semitones re 100 Hz, so its statistics do not depend on the voice's register more than a
shift of the mean. Speakers differ in register and loudness far more than emotions move them: normalise the vector
per speaker / stream (`streamer.adaptation.StreamNorm` over the utterances' vectors) before a head uses it.

`ProsodyReader` is what a voice head reads of it (the columns it was trained on and their stream normalisation,
stored in the head file); the engine computes it once per utterance, from the segmenter's cut (`Utterance.audio`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.adaptation import FrameMoments, StreamNorm
from streamer.frames import SAMPLE_RATE
from streamer.models import replace_arrays

PROSODY_NAMES: tuple[str, ...] = (
    "f0_mean",  # mean pitch of the voiced frames, semitones re 100 Hz
    "f0_std",  # its standard deviation (semitones)
    "f0_range",  # 95th − 5th percentile (semitones)
    "f0_slope",  # least-squares slope over the utterance (semitones / s)
    "f0_delta",  # mean |change| between consecutive voiced frames (semitones per 20 ms hop): pitch movement
    "voiced_ratio",  # voiced frames / all frames
    "energy_mean",  # mean frame energy of the active frames (dB re full scale)
    "energy_std",  # its standard deviation (dB)
    "energy_range",  # 95th − 5th percentile (dB)
    "energy_slope",  # least-squares slope over the active frames (dB / s)
    "tilt",  # mean over voiced frames of the 1–4 kHz over 50 Hz–1 kHz energy (dB): flat = tense voice
    "zcr",  # mean zero-crossing rate (16 kHz, over each hop) of the active frames (crossings per sample)
    "voiced_rate",  # voiced stretches (≥ 2 hops) per second of active time: a syllable-rate proxy
    "active_ratio",  # active frames / all frames (the rest is pauses and silence)
    "log_active_s",  # log(1 + seconds of active speech)
)
PROSODY_SPEC = "prosody-v2:yin8k-w25ms-hop20ms-70-450Hz-th0.2-active40dB-floor-60dB-15"

HOP_S = 0.020
WINDOW_S = 0.025
F0_MIN, F0_MAX = 70.0, 450.0
YIN_THRESHOLD = 0.2
ACTIVE_DB = 40.0  # active: frame energy within this many dB of the utterance's loudest frame ...
FLOOR_DB = -60.0  # ... and above this (dB re full scale)
MIN_RUN = 2  # hops: a voiced stretch counts for `voiced_rate` from 40 ms on
_RATE = 8000  # F0 analysis rate (the audio decimated by 2)
_BLOCK = 24  # frames analysed together (20–24 measured fastest)
_EPS = 1e-10


def _frames(x: np.ndarray, length: int, hop: int) -> np.ndarray:
    """[n_frames, length] strided view of x (zero-padded to at least one frame)."""
    if len(x) < length:
        x = np.pad(x, (0, length - len(x)))
    n = 1 + (len(x) - length) // hop
    return np.lib.stride_tricks.as_strided(x, (n, length), (x.strides[0] * hop, x.strides[0]), writeable=False)


def _slope(t: np.ndarray, v: np.ndarray) -> float:
    if len(v) < 2:
        return 0.0
    tc = t - t.mean()
    denom = float(np.dot(tc, tc))
    return float(np.dot(tc, v - v.mean()) / denom) if denom > 0 else 0.0


def _spread(v: np.ndarray) -> tuple[float, float, float]:
    """mean, std, 95th − 5th percentile (0s for no values)."""
    if len(v) == 0:
        return 0.0, 0.0, 0.0
    lo, hi = np.percentile(v, [5, 95])
    return float(v.mean()), float(v.std()), float(hi - lo)


def _clean(audio: np.ndarray) -> np.ndarray:
    """A float32 copy with NaN / inf as silence."""
    x = np.array(audio, dtype=np.float32).ravel()
    x[~np.isfinite(x)] = 0.0
    return x


def _block(fr: np.ndarray, consts: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(has a YIN dip, period in samples, tilt in dB) of frames [n, length] at 8 kHz."""
    tau_min, tau_max, n_fft, low, high = consts
    length = fr.shape[1]
    spec = np.fft.rfft(fr, n_fft)
    power_spec = spec.real**2 + spec.imag**2
    corr = np.fft.irfft(power_spec, n_fft)[:, : tau_max + 1]  # r(τ) = Σ_{j<L-τ} x_j x_{j+τ}
    sq = fr * fr
    head = np.cumsum(sq[:, :tau_max], axis=1)  # [:, k] = Σ_{j≤k} x_j²
    tail = np.cumsum(sq[:, : length - tau_max - 1 : -1], axis=1)  # [:, k] = Σ_{j≥L-1-k} x_j²
    total = sq.sum(axis=1)[:, None]
    taus = np.arange(tau_max + 1)
    # d(τ) = Σ_{j<L-τ} (x_j − x_{j+τ})² = E[0, L-τ) + E[τ, L) − 2 r(τ), per overlapping sample
    e_start = np.concatenate([total, total - tail], axis=1)  # E[0, L-τ)
    e_end = np.concatenate([total, total - head], axis=1)  # E[τ, L)
    diff = np.maximum((e_start + e_end - 2 * corr) / (length - taus), 0.0)
    diff[:, 0] = 0.0
    cum = np.cumsum(diff[:, 1:], axis=1)
    cmnd = np.ones_like(diff)
    cmnd[:, 1:] = diff[:, 1:] * taus[1:] / np.maximum(cum, _EPS)

    band = cmnd[:, tau_min:]
    below = band < YIN_THRESHOLD
    first = np.argmax(below, axis=1)
    # the dip's own minimum: search from the first lag under the threshold to 1.5 × that lag (not the octave below)
    idx = np.arange(band.shape[1])[None, :]
    window = (idx >= first[:, None]) & (idx + tau_min <= np.ceil(1.5 * (first[:, None] + tau_min)))
    best = np.argmin(np.where(window, band, np.inf), axis=1) + tau_min
    rows = np.arange(len(fr))  # parabolic interpolation of the dip
    left, mid = cmnd[rows, np.maximum(best - 1, 1)], cmnd[rows, best]
    right = cmnd[rows, np.minimum(best + 1, tau_max)]
    curv = left + right - 2 * mid
    safe = np.abs(curv) > _EPS
    shift = np.where(safe, 0.5 * (left - right) / np.where(safe, curv, 1.0), 0.0)
    tilt = 10 * np.log10((power_spec[:, high].sum(axis=1) + _EPS) / (power_spec[:, low].sum(axis=1) + _EPS))
    return below.any(axis=1), best + np.clip(shift, -1.0, 1.0), tilt


def track(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per 20 ms hop: F0 in Hz (0 where unvoiced), energy in dB re full scale (of the frame's 39 ms below 4 kHz), and
    the 1–4 kHz over 50 Hz–1 kHz energy ratio in dB. `audio` is 16 kHz mono float32."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"prosody needs {SAMPLE_RATE} Hz audio, got {sample_rate}")
    return _track(_clean(audio))


def _track(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(x) % 2:
        x = np.append(x, np.float32(0))
    x8 = 0.5 * (x[0::2] + x[1::2])  # decimate by 2: the pair mean is a crude low-pass, enough for F0 ≤ 450 Hz
    hop, w = int(HOP_S * _RATE), int(WINDOW_S * _RATE)
    tau_min, tau_max = int(_RATE / F0_MAX), int(np.ceil(_RATE / F0_MIN))
    length = w + tau_max
    n_fft = 1 << int(np.ceil(np.log2(length + tau_max)))  # linear (not circular) autocorrelation up to τ_max
    bin_hz = _RATE / n_fft
    low = slice(int(np.ceil(50 / bin_hz)), int(1000 / bin_hz))
    high = slice(int(1000 / bin_hz), int(4000 / bin_hz))
    consts = (tau_min, tau_max, n_fft, low, high)
    frames = _frames(x8, length, hop)
    energy = 10 * np.log10(np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / length + _EPS)
    active = np.flatnonzero((energy > energy.max() - ACTIVE_DB) & (energy > FLOOR_DB))
    f0, tilt = np.zeros(len(frames)), np.zeros(len(frames))
    # the active frames only, in blocks: every temporary stays under glibc's mmap threshold (128 KiB), so no page
    # faults per call
    for i in range(0, len(active), _BLOCK):
        rows = active[i : i + _BLOCK]
        has_dip, period, tilt[rows] = _block(frames[rows].astype(np.float64), consts)
        f0[rows] = np.where(has_dip, _RATE / np.maximum(period, 1.0), 0.0)
    return f0, energy, tilt


def prosody_features(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The `PROSODY_NAMES` vector (float32) of one utterance; finite for any input (silence, noise, empty: the pitch
    statistics are 0 when no frame is voiced, the energy ones are those of all frames when none is active)."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"prosody needs {SAMPLE_RATE} Hz audio, got {sample_rate}")
    x = _clean(audio)
    f0, energy, tilt = _track(x)
    n = len(f0)
    t = np.arange(n) * HOP_S
    voiced = f0 > 0
    active = (energy > energy.max() - ACTIVE_DB) & (energy > FLOOR_DB)
    semitones = 12 * np.log2(np.maximum(f0[voiced], 1.0) / 100.0)
    f0_mean, f0_std, f0_range = _spread(semitones)
    # consecutive voiced frames only (a jump across an unvoiced gap is not pitch movement)
    both = voiced[1:] & voiced[:-1]
    st_all = 12 * np.log2(np.maximum(f0, 1.0) / 100.0)
    f0_delta = float(np.mean(np.abs(np.diff(st_all)[both]))) if both.any() else 0.0
    e = energy[active] if active.any() else energy
    te = t[active] if active.any() else t
    e_mean, e_std, e_range = _spread(e)
    # zero crossings per sample at 16 kHz over each hop
    hop16 = int(HOP_S * SAMPLE_RATE)
    crossings = np.signbit(x[1:]) != np.signbit(x[:-1])
    blocks = min(len(crossings) // hop16, n)
    zcr = np.zeros(n)
    zcr[:blocks] = np.count_nonzero(crossings[: blocks * hop16].reshape(blocks, hop16), axis=1) / hop16
    # voiced stretches of at least MIN_RUN frames
    edges = np.diff(np.concatenate([[0], voiced.astype(np.int8), [0]]))
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    active_s = float(active.sum()) * HOP_S
    out = np.array(
        [
            f0_mean,
            f0_std,
            f0_range,
            _slope(t[voiced], semitones),
            f0_delta,
            float(voiced.mean()) if n else 0.0,
            e_mean,
            e_std,
            e_range,
            _slope(te, e),
            float(tilt[voiced].mean()) if voiced.any() else 0.0,
            float(zcr[active].mean()) if active.any() else 0.0,
            float(np.sum(runs >= MIN_RUN)) / active_s if active_s > 0 else 0.0,
            float(active.mean()) if n else 0.0,
            float(np.log1p(active_s)),
        ],
        dtype=np.float64,
    )
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


PREFIX = "prosody."  # keys of a voice head's prosody block: prosody.names, prosody.spec, prosody.norm.*


@dataclass(frozen=True)
class ProsodyReader:
    """What a voice head reads of an utterance's prosody: the `names` columns of `prosody_features` (a head trained
    without the cut-dependent ones drops them), normalised by the stream's past vectors with `norm` (a `StreamNorm`
    over one row per utterance, as `pipelines.train.voice` trained it; None: the vector as it is). Stored in the
    head file under `prosody.`; a file whose prosody was extracted by other code (`spec`) is refused."""

    names: tuple[str, ...]
    norm: StreamNorm | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.names) - set(PROSODY_NAMES))
        if unknown or not self.names:
            raise ValueError(f"prosody columns {list(self.names)}: unknown {unknown} (known: {list(PROSODY_NAMES)})")
        if self.norm is not None and self.norm.mean.shape != (len(self.names),):
            raise ValueError(f"prosody normalisation of {self.norm.mean.shape} for {len(self.names)} columns")

    @property
    def columns(self) -> list[int]:
        return [PROSODY_NAMES.index(n) for n in self.names]

    def features(self, audio: np.ndarray) -> np.ndarray:
        """The raw vector [len(names)] of one utterance (what the stream's history keeps)."""
        return prosody_features(audio)[self.columns]

    def normalise(self, vector: np.ndarray, history: FrameMoments | None) -> np.ndarray:
        """`vector` as the head reads it: normalised by the stream's past vectors (`history`; None: the prior)."""
        if self.norm is None:
            return np.asarray(vector, np.float32)
        return self.norm.apply(np.asarray(vector).reshape(1, -1), history)[0]

    def arrays(self) -> dict[str, np.ndarray]:
        norm = {} if self.norm is None else self.norm.arrays(f"{PREFIX}norm.")
        return {f"{PREFIX}names": np.array(self.names), f"{PREFIX}spec": np.array(PROSODY_SPEC), **norm}

    def save_into(self, path: Path) -> None:
        """Add (or replace) this block in an existing head file."""
        replace_arrays(path, PREFIX, self.arrays())

    @classmethod
    def load(cls, path: Path) -> ProsodyReader | None:
        """The prosody a voice head file reads, or None when it reads none (every head before v4)."""
        with np.load(path, allow_pickle=False) as z:
            if f"{PREFIX}names" not in z.files:
                return None
            names, spec = tuple(str(n) for n in z[f"{PREFIX}names"]), str(z[f"{PREFIX}spec"])
        if spec != PROSODY_SPEC:
            raise ValueError(f"{path}: trained on prosody {spec}, this code computes {PROSODY_SPEC}: retrain the head")
        return cls(names, StreamNorm.load(path, f"{PREFIX}norm."))
