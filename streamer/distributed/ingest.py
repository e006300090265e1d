"""The ingest role: a source cut into utterances by the VAD, each published as a job (QoS 1) for the workers.

Jobs go through the same durable spool as `run`'s events (`MqttSink`): while the broker is away they wait on
disk, and they leave only once the broker acknowledged them. The models are not loaded here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from streamer.distributed import DistributedOptions
from streamer.distributed.jobs import CONTENT_TYPE, JOBS_ROOT, SCHEMA, Job, encode, job_topic
from streamer.frames import SAMPLE_RATE, Utterance
from streamer.publisher import MqttOptions, MqttSink
from streamer.segmenter import Segmenter, SegmenterOptions
from streamer.sources import Source

log = logging.getLogger(__name__)


class JobPublisher(MqttSink):
    """An `MqttSink` that also publishes jobs: binary payloads, expiring, with their own spool file (a `run` on the
    same node keeps its own)."""

    def __init__(self, opts: MqttOptions, url: str, node: str, distributed: DistributedOptions) -> None:
        super().__init__(opts, url, node)
        self.distributed = distributed
        self.jobs = 0
        self.job_bytes = 0
        self.audio_s = 0.0

    def _spool_path(self) -> Path | None:
        path = super()._spool_path()
        return path.with_name(f"jobs-{path.name}") if path and self.opts.spool == "auto" else path

    def send_job(self, utterance: Utterance, seq: int) -> None:
        job = Job(self.node, seq, utterance, expires=time.time() + self.distributed.job_expiry_s)
        payload = encode(job, self.distributed.audio)
        self.spool.append(job_topic(self.node, utterance.stream), payload)
        self.jobs += 1
        self.job_bytes += len(payload)
        self.audio_s += len(utterance.audio) / SAMPLE_RATE
        self._wakeup.set()

    def _properties(self, topic: str):
        properties = super()._properties(topic)
        if properties is not None and topic.startswith(JOBS_ROOT + "/"):
            properties.ContentType = CONTENT_TYPE
            properties.MessageExpiryInterval = self.distributed.job_expiry_s
            properties.UserProperty = [("schema", SCHEMA)]
        return properties


@dataclass
class IngestStats:
    jobs: int = 0
    error: str | None = None


async def ingest_stream(
    source: Source, publisher: JobPublisher, stream: str, segmenter: SegmenterOptions | None = None
) -> IngestStats:
    """Cut `source` into utterances and publish each as a job until the source ends or the task is cancelled
    (SIGTERM); then the utterance in progress is finished. Only final utterances become jobs: the tentative ones
    (a speculative or interim guess at an utterance still open) serve an engine in the same process."""
    stats = IngestStats()
    cutter = Segmenter(stream, segmenter, source.name)

    def publish(utterances: list[Utterance]) -> None:
        for utterance in utterances:
            if not utterance.tentative:
                publisher.send_job(utterance, stats.jobs)
                stats.jobs += 1

    publisher.stream_started(stream, None, None)
    try:
        async with contextlib.aclosing(source.chunks()) as chunks:
            async for chunk in chunks:
                publish(cutter.push(chunk))
    except asyncio.CancelledError:
        log.info("stream %s: stopping", stream)
    except Exception as e:  # a broken source ends its own stream only
        stats.error = f"{type(e).__name__}: {e}"
        log.error("stream %s: source %s failed: %s", stream, source.name, e)
    finally:
        publish(cutter.flush())
        publisher.stream_ended(stream, None, None)
    return stats
