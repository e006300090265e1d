"""The dashboard daemon: subscribes once to `emotion/v1/#` and pushes every message to browsers over SSE.

Server-Sent Events from here rather than MQTT over WebSockets in the page: it works with any broker (the
embedded one too) without a WebSockets listener to configure, one subscription serves any number of tabs,
and broker credentials never reach the browser. A tab that connects first gets a snapshot of recent state
(last events per stream, active and recently ended calls, alerts, node status) so a page opened mid-call is
populated; a tab that cannot keep up is disconnected and, reconnecting, gets a fresh snapshot. A dashboard started
after a run begins from the streams' retained last states; nodes offline for longer than `forget_offline_s` are
forgotten, with their streams and calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict, deque
from importlib import resources

import aiomqtt

from streamer.frames import LABELS
from streamer.publisher import MqttOptions, parse_broker_url, tls_context

log = logging.getLogger(__name__)

ROOT = "emotion/v1"
MAX_PAYLOAD = 256 * 1024
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# Everything the page loads comes from here: no CDN, no inline script.
SECURITY_HEADERS = (
    "Content-Security-Policy: default-src 'self'; img-src 'self' data:\r\n"
    "X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n"
)


def _json(payload: bytes) -> object | None:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None


class DashboardState:
    """Recent state kept for the snapshot that a newly opened tab receives.

    Messages are stored as the envelopes sent to browsers, `{"kind", "key", "node", "call", "role", "data"}`,
    each with a sequence number, so the snapshot replays them in arrival order through the page's one handler.
    Bounded everywhere: `history` events per stream, `max_streams` streams, `max_calls` calls (the oldest ended
    ones go first; then the oldest, for calls whose `ended` never came), and nodes offline for longer than
    `forget_offline_s` go with their streams and calls (`forget_offline`).
    """

    def __init__(
        self, history: int = 60, max_streams: int = 200, max_calls: int = 100, forget_offline_s: float = 3600.0
    ) -> None:
        self.history, self.max_streams, self.max_calls = history, max_streams, max_calls
        self.forget_offline_s = forget_offline_s
        self._seq = 0
        self.streams: OrderedDict[str, OrderedDict[object, tuple[int, dict]]] = OrderedDict()
        self.ended: dict[str, tuple[int, dict]] = {}  # streams whose last state says they ended
        self.calls: OrderedDict[str, dict[str, object]] = OrderedDict()
        self.nodes: dict[tuple[str, str], tuple[int, dict]] = {}
        self.offline_since: dict[str, float] = {}  # node → monotonic time its status said offline (or we learnt it)
        self.skipped = 0

    def _stamp(self, envelope: dict) -> tuple[int, dict]:
        self._seq += 1
        return self._seq, envelope

    def handle(self, topic: str, payload: bytes, retained: bool = False) -> dict | None:
        """Store one MQTT message; the envelope to broadcast, or None for a topic we ignore or a bad payload.
        `retained`: the broker's retained copy, sent on subscribing (what happened before we started)."""
        parts = topic.split("/")
        if parts[:2] != ROOT.split("/") or len(parts) < 4:
            return None
        node, rest = parts[2], parts[3:]
        if node in ("jobs", "deadletter"):  # scale-out audio jobs: not for the page
            return None
        if len(payload) > MAX_PAYLOAD:
            return self._skip(topic, "payload too large")
        if rest in (["status"], ["health"]):
            return self._node(topic, node, rest[0], payload)
        if len(rest) == 2 and rest[1] == "event":
            return self._event(topic, f"{node}/{rest[0]}", node, None, None, payload)
        if len(rest) == 2 and rest[1] == "state":
            return self._state(topic, f"{node}/{rest[0]}", node, payload, retained)
        if len(rest) == 4 and rest[0] == "call" and rest[3] == "event":
            call, role = rest[1], rest[2]
            return self._event(topic, f"{node}/call/{call}/{role}", node, call, role, payload)
        if len(rest) == 3 and rest[0] == "call" and rest[2] in ("lifecycle", "alert"):
            return self._call(topic, node, rest[1], rest[2], payload)
        log.debug("ignoring message on %s", topic)
        return None

    def _skip(self, topic: str, why: str) -> None:
        self.skipped += 1
        log.warning("skipping message on %s: %s", topic, why)

    def _node(self, topic: str, node: str, kind: str, payload: bytes) -> dict | None:
        if kind == "status":
            data: object = payload.decode("utf-8", "replace").strip()[:32]
        else:
            data = _json(payload)
            if not isinstance(data, dict):
                return self._skip(topic, "health is not a JSON object")
        envelope = {"kind": kind, "key": node, "node": node, "data": data}
        self.nodes[node, kind] = self._stamp(envelope)
        if data == "offline":
            self.offline_since.setdefault(node, time.monotonic())
        elif kind == "status":
            self.offline_since.pop(node, None)
        return envelope

    def _state(self, topic: str, key: str, node: str, payload: bytes, retained: bool) -> dict | None:
        """A stream's last state: the stream as it was when we started (retained), or its end. Live events
        come on `…/event`, so a live state that does not end its stream adds nothing."""
        data = _json(payload)
        if not isinstance(data, dict):
            return None if not payload else self._skip(topic, "state is not a JSON object")
        if retained and key not in self.streams:  # its `ended`, if any, comes along
            return self._event(topic, key, node, None, None, json.dumps(data | {"retained": True}).encode())
        if "ended" not in data:
            return None
        envelope = {"kind": "ended", "key": key, "node": node, "data": {"ended": data["ended"]}}
        self.ended[key] = self._stamp(envelope)
        return envelope

    def _event(
        self, topic: str, key: str, node: str, call: str | None, role: str | None, payload: bytes
    ) -> dict | None:
        data = _json(payload)
        if not isinstance(data, dict) or data.get("label") not in LABELS or not isinstance(data.get("scores"), dict):
            return self._skip(topic, "not an emotion event (JSON object with a known label and scores)")
        envelope = {"kind": "event", "key": key, "node": node, "call": call, "role": role, "data": data}
        events = self.streams.get(key)
        if events is None:
            events = self.streams[key] = OrderedDict()
            while len(self.streams) > self.max_streams:
                self.streams.popitem(last=False)
        self.streams.move_to_end(key)
        self.ended.pop(key, None)  # the stream is back
        # The final event of a segment replaces its interim ones.
        segment = data.get("segment_id", data.get("event_id"))
        segment = segment if isinstance(segment, int | str) else id(envelope)
        events.pop(segment, None)
        events[segment] = self._stamp(envelope)
        while len(events) > self.history:
            events.popitem(last=False)
        return envelope

    def _call(self, topic: str, node: str, call_id: str, kind: str, payload: bytes) -> dict | None:
        data = _json(payload)
        if not isinstance(data, dict):
            return self._skip(topic, f"{kind} is not a JSON object")
        key = f"{node}/{call_id}"
        if kind == "lifecycle" and data.get("type") not in ("started", "ended"):
            return self._skip(topic, "lifecycle type is neither started nor ended")
        envelope = {"kind": "call" if kind == "lifecycle" else "alert", "key": key, "node": node, "call": call_id}
        envelope |= {"role": data.get("role") if kind == "alert" else None, "data": data}
        call = self.calls.setdefault(key, {"started": None, "ended": None, "alerts": deque(maxlen=50)})
        if kind == "alert":
            call["alerts"].append(self._stamp(envelope))
        else:
            call[data["type"]] = self._stamp(envelope)
        self._forget_old_calls()
        return envelope

    def _forget_old_calls(self) -> None:
        excess = len(self.calls) - self.max_calls
        if excess <= 0:
            return
        ended = [key for key, call in self.calls.items() if call["ended"]]
        for key in (ended + [k for k in self.calls if k not in ended])[:excess]:
            del self.calls[key]
            node, call_id = key.split("/", 1)
            prefix = f"{node}/call/{call_id}/"
            for stream in [s for s in self.streams if s.startswith(prefix)]:
                del self.streams[stream]

    def forget_offline(self, now: float | None = None) -> list[dict]:
        """Drop the nodes offline for longer than `forget_offline_s`, with their streams and calls (a header
        listing every node of earlier runs, forever, helps nobody); the envelopes telling open pages."""
        now = time.monotonic() if now is None else now
        gone = [node for node, since in self.offline_since.items() if now - since > self.forget_offline_s]
        for node in gone:
            del self.offline_since[node]
            for table in (self.nodes, self.streams, self.ended, self.calls):
                for key in [k for k in table if (k[0] if isinstance(k, tuple) else k.split("/", 1)[0]) == node]:
                    del table[key]
        return [{"kind": "forget", "key": node, "node": node, "data": {}} for node in gone]

    def snapshot(self) -> list[dict]:
        """Every stored envelope, oldest first."""
        stamped = list(self.nodes.values()) + list(self.ended.values())
        for events in self.streams.values():
            stamped += events.values()
        for call in self.calls.values():
            stamped += [call[k] for k in ("started", "ended") if call[k]]
            stamped += call["alerts"]
        return [envelope for _, envelope in sorted(stamped, key=lambda s: s[0])]


