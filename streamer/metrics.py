"""Operations: Prometheus metrics and a `/healthz` endpoint on one small asyncio HTTP listener.

Stage latencies and utterance outcomes are pushed as they happen; sink and stream state (spool size,
published/replayed/dropped counts, queue depths, broker connection) is read at scrape time from the objects
registered with `Health`, so there is no second copy of it to keep in sync.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
STAGE_LATENCY = Histogram(
    "emotion_monitor_stage_latency_seconds",
    "Seconds from the end of speech spent in each stage (total: until handed to the sinks)",
    ["stage"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
    registry=REGISTRY,
)
UTTERANCES = Counter(
    "emotion_monitor_utterances",
    "Utterances by outcome: processed, voice_only (shed under load), dropped (backlog full), failed",
    ["outcome"],
    registry=REGISTRY,
)


class Health:
    """What `/healthz` and the scrape-time metrics read: the MQTT sink and the running streams' queues."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.sink = None  # an MqttSink, when publishing over MQTT
        self.queues: dict[str, Callable[[], int]] = {}
        self.utterances: dict[str, int] = {}

    def count(self, outcome: str) -> None:
        """One utterance's outcome: processed, voice_only, dropped or failed."""
        UTTERANCES.labels(outcome).inc()
        self.utterances[outcome] = self.utterances.get(outcome, 0) + 1

    def snapshot(self) -> dict:
        sink = self.sink
        connected = bool(sink and sink.connected.is_set())
        return {
            "status": "ok" if sink is None or connected else "broker_unreachable",
            "mqtt_connected": connected,
            "streams": len(self.queues),
            "queued_utterances": sum(depth() for depth in self.queues.values()),
            "spool": sink.spool.size() if sink else 0,
            "spool_high_water": sink.spool.high_water if sink else 0,
            "events": {"published": sink.published, "replayed": sink.replayed, "dropped": sink.dropped} if sink else {},
            "utterances": dict(self.utterances),
            "uptime_s": round(time.monotonic() - self.started, 1),
        }

    def collect(self):
        sink = self.sink
        streams = GaugeMetricFamily("emotion_monitor_active_streams", "Streams being monitored")
        streams.add_metric([], len(self.queues))
        yield streams
        depth = GaugeMetricFamily(
            "emotion_monitor_queue_depth", "Utterances waiting for the recogniser", labels=["stream"]
        )
        for stream, size in self.queues.items():
            depth.add_metric([stream], size())
        yield depth
        if sink is None:
            return
        for name, doc, value in (
            ("published", "Events acknowledged by the broker", sink.published),
            ("replayed", "Events sent after a broker outage or from an earlier run's spool", sink.replayed),
            ("dropped", "Events dropped because the spool was full", sink.dropped),
        ):
            counter = CounterMetricFamily(f"emotion_monitor_events_{name}", doc)
            counter.add_metric([], value)
            yield counter
        for name, doc, value in (
            ("spool_size", "Events waiting in the spool", sink.spool.size()),
            ("spool_high_water", "Most events the spool has held", sink.spool.high_water),
            ("mqtt_connected", "1 while connected to the broker", int(sink.connected.is_set())),
        ):
            gauge = GaugeMetricFamily(f"emotion_monitor_{name}", doc)
            gauge.add_metric([], value)
            yield gauge


HEALTH = Health()
REGISTRY.register(HEALTH)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = await asyncio.wait_for(reader.readline(), 5)
        parts = request.decode("latin-1").split()
        path = parts[1] if len(parts) >= 2 else ""
        if path == "/metrics":
            status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        elif path == "/healthz":
            snapshot = HEALTH.snapshot()
            status = "200 OK" if snapshot["status"] == "ok" else "503 Service Unavailable"
            ctype, body = "application/json", json.dumps(snapshot).encode()
        else:
            status, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /healthz\n"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    except (TimeoutError, ConnectionError, UnicodeError) as e:
        log.debug("metrics request failed: %s", e)
    finally:
        writer.close()


async def serve(listen: str) -> asyncio.Server:
    """Start the HTTP listener on `host:port` (`127.0.0.1:9464` by convention)."""
    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(_handle, host or "127.0.0.1", int(port))
    log.info("metrics on http://%s/metrics and /healthz", listen)
    return server
