"""Scale-out mode: `emotion-monitor ingest` cuts utterances and publishes them as jobs; `emotion-monitor worker`
processes (MQTT v5 shared subscription, persistent session, manual acknowledgement) and publishes the events
exactly as `run` would. `jobs` is the wire format, `ingest` and `worker` the two roles."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistributedOptions:
    """Shared by both roles, so one config file serves a whole deployment."""

    group: str = "emotion-workers"  # the shared-subscription group ($share/<group>/…); one pool of workers each
    worker_id: str | None = None  # fixed per worker: it names the persistent session; default: the host name
    jobs: str = "emotion/v1/jobs/#"  # the job filter the workers share; narrow it to give a pool certain nodes
    audio: str = "flac"  # job audio: flac (lossless, about half of pcm) | pcm (16 kHz int16 little-endian)
    job_expiry_s: int = 120  # a job older than this is skipped (MQTT v5 message expiry + a check in the worker)
    session_expiry_s: int = 300  # a dead worker's session (its unacknowledged and queued jobs) waits this long
    max_inflight: int = 16  # unacknowledged jobs a worker holds (MQTT v5 Receive Maximum); its batching window
    max_attempts: int = 3  # a job that failed this often goes to emotion/v1/deadletter/<node>/<stream>
    retry_delay_s: float = 1.0  # pause between attempts of a failing job
