"""Where events go: MQTT (aiomqtt, QoS 1, buffered while the broker is away), JSON lines, the terminal.

Every sink takes `EmotionEvent`s through `send`, which never blocks the pipeline: the MQTT sink queues and
publishes from its own task, so a slow or absent broker delays events but loses none (up to `max_buffer`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO
from urllib.parse import unquote, urlsplit

from streamer.event import event_topic, status_topic, to_wire
from streamer.frames import EmotionEvent

log = logging.getLogger(__name__)


@dataclass
class MqttOptions:
    """`url` is `auto` (local broker on 127.0.0.1:1883, or an embedded one if none listens),
    `mqtt://[user:pass@]host[:port]` or `mqtts://…` (TLS). Credentials in the URL override the fields."""

    url: str = "auto"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    keepalive: int = 30
    max_buffer: int = 10_000
    publish_transcript: bool = True
    embedded_host: str = "127.0.0.1"
    embedded_port: int = 1883


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str, opts: MqttOptions) -> BrokerAddress:
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"broker URL {url!r} must look like mqtt://[user:pass@]host[:port] or mqtts://…")
    password = opts.password
    if opts.password_file:
        password = Path(opts.password_file).read_text().strip()
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=parts.port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else opts.username,
        password=unquote(parts.password) if parts.password else password,
    )


def is_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """An in-process amqtt broker, so the monitor runs on a machine with no MQTT broker installed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._broker = None

    async def start(self) -> None:
        from amqtt.broker import Broker

        logging.getLogger("amqtt").setLevel(logging.WARNING)
        self._broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
        )
        await self._broker.start()
        log.info("no MQTT broker on %s:%d: started an embedded one there", self.host, self.port)

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()


async def resolve_broker(opts: MqttOptions) -> tuple[str, EmbeddedBroker | None]:
    """The broker URL to use; for `auto`, start an embedded broker when nothing listens locally."""
    if opts.url != "auto":
        return opts.url, None
    url = f"mqtt://{opts.embedded_host}:{opts.embedded_port}"
    if is_listening(opts.embedded_host, opts.embedded_port):
        return url, None
    broker = EmbeddedBroker(opts.embedded_host, opts.embedded_port)
    await broker.start()
    return url, broker


class Sink(Protocol):
    async def start(self) -> None: ...

    def send(self, event: EmotionEvent) -> None: ...

    async def close(self) -> None: ...


def stamp(event: EmotionEvent) -> None:
    """Fill the publish and total latencies at the moment the event leaves us."""
    now = time.monotonic()
    event.latency.publish = (now - event.ready) * 1000
    event.latency.total = (now - event.utterance.speech_end_arrived) * 1000


class MqttSink:
    """Publishes events (QoS 1) and a retained online/offline status with a Last Will; reconnects forever."""

    def __init__(self, opts: MqttOptions, url: str, node: str) -> None:
        self.opts, self.node = opts, node
        self.address = parse_broker_url(url, opts)
        self._pending: collections.deque[EmotionEvent] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()
        self.published = 0
        self.dropped = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mqtt-sink")

    def send(self, event: EmotionEvent) -> None:
        if len(self._pending) >= self.opts.max_buffer:
            self._pending.popleft()
            self.dropped += 1
            log.error(
                "MQTT buffer full (%d events): dropped the oldest event (%d so far)", self.opts.max_buffer, self.dropped
            )
        self._pending.append(event)
        self._wakeup.set()

    def _client(self):
        import aiomqtt

        tls_context = None
        if self.address.tls:
            tls_context = ssl.create_default_context(cafile=self.opts.tls_ca)
            if self.opts.tls_cert:
                tls_context.load_cert_chain(self.opts.tls_cert, self.opts.tls_key)
            if self.opts.tls_insecure:
                tls_context.check_hostname = False
                tls_context.verify_mode = ssl.CERT_NONE
        return aiomqtt.Client(
            self.address.host,
            self.address.port,
            username=self.address.username,
            password=self.address.password,
            identifier=self.opts.client_id or f"emotion-monitor-{self.node}-{os.getpid()}",
            will=aiomqtt.Will(status_topic(self.node), "offline", qos=1, retain=True),
            keepalive=self.opts.keepalive,
            tls_context=tls_context,
            timeout=10,
        )

    async def _run(self) -> None:
        import aiomqtt

        delay, outage_logged = 0.5, False
        while True:
            try:
                async with self._client() as client:
                    await client.publish(status_topic(self.node), "online", qos=1, retain=True)
                    self.connected.set()
                    if outage_logged:
                        log.warning(
                            "MQTT broker %s is back: sending %d buffered events", self.address.url, len(self._pending)
                        )
                    delay, outage_logged = 0.5, False
                    await self._drain(client)
                    await client.publish(status_topic(self.node), "offline", qos=1, retain=True)
                    return
            except aiomqtt.MqttError as e:
                self.connected.clear()
                if self._closing and not self._pending:
                    return
                if not outage_logged:
                    log.warning("MQTT broker %s unreachable (%s): buffering events and retrying", self.address.url, e)
                    outage_logged = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _drain(self, client) -> None:
        """Publish pending events in order until closing; an event leaves the queue only once acknowledged."""
        while True:
            while self._pending:
                event = self._pending[0]
                stamp(event)
                wire = to_wire(event, self.opts.publish_transcript)
                await client.publish(event_topic(event.node, event.stream), json.dumps(wire), qos=1)
                self._pending.popleft()
                self.published += 1
            if self._closing:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    async def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._task, timeout)
        except TimeoutError:
            self._task.cancel()
            log.error(
                "MQTT broker %s unreachable at shutdown: %d events not published", self.address.url, len(self._pending)
            )


class JsonlSink:
    """One JSON object per line, to a file or to stdout (`-`)."""

    def __init__(self, target: str, publish_transcript: bool = True) -> None:
        self.target, self.publish_transcript = target, publish_transcript
        self._file: TextIO | None = None

    async def start(self) -> None:
        self._file = sys.stdout if self.target == "-" else open(self.target, "a", encoding="utf-8")  # noqa: SIM115

    def send(self, event: EmotionEvent) -> None:
        assert self._file is not None
        stamp(event)
        self._file.write(json.dumps(to_wire(event, self.publish_transcript), ensure_ascii=False) + "\n")
        self._file.flush()

    async def close(self) -> None:
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
