"""The worker role: take jobs from a shared subscription, recognise and classify them, publish the events.

Delivery is at least once and events are idempotent (the job's id is the event's `event_id`):
- A fixed client id with a persistent session (clean start off, session expiry) and manual acknowledgement: a job
  is acknowledged only once its event (or dead letter) was acknowledged by the broker, so the jobs a killed worker
  held are delivered again when it reconnects with the same id. Mosquitto keeps them (and the new jobs its
  round-robin hands the offline session) for `session_expiry_s`; restart workers under a supervisor.
- Concurrent jobs meet in the shared `Engine`, which batches them; MQTT v5 Receive Maximum (`max_inflight`)
  bounds how many a worker holds.
- A job past its `expires` is acknowledged and skipped (counted); a job that failed `max_attempts` times goes to
  `emotion/v1/deadletter/<node>/<stream>` with the error and the original payload. Attempts are counted on disk
  per worker, so a job that kills the process is counted too; a broker that hands a redelivered job to another
  group member (EMQX may) restarts its count there, so a job may get up to `max_attempts` × workers attempts.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from streamer.distributed import DistributedOptions
from streamer.distributed.jobs import JOBS_ROOT, JobError, deadletter_topic, decode, header
from streamer.event import iso_utc, topic_safe
from streamer.metrics import HEALTH
from streamer.models import cache_dir
from streamer.pipeline import Engine
from streamer.publisher import MqttOptions, MqttSink

log = logging.getLogger(__name__)


class AttemptLog:
    """Attempts per job id in SQLite: survives a worker killed by the job it was processing."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS attempts (job TEXT PRIMARY KEY, n INTEGER NOT NULL)")

    def bump(self, job: str) -> int:
        """Count one more attempt; the count so far, this one included."""
        query = "INSERT INTO attempts VALUES (?, 1) ON CONFLICT(job) DO UPDATE SET n = n + 1 RETURNING n"
        return self._db.execute(query, (job,)).fetchone()[0]

    def forget(self, job: str) -> None:
        self._db.execute("DELETE FROM attempts WHERE job = ?", (job,))

    def close(self) -> None:
        self._db.close()


@dataclass
class WorkerStats:
    jobs: int = 0
    events: int = 0
    expired: int = 0
    deadletter: int = 0
    failed_attempts: int = 0


def _job_key(payload: bytes) -> str:
    """The job's id, or a digest of a payload too broken to name itself (its attempts are counted all the same)."""
    try:
        return str(header(payload)["id"])
    except (JobError, KeyError):
        return "sha256:" + hashlib.sha256(payload).hexdigest()


class Worker(MqttSink):
    """An `MqttSink` (status, Last Will, health, requests, retained last state, reconnects) that also consumes
    `$share/<group>/<jobs>` and publishes each job's event on the ingest node's topics."""

    def __init__(self, opts: MqttOptions, url: str, engine: Engine, distributed: DistributedOptions) -> None:
        self.worker_id = topic_safe(distributed.worker_id or socket.gethostname().split(".")[0] or "worker")
        # Events are published by the job that made them, before its acknowledgement: no spool needed.
        opts = dataclasses.replace(
            opts, spool="memory", protocol="5", homeassistant=False, client_id=f"emotion-monitor-{self.worker_id}"
        )
        super().__init__(opts, url, f"worker-{self.worker_id}")
        self.engine, self.distributed = engine, distributed
        self.subscription = f"$share/{distributed.group}/{distributed.jobs}"
        self.attempts = AttemptLog(cache_dir() / "worker" / f"{self.worker_id}.sqlite")
        self.stats = WorkerStats()
        self.ready = asyncio.Event()
        self._jobs: set[asyncio.Task] = set()
        self._connection = None

    def _client(self, **overrides):
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = self.distributed.session_expiry_s
        session.ReceiveMaximum = self.distributed.max_inflight
        client = super()._client(clean_start=False, properties=session, **overrides)
        client._client.manual_ack_set(True)  # aiomqtt does not expose it; paho acknowledges in `ack`
        return client

    async def _subscribe(self, client) -> None:
        self._connection = client
        await client.subscribe(self.subscription, qos=1)
        if not self.ready.is_set():
            log.info("worker %s ready: %s", self.worker_id, self.subscription)
            self.ready.set()
        await super()._subscribe(client)

    async def _received(self, client, message) -> None:
        if str(message.topic).startswith(JOBS_ROOT + "/"):
            task = asyncio.create_task(self._job(client, str(message.topic), bytes(message.payload), message.mid))
            self._jobs.add(task)
            task.add_done_callback(self._jobs.discard)
            return
        await super()._received(client, message)
        client._client.ack(message.mid, message.qos)

    async def _job(self, client, topic: str, payload: bytes, mid: int) -> None:
        import aiomqtt

        key = _job_key(payload)
        self.stats.jobs += 1
        try:
            await self._settle(client, topic, payload, key)
        except aiomqtt.MqttError as e:  # not acknowledged: the broker delivers the job again after a reconnect
            log.warning("job %s: connection lost before its event was acknowledged (%s); it comes again", key, e)
            return
        self.attempts.forget(key)
        client._client.ack(mid, 1)

    async def _settle(self, client, topic: str, payload: bytes, key: str) -> None:
        """Take one job to its end: its event published, or skipped as expired, or dead-lettered."""
        error = "the worker stopped while processing it"  # what the attempts counted before this run met
        while (attempt := self.attempts.bump(key)) <= self.distributed.max_attempts:
            try:
                job = decode(payload)
                if job.expires < time.time():
                    self.stats.expired += 1
                    HEALTH.count("expired")
                    log.warning("job %s expired %.1f s ago: skipped", key, time.time() - job.expires)
                    return
                event = await self.engine.aprocess(job.utterance, job.seq)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                self.stats.failed_attempts += 1
                log.warning("job %s: attempt %d of %d failed: %s", key, attempt, self.distributed.max_attempts, error)
                if attempt < self.distributed.max_attempts:
                    await asyncio.sleep(self.distributed.retry_delay_s)
                continue
            event.node = job.node
            event_topic, wire = self._wire(event)
            await client.publish(event_topic, wire, qos=1, properties=self._properties(event_topic))
            self.engine.remember(event)  # this worker's share of the stream (its jobs may go to several workers)
            self.stats.events += 1
            self.published += 1
            HEALTH.count("processed")
            return
        letter = {
            "schema": "emotion-monitor/deadletter/v1",
            "job_id": key,
            "reason": error,
            "attempts": attempt - 1,
            "worker": self.worker_id,
            "time": iso_utc(time.time()),
            "job": base64.b64encode(payload).decode(),  # the original payload: publish it again to retry
        }
        target = deadletter_topic(topic)
        await client.publish(target, json.dumps(letter), qos=1, properties=self._properties(target))
        self.stats.deadletter += 1
        HEALTH.count("failed")
        log.error("job %s: dead-lettered on %s after %d attempts: %s", key, target, attempt - 1, error)

    async def close(self, timeout: float = 10.0) -> None:
        """Leave the group (no new jobs come to this session), finish and acknowledge the jobs held, disconnect."""
        import aiomqtt

        if self._connection is not None:
            try:
                await self._connection.unsubscribe(self.subscription)
            except aiomqtt.MqttError as e:
                log.warning("could not leave %s (%s): its session gets jobs until it expires", self.subscription, e)
        while self._jobs:
            await asyncio.wait(set(self._jobs))
        await super().close(timeout)
        self.attempts.close()
