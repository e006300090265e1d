"""Where events go: MQTT (aiomqtt, QoS 1, buffered while the broker is away), JSON lines, the terminal.

Every sink takes `EmotionEvent`s through `send`, which never blocks the pipeline: the MQTT sink spools them
durably and publishes from its own task, so a slow or absent broker delays events but loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO, runtime_checkable
from urllib.parse import unquote, urlsplit

from streamer.event import (
    SCHEMA_ID,
    event_topic,
    health_topic,
    iso_utc,
    request_topic,
    state_topic,
    status_topic,
    to_wire,
    topic_safe,
)
from streamer.frames import EmotionEvent
from streamer.homeassistant import Discovery, escalation_topic, last_state
from streamer.metrics import HEALTH
from streamer.models import cache_dir
from streamer.spool import Spool

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
    # Outgoing events are written to this SQLite spool before publishing and removed once acknowledged:
    # `auto` = <cache>/spool/<node>-<broker>.sqlite, `memory` = not durable.
    spool: str = "auto"
    spool_max_events: int = 100_000
    # A broker that cannot be reached when the monitor starts (unknown host, connection or credentials refused)
    # is a start-up error, since it is mostly a typo; true: start anyway and spool until it can be reached
    # (--buffer-offline; the systemd unit sets it, as the network may come up after the monitor).
    buffer_offline: bool = False
    health_interval_s: float = 30.0  # retained health and counts on emotion/v1/<node>/health; 0 = off
    publish_transcript: bool = True
    protocol: str = "auto"  # auto: MQTT v5 (content type, expiry, user properties) where the broker speaks it; 5; 3.1.1
    event_expiry_s: int = 3600  # MQTT v5 message expiry of events (a subscriber that returns later skips stale ones)
    homeassistant: bool = True  # retained Home Assistant discovery per stream (not per call track)
    homeassistant_prefix: str = "homeassistant"
    homeassistant_expire_after_s: int = 3600  # HA shows a stream's sensors unavailable after this long without an event
    homeassistant_transcript: bool = False  # the transcript in HA's attributes (and so in its recorder database)
    homeassistant_url: str | None = None  # the device's configuration URL in HA (default: `run --dashboard`'s page)
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


def tls_context(address: BrokerAddress, opts: MqttOptions) -> ssl.SSLContext | None:
    """The TLS settings of `mqtts://` brokers (None for plain `mqtt://`)."""
    if not address.tls:
        return None
    context = ssl.create_default_context(cafile=opts.tls_ca)
    if opts.tls_cert:
        context.load_cert_chain(opts.tls_cert, opts.tls_key)
    if opts.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


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
    if opts.protocol == "auto":
        opts.protocol = "3.1.1"  # amqtt speaks no MQTT v5
    return url, broker


class BrokerUnreachableError(ConnectionError):
    """The broker could not be reached at start-up, and buffering offline was not asked for."""


# CONNACK reason codes that refuse the credentials: MQTT 3.1.1 (4, 5) and v5 (0x86, 0x87, 0x8C)
CREDENTIALS_REFUSED = {4, 5, 0x86, 0x87, 0x8C}
PROTOCOL_REFUSED = {1, 0x84}  # unacceptable / unsupported protocol version


def connect_failure(error: Exception, address: BrokerAddress) -> tuple[str, bool]:
    """Why a connection attempt failed, in words, and whether the protocol version may be why (so the other
    one is worth a try): a name that does not resolve or a refused connection is not about MQTT v5."""
    cause = error.__cause__ or error.__context__
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve the host name {address.host!r} ({cause.strerror})", False
    if isinstance(cause, ConnectionRefusedError):
        return f"connection refused: nothing listens on {address.host}:{address.port}", False
    if isinstance(cause, TimeoutError):  # amqtt does not answer a v5 CONNECT with a will
        return f"no answer from {address.host}:{address.port} in time", True
    if isinstance(cause, OSError):
        return f"cannot connect to {address.host}:{address.port} ({cause})", False
    rc = getattr(error, "rc", None)
    code = getattr(rc, "value", rc)
    if code in CREDENTIALS_REFUSED:
        return f"the broker refused the credentials ({error})", False
    return str(error), code is None or code in PROTOCOL_REFUSED


class Sink(Protocol):
    async def start(self) -> None: ...

    def send(self, event: EmotionEvent) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class StreamSink(Protocol):
    """A sink told when a stream starts and ends (for announcements and retained state)."""

    def stream_started(self, stream: str, call_id: str | None, role: str | None) -> None: ...

    def stream_ended(self, stream: str, call_id: str | None, role: str | None) -> None: ...


@runtime_checkable
class MessageSink(Protocol):
    """A sink that also carries messages other than utterance events (call lifecycle, alerts)."""

    def send_message(self, topic: str, message: dict) -> None: ...


def stamp(event: EmotionEvent) -> None:
    """Fill the publish and total latencies at the moment the event leaves us."""
    now = time.monotonic()
    event.latency.publish = (now - event.ready) * 1000
    event.latency.total = (now - event.utterance.speech_end_arrived) * 1000


class MqttSink:
    """Publishes events (QoS 1) from a durable spool; keeps retained what dashboards read first (per-stream last
    state, Home Assistant discovery, online/offline status with a Last Will, health); answers requests on
    `…/request`; speaks MQTT v5 where the broker does; reconnects forever."""

    def __init__(self, opts: MqttOptions, url: str, node: str) -> None:
        self.opts, self.node = opts, node
        self.address = parse_broker_url(url, opts)
        self.spool = Spool(self._spool_path(), opts.spool_max_events)
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()
        self.published = 0
        self.replayed = 0
        self._next_health = 0.0  # the first health message goes out right after connecting
        self._v5 = opts.protocol != "3.1.1"
        self.connected_once = False  # until then, `auto` alternates between MQTT v5 and 3.1.1
        self._models: dict[str, str] = {}
        # Retained messages are state, not a log: the latest payload per topic ("" deletes it), re-sent on connect.
        self._retained: dict[str, str] = {}
        self._dirty: set[str] = set()
        self.ha = Discovery(
            opts.homeassistant_prefix,
            node,
            opts.homeassistant_expire_after_s,
            opts.homeassistant_transcript,
            opts.homeassistant_url,
        )
        self._escalated: dict[str, dict] = {}  # call id → its latest escalation alert, while the call lasts
        self._last_alert: dict | None = None
        self._announced: set[str] = set()  # streams with Home Assistant entities: their utterances fire its event

    def _spool_path(self) -> Path | None:
        if self.opts.spool == "memory":
            return None
        if self.opts.spool != "auto":
            return Path(self.opts.spool)
        broker = hashlib.sha256(self.address.url.encode()).hexdigest()[:10]
        return cache_dir() / "spool" / f"{topic_safe(self.node)}-{broker}.sqlite"

    @property
    def dropped(self) -> int:
        return self.spool.dropped

    async def start(self) -> None:
        """Connect in the background; unless `buffer_offline`, first wait for the broker to answer, and raise
        `BrokerUnreachableError` (leaving no spool behind) when it cannot be reached."""
        self._task = asyncio.create_task(self._run(), name="mqtt-sink")
        if self.opts.buffer_offline:
            return
        connected = asyncio.create_task(self.connected.wait())
        await asyncio.wait((connected, self._task), return_when=asyncio.FIRST_COMPLETED)
        connected.cancel()
        if self.connected.is_set():
            return
        self.spool.close()
        raise BrokerUnreachableError(
            f"MQTT broker {self.address.url} cannot be reached: {self._task.result()}; check --broker (or"
            " mqtt.url), or give --buffer-offline to start anyway and spool events until it can be reached"
        )

    def send(self, event: EmotionEvent) -> None:
        topic, payload = self._wire(event)
        self.spool.append(topic, payload, event.final)
        if event.final and event.call_id is None and event.stream in self._announced:
            self.spool.append(*self.ha.utterance(json.loads(payload)))
        self._wakeup.set()

    def _wire(self, event: EmotionEvent) -> tuple[str, str]:
        """The event's topic and JSON payload, stamped now; its stream's retained last state is updated too."""
        stamp(event)
        wire = to_wire(event, self.opts.publish_transcript)
        self._models = event.models
        if event.final:
            self._retain(state_topic(event.node, event.stream, event.call_id, event.role), last_state(wire))
        return event_topic(event.node, event.stream, event.call_id, event.role), json.dumps(wire, ensure_ascii=False)

    def stream_started(self, stream: str, call_id: str | None, role: str | None) -> None:
        """Announce the stream's Home Assistant entities, or for the first call the node's escalation sensor."""
        if not self.opts.homeassistant:
            return
        if call_id is None:
            for topic, config in self.ha.stream(stream).items():
                self._retain(topic, config)
            self._announced.add(stream)
        elif escalation_topic(self.node) not in self._retained:
            self._retain(*self.ha.escalation())
            self._escalation_changed()

    def stream_ended(self, stream: str, call_id: str | None, role: str | None) -> None:
        """A call track's last state goes (calls do not return); a stream's says when it ended (dashboards mark
        it). A stream's Home Assistant entities stay: the node's status makes them unavailable, and HA keeps the
        name and area the user gave them."""
        topic = state_topic(self.node, stream, call_id, role)
        if call_id is not None:
            self._retain(topic, "")
        elif last := self._retained.get(topic):
            self._retain(topic, json.dumps(json.loads(last) | {"ended": iso_utc(time.time())}, ensure_ascii=False))

    def _retain(self, topic: str, payload: str) -> None:
        self._retained[topic] = payload
        self._dirty.add(topic)
        self._wakeup.set()

    def send_message(self, topic: str, message: dict) -> None:
        """Spooled and published in order with the events (QoS 1, not retained), so `ended` follows them. A call's
        escalation alert turns the escalation sensor on until the call ends."""
        self.spool.append(topic, json.dumps(message, ensure_ascii=False), True)
        if self.opts.homeassistant:
            self._track_escalation(topic, message)
        self._wakeup.set()

    def _track_escalation(self, topic: str, message: dict) -> None:
        call = message.get("call_id")
        if topic.endswith("/alert"):
            self._escalated[call] = self._last_alert = message
        elif topic.endswith("/lifecycle") and message.get("type") == "ended" and call in self._escalated:
            del self._escalated[call]
        else:
            return
        self._escalation_changed()

    def _escalation_changed(self) -> None:
        """The escalation sensor's retained state: on while a call that raised an alert lasts."""
        state = {"state": "ON" if self._escalated else "OFF", "calls": sorted(self._escalated)}
        self._retain(escalation_topic(self.node), json.dumps(state | {"last": self._last_alert}, ensure_ascii=False))

    def _client(self, **overrides):
        """An aiomqtt client for this broker; `overrides` replace its keyword arguments (session, identifier)."""
        import aiomqtt

        settings = {
            "username": self.address.username,
            "password": self.address.password,
            "identifier": self.opts.client_id or f"emotion-monitor-{self.node}-{os.getpid()}",
            "will": aiomqtt.Will(status_topic(self.node), "offline", qos=1, retain=True),
            "protocol": aiomqtt.ProtocolVersion.V5 if self._v5 else aiomqtt.ProtocolVersion.V311,
            "keepalive": self.opts.keepalive,
            "tls_context": tls_context(self.address, self.opts),
            "timeout": 10,
        }
        return aiomqtt.Client(self.address.host, self.address.port, **(settings | overrides))

    async def _run(self) -> str | None:
        """Connect, publish, reconnect, until closed; the reason, when the first connection failed and the sink
        does not buffer offline."""
        import aiomqtt

        delay, outage_logged = 0.5, False
        while True:
            try:
                async with self._client() as client:
                    await client.publish(status_topic(self.node), "online", qos=1, retain=True)
                    self.connected.set()
                    self.connected_once = True
                    if outage_logged:
                        waiting = self.spool.size()
                        self.replayed += waiting
                        log.warning("MQTT broker %s is back: sending %d spooled events", self.address.url, waiting)
                    delay, outage_logged = 0.5, False
                    self._dirty |= set(self._retained)  # a broker restarted without persistence lost them
                    # subscribed before anything else: a subscription cancelled before its SUBACK makes aiomqtt log a
                    # traceback when the SUBACK comes (a stream that ends at once closes the sink that early)
                    await self._subscribe(client)
                    listener = asyncio.create_task(self._listen(client))
                    try:
                        await self._drain(client)
                    finally:
                        listener.cancel()
                    if self.opts.health_interval_s:
                        await self._publish_health(client)
                    await client.publish(status_topic(self.node), "offline", qos=1, retain=True)
                    return None
            except aiomqtt.MqttError as e:
                why, maybe_protocol = connect_failure(e, self.address)
                if self.opts.protocol == "auto" and not self.connected_once and (maybe_protocol or not self._v5):
                    self._v5 = not self._v5  # a broker without v5 may refuse it, or (amqtt, with a will) not answer
                    if not self._v5:
                        log.info("MQTT broker %s: no MQTT v5 (%s), trying 3.1.1", self.address.url, why)
                        continue
                if not self.connected_once and not self.opts.buffer_offline:
                    return why
                delay, outage_logged = await self._outage(why, delay, outage_logged)
            if self._closing and not self.spool.size():
                return None

    async def _outage(self, error: str, delay: float, logged: bool) -> tuple[float, bool]:
        self.connected.clear()
        if self._closing and not self.spool.size():
            return delay, logged
        if not logged:
            log.warning("MQTT broker %s unreachable (%s): spooling events and retrying", self.address.url, error)
        await asyncio.sleep(delay)
        return min(delay * 2, 5.0), True

    def _properties(self, topic: str):
        """MQTT v5 publish properties (None on 3.1.1): JSON content type; events also expire and name their
        schema and models, so a consumer can route on them without parsing the payload."""
        if not self._v5:
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.PUBLISH)
        properties.ContentType = "application/json"
        if topic.endswith("/event"):
            properties.MessageExpiryInterval = self.opts.event_expiry_s
            properties.UserProperty = [("schema", SCHEMA_ID), *self._models.items()]
        return properties

    async def _drain(self, client) -> None:
        """Publish spooled events in order until closing (an event leaves the spool only once acknowledged),
        then the retained state that changed."""
        while True:
            while batch := self.spool.head():
                for message in batch:
                    await client.publish(
                        message.topic, message.payload, qos=1, properties=self._properties(message.topic)
                    )
                    self.spool.remove(message.rowid)
                    self.published += not message.topic.endswith("/utterance")  # HA's copy of an event: not counted
            while self._dirty:
                topic = self._dirty.pop()
                payload = self._retained.get(topic)
                if payload is None:
                    continue
                await client.publish(topic, payload, qos=1, retain=True, properties=self._properties(topic))
                if payload == "" and self._retained.get(topic) == "":
                    del self._retained[topic]  # deleted on the broker; nothing to re-send
            if self._closing:
                return
            self._wakeup.clear()
            if not self.spool.size():
                wait = max(0.0, self._next_health - time.monotonic()) if self.opts.health_interval_s else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait)
            if self.opts.health_interval_s and time.monotonic() >= self._next_health:
                await self._publish_health(client)

    async def _subscribe(self, client) -> None:
        """`…/request`, and Home Assistant's status to re-announce when it comes back online."""
        await client.subscribe(request_topic(self.node), qos=1)
        if self.opts.homeassistant:
            await client.subscribe(f"{self.opts.homeassistant_prefix}/status", qos=1)

    async def _listen(self, client) -> None:
        """Handle what `_subscribe` asked for until the connection ends."""
        import aiomqtt

        with contextlib.suppress(aiomqtt.MqttError):  # the connection ended: `_run` reconnects or is done
            async for message in client.messages:
                await self._received(client, message)

    async def _received(self, client, message) -> None:
        """One incoming message (a subclass that subscribes to more topics in `_subscribe` handles those here)."""
        if str(message.topic) == f"{self.opts.homeassistant_prefix}/status":
            if message.payload == b"online":
                self._dirty |= {t for t in self._retained if t.startswith(self.opts.homeassistant_prefix + "/")}
                self._wakeup.set()
        elif str(message.topic) == request_topic(self.node):
            await self._answer(client, message)

    async def _answer(self, client, message) -> None:
        asked = getattr(message.properties, "ResponseTopic", None)
        properties = self._properties("response")
        correlation = getattr(message.properties, "CorrelationData", None)
        if properties is not None and correlation is not None:
            properties.CorrelationData = correlation
        answer = {
            "schema": "emotion-monitor/response/v1",
            "node": self.node,
            "time": iso_utc(time.time()),
            "streams": {stream: {"queued": depth()} for stream, depth in sorted(HEALTH.queues.items())},
            "models": self._models,
            "health": HEALTH.snapshot(),
        }
        topic = asked or request_topic(self.node).removesuffix("request") + "response"
        await client.publish(topic, json.dumps(answer), qos=1, properties=properties)

    async def _publish_health(self, client) -> None:
        await client.publish(health_topic(self.node), json.dumps(HEALTH.snapshot()), qos=1, retain=True)
        self._next_health = time.monotonic() + self.opts.health_interval_s

    async def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                log.error(
                    "MQTT broker %s unreachable at shutdown: %d events stay in the spool %s for the next run",
                    self.address.url,
                    self.spool.size(),
                    self.spool.path or "(memory: lost)",
                )
        self.spool.close()


class JsonlSink:
    """One JSON object per line, to a file or to stdout (`-`)."""

    def __init__(self, target: str, publish_transcript: bool = True) -> None:
        self.target, self.publish_transcript = target, publish_transcript
        self._file: TextIO | None = None

    async def start(self) -> None:
        self._file = sys.stdout if self.target == "-" else open(self.target, "a", encoding="utf-8")  # noqa: SIM115

    def send(self, event: EmotionEvent) -> None:
        stamp(event)
        self._write(to_wire(event, self.publish_transcript))

    def send_message(self, topic: str, message: dict) -> None:
        self._write(message)

    def _write(self, line: dict) -> None:
        assert self._file is not None
        self._file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._file.flush()

    async def close(self) -> None:
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
