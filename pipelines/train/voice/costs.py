"""What the voice recipes cost at run time: the encoder per input window, the prosody features, and the shipped
head's whole per-utterance path, plus how far the segmenter's cut moves the prosody it reads.

Measured beside the table (not in CI) because the figures depend on the machine; `--runtime-cost` prints them.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from pipelines.data import corpora as D
from pipelines.evaluate.metrics import median_ms
from pipelines.train.voice.inputs import FrameSource, VoiceData
from streamer.voice_heads import VoiceModel

log = logging.getLogger(__name__)


def encoder_cost(data: VoiceData, sources: list[FrameSource], n: int, seed: int) -> dict[FrameSource, float]:
    """Median encoder wall ms per UEM clip for each frame source (runtime settings: int8; recognition 2 threads,
    the voice branch's own pass 1), no cache."""
    from streamer.audio import load_audio

    clips = D.limit_records(data.clips[D.UEM], n, seed)
    audio = [load_audio(c.path) for c in clips]
    out = {}
    for source in sources:
        out[source] = median_ms(data.featurizer(source).frames_of, audio)
        log.info("encoder, %s: median %.0f ms per clip (%d clips)", source.name, out[source], len(audio))
    return out


PROSODY_COST = "prosody ms/utt"


def uses_prosody(name: str, cfg: dict) -> bool:
    rc = cfg["recipes"][name]
    return bool(rc.get("prosody")) or any(uses_prosody(m, cfg) for m in rc.get("members", []))


def prosody_cost(data: VoiceData, n: int, seed: int) -> float:
    """Median wall ms of `streamer.prosody.prosody_features` per UEM clip (decoded audio in, one core: numpy's FFT
    is single-threaded), no cache."""
    from streamer.audio import load_audio
    from streamer.prosody import prosody_features

    clips = D.limit_records(data.clips[D.UEM], n, seed)
    audio = [load_audio(c.path) for c in clips]
    ms = median_ms(prosody_features, audio)
    seconds = float(np.median([len(a) for a in audio])) / 16000
    log.info("prosody: median %.2f ms per clip (%d clips, median %.1f s)", ms, len(audio), seconds)
    return ms


def runtime_cost(data: VoiceData, model: VoiceModel, n: int, seed: int, repeats: int = 5) -> dict[str, float]:
    """What the voice costs per utterance at run time, on `n` UEM clips (decoded audio and cached encoder frames in,
    as one stream): the utterance's prosody (`VoiceModel.prosody_of`), the normalisations and the head
    (`VoiceModel.predict`) and the stream's history update (`StreamHistories.remember`), as `Engine` runs them on
    one worker thread. Per clip the fastest of `repeats` runs (the others pay for caches and other processes);
    then the median, 90th percentile and maximum over clips, wall and the thread's CPU time, in ms."""
    from streamer.adaptation import StreamHistories
    from streamer.audio import load_audio

    position = {id(c): i for i, c in enumerate(data.clips[D.UEM])}
    clips = D.limit_records(data.clips[D.UEM], n, seed)
    audio = [load_audio(c.path) for c in clips]
    source = FrameSource.of_info({"encoder_window_s": 10.0, **model.head.meta})
    frames = [np.asarray(data.frames(D.UEM, source)[position[id(c)]], np.float32) for c in clips]
    histories = StreamHistories()

    def utterance(a: np.ndarray, f: np.ndarray) -> None:
        prosody = model.prosody_of(a)
        model.predict(f, histories.get("bench"), prosody)
        histories.remember("bench", f, prosody)

    utterance(audio[0], frames[0])  # warm-up
    walls, cpus = [], []
    for a, f in zip(audio, frames, strict=True):
        runs = []
        for _ in range(repeats):
            w0, c0 = time.perf_counter(), time.thread_time()
            utterance(a, f)
            runs.append((time.perf_counter() - w0, time.thread_time() - c0))
        wall, cpu = min(runs)
        walls.append(1000 * wall)
        cpus.append(1000 * cpu)
    seconds = np.array([len(a) / 16000 for a in audio])
    return {
        "clips": len(audio),
        "clip_s_median": float(np.median(seconds)),
        "clip_s_max": float(seconds.max()),
        "wall_ms_median": float(np.median(walls)),
        "wall_ms_p90": float(np.percentile(walls, 90)),
        "wall_ms_max": float(np.max(walls)),
        "cpu_ms_median": float(np.median(cpus)),
        "cpu_ms_p90": float(np.percentile(cpus, 90)),
        "wall_ms_per_audio_s": float(np.median(np.array(walls) / seconds)),
    }


def cut_shift(data: VoiceData, model: VoiceModel, n: int, seed: int) -> dict[str, float]:
    """How far the prosody the runtime reads moves from what training read: each of `n` UEM clips, padded with 1 s of
    silence on both sides, goes through the live segmenter (default options) as a stream would; for the clips it
    cuts into one utterance, the prosody of the cut against that of the whole clip, per column, in units of the
    head's prosody prior std (median and 90th percentile of |difference| over clips)."""
    from streamer.audio import load_audio
    from streamer.frames import SAMPLE_RATE, AudioChunk
    from streamer.segmenter import Segmenter

    if model.prosody is None:
        return {}
    scale = np.sqrt(model.prosody.norm.var) if model.prosody.norm is not None else 1.0
    pad = np.zeros(SAMPLE_RATE, np.float32)
    shifts = []
    for clip in D.limit_records(data.clips[D.UEM], n, seed):
        audio = load_audio(clip.path)
        cutter = Segmenter("cut")
        cuts = cutter.push(AudioChunk(np.concatenate([pad, audio, pad]), 0.0)) + cutter.flush()
        cuts = [u for u in cuts if not (u.tentative or u.interim)]
        if len(cuts) == 1:
            shifts.append(np.abs(model.prosody.features(cuts[0].audio) - model.prosody.features(audio)) / scale)
    shifts = np.array(shifts)
    out = {"clips": float(len(shifts)), "of": float(n)}
    for name, column in zip(model.prosody.names, shifts.T, strict=True):
        out[name] = float(np.median(column))
        out[f"{name} p90"] = float(np.percentile(column, 90))
    return out
