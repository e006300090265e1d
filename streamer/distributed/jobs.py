"""The job wire format `emotion-monitor/job/v1`: one utterance sent from an ingest node to the workers.

An MQTT payload is self-contained (it survives the ingest spool, MQTT 3.1.1 brokers and dead-letter replays):

    uint32 big-endian N | N bytes of UTF-8 JSON header | audio (FLAC, or raw PCM s16le), 16 kHz mono

Header keys: `schema` ("emotion-monitor/job/v1"), `id` (the `event_id` the event will carry: a replayed job
makes the same event), `node` and `stream` (the event's topic), `seq` (per stream, from 0 without gaps, so
consumers restore order: shared subscriptions are dispatched round-robin), `segment_id`, `source`, `start_s`,
`end_s`, `speech_s`, `pad_s` (silence after the audio whose encoder frames the voice head pools; 0 when
absent); wall-clock epoch seconds `wall_end` (the event's `time`), `speech_end_wall` (the last
speech sample arrived), `emitted_wall` (the segmenter closed the utterance) and `expires`; `audio`: `codec`
("flac" | "pcm_s16le"), `rate` (16000), `samples`.

Times in an `Utterance` are `time.monotonic()` of the process that made it; a job carries them as wall-clock
time and the worker maps them back onto its own clock, so latencies span the machines (given NTP).
"""

from __future__ import annotations

import io
import json
import struct
import time
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from streamer.event import TOPIC_ROOT, event_id, topic_safe
from streamer.frames import SAMPLE_RATE, Utterance

SCHEMA = "emotion-monitor/job/v1"
CONTENT_TYPE = "application/vnd.emotion-monitor.job.v1"
JOBS_ROOT = f"{TOPIC_ROOT}/jobs"
DEADLETTER_ROOT = f"{TOPIC_ROOT}/deadletter"
CODECS = {"flac": "flac", "pcm": "pcm_s16le"}
_LENGTH = struct.Struct(">I")


class JobError(ValueError):
    """A payload that is not a readable v1 job."""


@dataclass(frozen=True)
class Job:
    node: str
    seq: int
    utterance: Utterance
    expires: float  # epoch seconds

    @property
    def id(self) -> str:
        return event_id(self.node, self.utterance.stream, self.utterance.segment_id)


def job_topic(node: str, stream: str) -> str:
    return f"{JOBS_ROOT}/{topic_safe(node)}/{topic_safe(stream)}"


def deadletter_topic(job_topic_name: str) -> str:
    """`emotion/v1/deadletter/<node>/<stream>` for a job received on `emotion/v1/jobs/<node>/<stream>`."""
    return DEADLETTER_ROOT + job_topic_name.removeprefix(JOBS_ROOT)


def to_wall(monotonic: float) -> float:
    return time.time() - (time.monotonic() - monotonic)


def to_monotonic(wall: float) -> float:
    return time.monotonic() - (time.time() - wall)


def encode(job: Job, audio: str = "flac") -> bytes:
    u = job.utterance
    pcm = (np.clip(u.audio, -1.0, 1.0) * 32767).astype("<i2")
    if audio == "flac":
        buffer = io.BytesIO()
        sf.write(buffer, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        body = buffer.getvalue()
    elif audio == "pcm":
        body = pcm.tobytes()
    else:
        raise ValueError(f"job audio {audio!r}: use flac or pcm")
    header = {
        "schema": SCHEMA,
        "id": job.id,
        "node": job.node,
        "stream": u.stream,
        "seq": job.seq,
        "segment_id": u.segment_id,
        "source": u.source,
        "start_s": u.start_s,
        "end_s": u.end_s,
        "speech_s": u.speech_s,
        "pad_s": u.pad_s,
        "wall_end": u.wall_end,
        "speech_end_wall": to_wall(u.speech_end_arrived),
        "emitted_wall": to_wall(u.emitted),
        "expires": job.expires,
        "audio": {"codec": CODECS[audio], "rate": SAMPLE_RATE, "samples": len(pcm)},
    }
    raw = json.dumps(header, ensure_ascii=False).encode()
    return _LENGTH.pack(len(raw)) + raw + body


def header(payload: bytes) -> dict:
    """The JSON header alone (cheap: enough to name, route or expire a job without decoding its audio)."""
    if len(payload) < _LENGTH.size:
        raise JobError("payload shorter than its length prefix")
    (length,) = _LENGTH.unpack_from(payload)
    try:
        meta = json.loads(payload[_LENGTH.size : _LENGTH.size + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JobError(f"unreadable job header: {e}") from e
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise JobError(f"not a {SCHEMA} job")
    return meta


def decode(payload: bytes) -> Job:
    meta = header(payload)
    body = payload[_LENGTH.size + _LENGTH.unpack_from(payload)[0] :]
    try:
        codec, samples = meta["audio"]["codec"], meta["audio"]["samples"]
        if meta["audio"]["rate"] != SAMPLE_RATE:
            raise JobError(f"job audio at {meta['audio']['rate']} Hz, expected {SAMPLE_RATE}")
        if codec == "flac":
            pcm, _ = sf.read(io.BytesIO(body), dtype="int16")
        elif codec == "pcm_s16le":
            pcm = np.frombuffer(body, dtype="<i2")
        else:
            raise JobError(f"unknown job audio codec {codec!r}")
        if len(pcm) != samples:
            raise JobError(f"job audio has {len(pcm)} samples, its header says {samples}")
        utterance = Utterance(
            stream=meta["stream"],
            segment_id=int(meta["segment_id"]),
            audio=pcm.astype(np.float32) / 32768.0,
            start_s=float(meta["start_s"]),
            end_s=float(meta["end_s"]),
            speech_end_arrived=to_monotonic(float(meta["speech_end_wall"])),
            emitted=to_monotonic(float(meta["emitted_wall"])),
            wall_end=float(meta["wall_end"]),
            speech_s=float(meta["speech_s"]),
            pad_s=float(meta.get("pad_s", 0.0)),
            source=str(meta.get("source", "")),
        )
        return Job(node=meta["node"], seq=int(meta["seq"]), utterance=utterance, expires=float(meta["expires"]))
    except JobError:
        raise
    except (KeyError, TypeError, ValueError, sf.LibsndfileError) as e:
        raise JobError(f"unreadable job {meta.get('id')!r}: {type(e).__name__}: {e}") from e