class Dashboard:
    """HTTP (page, static files, `/events` SSE, `/snapshot.json`) plus the MQTT subscription feeding it."""

    def __init__(
        self,
        broker: str = "mqtt://127.0.0.1:1883",
        listen: str = "127.0.0.1:8765",
        node: str | None = None,
        opts: MqttOptions | None = None,
        history: int = 60,
        client_queue: int = 5000,
        forget_offline_s: float = 3600.0,
    ) -> None:
        self.opts = opts or MqttOptions()
        self.address = parse_broker_url(broker, self.opts)
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]") or "127.0.0.1", int(port)
        self.topic = f"{ROOT}/{node}/#" if node else f"{ROOT}/#"
        self.state = DashboardState(history, forget_offline_s=forget_offline_s)
        self.client_queue = client_queue
        self.subscribed = asyncio.Event()
        self._clients: dict[asyncio.Queue[str], asyncio.Task] = {}
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks = [
            asyncio.create_task(self._mqtt(), name="dashboard-mqtt"),
            asyncio.create_task(self._forget(), name="dashboard-forget"),
        ]
        log.info("dashboard on %s (MQTT %s, topic %s)", self.url, self.address.url, self.topic)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        clients = list(self._clients.values())
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    # MQTT side

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.address.host,
            self.address.port,
            username=self.address.username,
            password=self.address.password,
            identifier=f"emotion-dashboard-{os.getpid()}-{id(self):x}",
            keepalive=self.opts.keepalive,
            tls_context=tls_context(self.address, self.opts),
            timeout=10,
        )

    async def _mqtt(self) -> None:
        delay, outage_logged = 0.5, False
        while True:
            try:
                async with self._client() as client:
                    await client.subscribe(self.topic, qos=1)
                    self._broadcast({"kind": "broker", "data": {"connected": True, "url": self.address.url}})
                    self.subscribed.set()
                    delay, outage_logged = 0.5, False
                    async for message in client.messages:
                        payload = message.payload
                        raw = payload if isinstance(payload, bytes | bytearray) else str(payload or "").encode()
                        envelope = self.state.handle(str(message.topic), bytes(raw), message.retain)
                        if envelope is not None:
                            self._broadcast(envelope)
            except aiomqtt.MqttError as e:
                self.subscribed.clear()
                self._broadcast({"kind": "broker", "data": {"connected": False, "url": self.address.url}})
                if not outage_logged:
                    log.warning("MQTT broker %s unreachable (%s): retrying", self.address.url, e)
                    outage_logged = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _forget(self) -> None:
        """Forget the nodes offline for too long, looking a few times within that time."""
        while True:
            await asyncio.sleep(min(60.0, max(0.1, self.state.forget_offline_s / 4)))
            for envelope in self.state.forget_offline():
                self._broadcast(envelope)

    def _broadcast(self, envelope: dict) -> None:
        encoded = json.dumps(envelope, ensure_ascii=False)
        for queue, task in list(self._clients.items()):
            try:
                queue.put_nowait(encoded)
            except asyncio.QueueFull:  # a tab that cannot keep up reconnects and gets a fresh snapshot
                log.warning("dashboard client too slow: disconnecting it")
                task.cancel()

    # HTTP side

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            for _ in range(100):  # headers: nothing we need
                if not (await asyncio.wait_for(reader.readline(), 10)).strip():
                    break
            parts = request.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            if method not in ("GET", "HEAD"):
                self._respond(writer, "405 Method Not Allowed", "text/plain", b"GET only\n")
            elif path == "/events":
                await self._sse(writer)
            elif path == "/snapshot.json":
                self._respond(writer, "200 OK", "application/json", json.dumps(self.state.snapshot()).encode())
            else:
                name = "index.html" if path == "/" else path.removeprefix("/static/")
                body = self._static(name) if path == "/" or path.startswith("/static/") else None
                if body is None:
                    self._respond(writer, "404 Not Found", "text/plain", b"not found\n")
                else:
                    self._respond(writer, "200 OK", CONTENT_TYPES[os.path.splitext(name)[1]], body, method == "HEAD")
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.CancelledError) as e:
            log.debug("dashboard request ended: %r", e)
        finally:
            writer.close()

    @staticmethod
    def _static(name: str) -> bytes | None:
        """A file of static/ by plain name (no paths, so no traversal) with a known type."""
        if "/" in name or "\\" in name or name.startswith(".") or os.path.splitext(name)[1] not in CONTENT_TYPES:
            return None
        path = resources.files("streamer.dashboard") / "static" / name
        return path.read_bytes() if path.is_file() else None

    @staticmethod
    def _respond(writer: asyncio.StreamWriter, status: str, ctype: str, body: bytes, head: bool = False) -> None:
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-cache\r\n{SECURITY_HEADERS}Connection: close\r\n\r\n".encode()
            + (b"" if head else body)
        )

    async def _sse(self, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            + SECURITY_HEADERS.encode()
            + b"Connection: keep-alive\r\n\r\n"
        )
        queue: asyncio.Queue[str] = asyncio.Queue(self.client_queue)
        task = asyncio.current_task()
        assert task is not None
        # Snapshot and registration in one step of the loop: nothing is missed or sent twice.
        broker = {"kind": "broker", "data": {"connected": self.subscribed.is_set(), "url": self.address.url}}
        snapshot = json.dumps([broker, *self.state.snapshot()], ensure_ascii=False)
        self._clients[queue] = task
        try:
            writer.write(f"retry: 2000\nevent: snapshot\ndata: {snapshot}\n\n".encode())
            await writer.drain()
            while True:
                try:
                    batch = [await asyncio.wait_for(queue.get(), 15)]
                except TimeoutError:
                    writer.write(b": keep-alive\n\n")
                else:  # what queued up meanwhile goes as one message: one parse and one task in the page
                    while not queue.empty() and len(batch) < 500:
                        batch.append(queue.get_nowait())
                    writer.write(f"data: [{','.join(batch)}]\n\n".encode())
                await writer.drain()
        finally:
            del self._clients[queue]
