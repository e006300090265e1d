"""Call-center ingest over real sockets: AudioSocket (TCP), Twilio and FreeSWITCH (WebSocket) clients built
here stream real speech; events, lifecycle and alerts are read back from the real Mosquitto."""

import asyncio
import base64
import contextlib
import json
import signal
import struct
import subprocess
import sys
import uuid

import aiomqtt
import numpy as np
import pytest
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamer.event import status_topic, validate
from streamer.frames import LABELS, SAMPLE_RATE
from streamer.ingest import start_listeners
from streamer.ingest.calls import CallHub, EscalationRule, IngestOptions
from streamer.publisher import JsonlSink, MqttOptions, MqttSink
from tests.conftest import (
    ANGRY_ES,
    HAPPY_ES,
    free_port,
    make_event,
    retained_under,
    silence,
    stop_as_soon_as_up,
    unique_node,
)
from tests.test_publisher import clear_node

pytestmark = pytest.mark.slow


def pcm16(audio: np.ndarray, rate: int) -> bytes:
    """16 kHz float speech → signed 16-bit little-endian PCM at `rate`, as a phone system sends it."""
    resampled = soxr.resample(audio, SAMPLE_RATE, rate) if rate != SAMPLE_RATE else audio
    return (np.clip(resampled, -1, 1) * 32767).astype("<i2").tobytes()


def ulaw(audio: np.ndarray, tmp_path) -> bytes:
    """8 kHz μ-law bytes encoded by sox (an encoder independent of our decoder)."""
    raw = tmp_path / f"{uuid.uuid4().hex}.raw"
    raw.write_bytes(pcm16(audio, 8000))
    out = subprocess.run(
        [
            "sox",
            "-t",
            "raw",
            "-r",
            "8000",
            "-e",
            "signed",
            "-b",
            "16",
            "-c",
            "1",
            str(raw),
            "-t",
            "raw",
            "-e",
            "mu-law",
            "-",
        ],
        check=True,
        capture_output=True,
    )
    return out.stdout


def utterance(speak, text: str) -> np.ndarray:
    return np.concatenate([silence(0.5), speak(text), silence(1.2)])


def frames(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class Watcher:
    """Every message under the node's call topics, from a real subscriber."""

    def __init__(self, node: str):
        self.node, self.messages = node, []
        self._ready = asyncio.Event()

    async def run(self):
        async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"watch-{uuid.uuid4().hex[:8]}") as client:
            await client.subscribe(f"emotion/v1/{self.node}/call/#", qos=1)
            self._ready.set()
            async for message in client.messages:
                if message.payload:  # an empty retained message clears an ended call's state
                    self.messages.append((str(message.topic), json.loads(message.payload)))

    def of(self, call_id: str, kind: str) -> list[dict]:
        return [m for t, m in self.messages if m.get("call_id") == call_id and t.endswith("/" + kind)]

    def ended(self, call_id: str) -> dict | None:
        return next((m for m in self.of(call_id, "lifecycle") if m["type"] == "ended"), None)

    async def until_ended(self, *call_ids: str, timeout: float = 120) -> list[dict]:
        async with asyncio.timeout(timeout):
            while any(self.ended(c) is None for c in call_ids):
                await asyncio.sleep(0.1)
        return [self.ended(c) for c in call_ids]


@contextlib.asynccontextmanager
async def serving(engine, **limits):
    """The three listeners on free ports, a hub on the shared engine, a real MQTT sink and a watcher. The engine
    publishes as a node of this test's own (not the shared `test`): two runs on one broker stay apart, and what
    it leaves retained is deleted after the test (conftest)."""
    ports = {p: free_port() for p in ("audiosocket", "twilio", "freeswitch", "audiohook")}
    opts = IngestOptions(**{p: f"127.0.0.1:{port}" for p, port in ports.items()}, **limits)
    shared_node, engine.node = engine.node, unique_node("calls")
    sink = MqttSink(MqttOptions(spool="memory", health_interval_s=0), "mqtt://127.0.0.1:1883", engine.node)
    try:
        await sink.start()
        watcher = Watcher(engine.node)
        watching = asyncio.create_task(watcher.run())
        await asyncio.wait_for(watcher._ready.wait(), 10)
        hub = CallHub(engine, [sink], opts)
        servers = await start_listeners(hub)
        try:
            yield hub, ports, watcher
        finally:
            await hub.close()
            for server in servers:
                server.close()
            await sink.close()
            await asyncio.sleep(0.3)  # let the watcher see the last messages
            watching.cancel()
    finally:
        engine.node = shared_node


async def audiosocket_call(
    port: int, audio: bytes, call_id: str, hangup: bool = True, kind: int = 0x10, raw: bytes = b""
) -> bytes:
    """A real AudioSocket client: UUID frame, 20 ms slin frames, hangup; returns what the server sent back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(struct.pack(">BH", 0x01, 16) + uuid.UUID(call_id).bytes)
    size = {0x10: 320, 0x12: 640}[kind]
    for chunk in frames(audio, size):
        writer.write(struct.pack(">BH", kind, len(chunk)) + chunk)
        await writer.drain()
    writer.write(raw)
    if hangup:
        writer.write(struct.pack(">BH", 0x00, 0))
    elif raw:
        writer.write_eof()  # a frame cut short is only known as such when the stream ends
    await writer.drain()
    back = await asyncio.wait_for(reader.read(), 60) if hangup or raw else b""
    writer.close()
    return back


def twilio_messages(call_sid: str, tracks: dict[str, bytes], parameters: dict | None = None) -> list[str]:
    sid = f"MZ{uuid.uuid4().hex}"
    out = [
        json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
        json.dumps(
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": sid,
                "start": {
                    "accountSid": "AC1",
                    "streamSid": sid,
                    "callSid": call_sid,
                    "tracks": list(tracks),
                    "customParameters": parameters or {},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        ),
    ]
    chunks = {track: frames(data, 160) for track, data in tracks.items()}
    for i in range(max(len(c) for c in chunks.values())):
        for track, c in chunks.items():
            if i < len(c):
                out.append(
                    json.dumps(
                        {
                            "event": "media",
                            "streamSid": sid,
                            "media": {
                                "track": track,
                                "chunk": str(i + 1),
                                "timestamp": str(20 * i),
                                "payload": base64.b64encode(c[i]).decode(),
                            },
                        }
                    )
                )
    return out


async def websocket_call(
    port: int, messages: list, path: str = "/", subprotocols=None, stop: str | None = None, wait: bool = False
):
    """A real WebSocket client; sends `stop` or closes (unless it `wait`s for the server to close);
    returns the close code and reason of the closing handshake."""
    async with connect(f"ws://127.0.0.1:{port}{path}", subprotocols=subprotocols, max_size=None) as ws:
        try:
            for message in messages:
                await ws.send(message)
            if stop:
                await ws.send(stop)
            elif not wait:
                await ws.close()
            await asyncio.wait_for(ws.wait_closed(), 60)
        except ConnectionClosed:
            pass
        return ws.close_code, ws.close_reason


def check_call(watcher: Watcher, call_id: str, roles: set[str], reason: str = "hangup") -> dict:
    started = [m for m in watcher.of(call_id, "lifecycle") if m["type"] == "started"]
    assert len(started) == 1 and set(started[0]["roles"]) == roles
    ended = watcher.ended(call_id)
    assert ended["reason"] == reason, ended
    topics = {t for t, m in watcher.messages if m.get("call_id") == call_id and t.endswith("/event")}
    states = {t for t, m in watcher.messages if t.endswith("/state") and f"/call/{call_id}/" in t}
    assert states <= {t.replace("/event", "/state") for t in topics}  # (a state superseded by its clearing is not sent)
    assert topics == {f"emotion/v1/{watcher.node}/call/{call_id}/{r}/event" for r in roles}
    for role in roles:
        events = [m for m in watcher.of(call_id, "event") if m["role"] == role]
        assert events and [e["seq"] for e in events] == list(range(len(events)))
        for e in events:
            validate(e)
    assert set(ended["summary"]["utterances"]) == roles
    return ended


async def test_audiosocket_call_gives_customer_events_and_a_summary(engine, broker, speak):
    async with serving(engine) as (_hub, ports, watcher):
        call_id = str(uuid.uuid4())
        await audiosocket_call(ports["audiosocket"], pcm16(utterance(speak, ANGRY_ES), 8000), call_id)
        (ended,) = await watcher.until_ended(call_id)
    check_call(watcher, call_id, {"customer"})
    event = watcher.of(call_id, "event")[0]
    assert "vez" in event["transcript"] and event["call_id"] == call_id and event["role"] == "customer"
    summary = ended["summary"]
    assert abs(sum(summary["share"]["customer"].values()) - 1) < 1e-3
    assert summary["timeline"][0]["label"] == event["label"] and summary["duration_s"] > 0


async def test_twilio_tracks_become_customer_and_agent(engine, broker, speak, tmp_path):
    async with serving(engine) as (_hub, ports, watcher):
        call_sid = f"CA{uuid.uuid4().hex}"
        tracks = {
            "inbound": ulaw(utterance(speak, ANGRY_ES), tmp_path),
            "outbound": ulaw(utterance(speak, HAPPY_ES), tmp_path),
        }
        code, _ = await websocket_call(
            ports["twilio"],
            twilio_messages(call_sid, tracks),
            stop=json.dumps({"event": "stop", "stop": {"callSid": call_sid}}),
        )
        await watcher.until_ended(call_sid)
    assert code == 1000
    check_call(watcher, call_sid, {"customer", "agent"})
    texts = {
        role: " ".join(m["transcript"] for m in watcher.of(call_sid, "event") if m["role"] == role)
        for role in ("customer", "agent")
    }
    assert "vez" in texts["customer"] and "gracias" in texts["agent"].lower(), texts


async def test_freeswitch_stereo_splits_caller_and_callee(engine, broker, speak):
    async with serving(engine) as (_hub, ports, watcher):
        call_id = str(uuid.uuid4())
        left, right = utterance(speak, ANGRY_ES), utterance(speak, HAPPY_ES)
        n = max(len(left), len(right))
        stereo = np.stack([np.pad(left, (0, n - len(left))), np.pad(right, (0, n - len(right)))], axis=1)
        data = (stereo * 32767).astype("<i2").tobytes()
        metadata = json.dumps({"callId": call_id, "mixType": "stereo", "sampleRate": 16000})
        await websocket_call(ports["freeswitch"], [metadata, *frames(data, 1280)], subprotocols=["audio.drachtio.org"])
        await watcher.until_ended(call_id)
    check_call(watcher, call_id, {"customer", "agent"})


async def test_audiohook_session_with_stereo_pcmu(engine, broker, speak, tmp_path):
    """Genesys AudioHook v2: open/opened, ping/pong, stereo μ-law (customer left), close/closed."""
    async with serving(engine, token="k3y") as (_hub, ports, watcher):
        conversation, session = str(uuid.uuid4()), str(uuid.uuid4())
        left, right = ulaw(utterance(speak, ANGRY_ES), tmp_path), ulaw(utterance(speak, HAPPY_ES), tmp_path)
        n = max(len(left), len(right))
        stereo = np.stack(
            [np.frombuffer(left.ljust(n, b"\xff"), np.uint8), np.frombuffer(right.ljust(n, b"\xff"), np.uint8)], axis=1
        ).tobytes()  # 0xff: μ-law 0
        media = {"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000}
        seq = iter(range(1, 1000))

        def control(kind: str, **parameters) -> str:
            return json.dumps(
                {
                    "version": "2",
                    "id": session,
                    "type": kind,
                    "seq": next(seq),
                    "serverseq": 0,
                    "position": "PT0S",
                    "parameters": parameters,
                }
            )

        async with connect(f"ws://127.0.0.1:{ports['audiohook']}", additional_headers={"X-API-KEY": "k3y"}) as ws:
            await ws.send(
                control(
                    "open",
                    organizationId="o",
                    conversationId=conversation,
                    participant={"id": "p", "ani": "+34600000000", "dnis": "+34910000000"},
                    media=[{"type": "audio", "format": "OPUS", "channels": ["external"], "rate": 48000}, media],
                )
            )
            opened = json.loads(await ws.recv())
            assert (opened["type"], opened["seq"], opened["clientseq"]) == ("opened", 1, 1)
            assert opened["parameters"]["media"] == [media]
            await ws.send(control("ping"))
            pong = json.loads(await ws.recv())
            assert (pong["type"], pong["seq"], pong["clientseq"]) == ("pong", 2, 2)
            for chunk in frames(stereo, 1600):  # 100 ms of both channels
                await ws.send(chunk)
            await ws.send(control("close", reason="end"))
            assert json.loads(await ws.recv())["type"] == "closed"
        (ended,) = await watcher.until_ended(conversation)
        async with connect(f"ws://127.0.0.1:{ports['audiohook']}") as ws:  # no key
            await ws.send(control("open", conversationId="x", media=[media]))
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008
    check_call(watcher, conversation, {"customer", "agent"})
    assert ended["metadata"]["participant"]["ani"] == "+34600000000"
    texts = {m["role"]: m["transcript"] for m in watcher.of(conversation, "event")}
    assert "gracias" in texts["agent"].lower()


async def test_twenty_concurrent_calls_each_get_their_events(engine, broker, speak, tmp_path):
    speech = utterance(speak, "Quiero hablar con un responsable ahora mismo")
    slin, mulaw = pcm16(speech, 8000), ulaw(speech, tmp_path)
    async with serving(engine) as (_hub, ports, watcher):
        ids = [str(uuid.uuid4()) for _ in range(20)]
        calls = []
        for i, call_id in enumerate(ids):
            if i % 3 == 0:
                calls.append(audiosocket_call(ports["audiosocket"], slin, call_id))
            elif i % 3 == 1:
                calls.append(
                    websocket_call(
                        ports["twilio"],
                        twilio_messages(call_id, {"inbound": mulaw}),
                        stop=json.dumps({"event": "stop"}),
                    )
                )
            else:
                meta = json.dumps({"callId": call_id})
                calls.append(websocket_call(ports["freeswitch"], [meta, *frames(slin, 320)]))
        await asyncio.gather(*calls)
        await watcher.until_ended(*ids, timeout=240)
        assert engine.batches < engine.batched  # at least one batch held utterances of several calls
    for call_id in ids:
        check_call(watcher, call_id, {"customer"})


@pytest.mark.parametrize("case", ["unknown type", "short frame", "odd audio", "abrupt close"])
async def test_audiosocket_errors_end_that_call_only(engine, broker, speak, case):
    speech = pcm16(utterance(speak, HAPPY_ES), 8000)
    raw = {
        "unknown type": struct.pack(">BH", 0x42, 1) + b"x",
        "short frame": struct.pack(">BH", 0x10, 320) + b"ab",
        "odd audio": struct.pack(">BH", 0x10, 3) + b"abc",
        "abrupt close": b"",
    }[case]
    async with serving(engine) as (_hub, ports, watcher):
        bad, good = str(uuid.uuid4()), str(uuid.uuid4())
        healthy = asyncio.create_task(audiosocket_call(ports["audiosocket"], speech, good))
        back = await audiosocket_call(ports["audiosocket"], speech[:8000], bad, hangup=False, raw=raw)
        await healthy
        bad_end, good_end = await watcher.until_ended(bad, good)
    expected = {
        "unknown type": "unknown frame type 0x42",
        "short frame": "closed inside a frame",
        "odd audio": "odd number of bytes",
        "abrupt close": None,
    }[case]
    if expected:
        assert bad_end["reason"] == "error" and expected in bad_end["error"]
        assert back == struct.pack(">BH", 0x00, 0)  # we told Asterisk to hang up
    else:
        assert bad_end["reason"] == "disconnected"
    assert good_end["reason"] == "hangup" and watcher.of(good, "event")


async def test_audiosocket_without_uuid_opens_no_call(engine, broker):
    async with serving(engine) as (hub, ports, watcher):
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["audiosocket"])
        writer.write(struct.pack(">BH", 0x10, 320) + bytes(320))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed on us
        writer.close()
        assert not hub.calls
    assert not watcher.messages


@pytest.mark.parametrize("case", ["bad base64", "media before start", "unknown event", "oversized", "abrupt"])
async def test_twilio_errors(engine, broker, speak, tmp_path, case):
    mulaw = ulaw(utterance(speak, HAPPY_ES), tmp_path)
    async with serving(engine, max_frame_bytes=4096) as (_hub, ports, watcher):
        call_sid = f"CA{uuid.uuid4().hex}"
        messages = twilio_messages(call_sid, {"inbound": mulaw})
        stop = json.dumps({"event": "stop"})
        if case == "bad base64":
            messages.insert(5, json.dumps({"event": "media", "media": {"track": "inbound", "payload": "@@not base64"}}))
        elif case == "media before start":
            messages = [messages[0], messages[3], *messages[1:]]
        elif case == "unknown event":
            messages.insert(5, json.dumps({"event": "transcription", "whatever": 1}))
        elif case == "oversized":
            messages.insert(5, json.dumps({"event": "media", "media": {"payload": "A" * 8000}}))
        if case == "abrupt":
            async with connect(f"ws://127.0.0.1:{ports['twilio']}") as ws:
                for message in messages[:40]:
                    await ws.send(message)
                ws.transport.abort()  # no close frame, no stop
            code = None
        else:
            code, _reason = await websocket_call(ports["twilio"], messages, stop=stop)
        if case != "media before start":
            (ended,) = await watcher.until_ended(call_sid)
    if case == "media before start":
        assert code == 1008 and not watcher.messages
    elif case == "unknown event":
        assert code == 1000 and ended["reason"] == "hangup" and watcher.of(call_sid, "event")
    elif case == "abrupt":
        assert ended["reason"] == "disconnected"
    else:
        assert code == 1002 or code == 1009
        assert (
            ended["reason"] == "error"
            and {"bad base64": "base64", "oversized": "max_frame_bytes"}[case] in (ended["error"])
        )


async def test_freeswitch_errors(engine, broker):
    async with serving(engine) as (_hub, ports, watcher):
        call_id = str(uuid.uuid4())
        meta = json.dumps({"callId": call_id, "mixType": "stereo"})
        code, reason = await websocket_call(ports["freeswitch"], [meta, bytes(640), bytes(6)], wait=True)
        (ended,) = await watcher.until_ended(call_id)
        assert code == 1002 and "2-channel" in reason
        assert ended["reason"] == "error" and "not whole 2-channel" in ended["error"]
        code, reason = await websocket_call(ports["freeswitch"], [bytes(640)], wait=True)  # binary before metadata
        assert code == 1008 and "JSON" in reason
        code, reason = await websocket_call(ports["freeswitch"], [json.dumps({"mixType": "quad"})], wait=True)
        assert code == 1008 and "quad" in reason


async def test_token_limits_idle_and_alerts(engine, broker, speak, tmp_path):
    rule = EscalationRule(role="customer", label="anger", min_confidence=0.0, hits=1, window=1)
    speech = utterance(speak, ANGRY_ES)
    async with serving(engine, token="s3cret", max_calls=1, idle_s=1.0, escalation=rule) as (_hub, ports, watcher):
        messages = twilio_messages(f"CA{uuid.uuid4().hex}", {"inbound": ulaw(speech, tmp_path)})
        code, reason = await websocket_call(ports["twilio"], messages, wait=True)
        assert code == 1008 and "missing token" in reason
        sid = f"CA{uuid.uuid4().hex}"
        code, _ = await websocket_call(
            ports["twilio"],
            twilio_messages(sid, {"inbound": ulaw(speech, tmp_path)}, {"token": "s3cret"}),
            stop=json.dumps({"event": "stop"}),
        )
        (ended,) = await watcher.until_ended(sid)
        assert code == 1000 and "token" not in json.dumps(ended["metadata"])
        alerts = watcher.of(sid, "alert")
        assert alerts and alerts[0]["rule"] == rule.describe() and ended["summary"]["alerts"] == alerts
        # one call at a time: a second one is refused while the first sits idle, then the first times out
        idle = str(uuid.uuid4())
        async with connect(f"ws://127.0.0.1:{ports['freeswitch']}/?token=s3cret") as ws:
            await ws.send(json.dumps({"callId": idle}))
            await asyncio.sleep(0.2)
            code, reason = await websocket_call(ports["freeswitch"], [json.dumps({})], path="/?token=s3cret", wait=True)
            assert code == 1013 and "max_calls" in reason
            (ended,) = await watcher.until_ended(idle, timeout=10)
        assert ended["reason"] == "idle"


async def test_escalation_rule_needs_hits_within_the_window_and_rearms(engine, tmp_path):
    out = tmp_path / "calls.jsonl"
    sink = JsonlSink(str(out))
    await sink.start()
    hub = CallHub(engine, [sink], IngestOptions(escalation=EscalationRule(min_confidence=0.7, hits=2, window=3)))
    call = hub.open("c1", "test", ["inbound", "outbound"])
    for seq, (role, anger) in enumerate(
        [
            ("customer", 0.9),
            ("agent", 0.95),
            ("customer", 0.1),
            ("customer", 0.1),
            ("customer", 0.8),
            ("customer", 0.75),
            ("customer", 0.9),
        ]
    ):
        event = make_event(f"c1/{role}", seq, engine.node)
        event.call_id, event.role = "c1", role
        event.emotion.scores.update(dict.fromkeys(LABELS, 0.0) | {"anger": anger, "neutral": 1 - anger})
        call.monitor.send(event)
    ended = await call.end("hangup")
    await sink.close()
    alerts = [m for m in map(json.loads, out.read_text().splitlines()) if m["schema"] == "emotion-monitor/alert/v1"]
    assert [a["segment_ids"] for a in alerts] == [[4, 5]]  # 0 fell out of the window; 6 alone re-arms
    summary = ended["summary"]
    assert summary["utterances"] == {"customer": 6, "agent": 1} and len(summary["timeline"]) == 7
    assert summary["alerts"] == alerts and ended["reason"] == "hangup" and not hub.calls


async def test_serve_command_takes_calls_and_ends_them_on_sigterm(broker, speak, tmp_path):
    """`emotion-monitor serve` as a user starts it; a call still open at SIGTERM ends with reason shutdown."""
    node, ports = unique_node("serve"), [free_port() for _ in range(3)]
    out = tmp_path / "calls.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamer",
        "serve",
        "--language",
        "es",
        "--audiosocket",
        f"127.0.0.1:{ports[0]}",
        "--twilio",
        f"127.0.0.1:{ports[1]}",
        "--freeswitch",
        str(ports[2]),
        "--broker",
        "mqtt://127.0.0.1:1883",
        "--node",
        node,
        "--jsonl",
        str(out),
        stderr=asyncio.subprocess.PIPE,
    )
    watcher = Watcher(node)
    watching = asyncio.create_task(watcher.run())
    try:
        async with asyncio.timeout(120):
            while True:  # all three listeners up
                try:
                    for port in ports:
                        (await asyncio.open_connection("127.0.0.1", port))[1].close()
                    break
                except OSError:
                    await asyncio.sleep(0.3)
        done, open_call = str(uuid.uuid4()), str(uuid.uuid4())
        await audiosocket_call(ports[0], pcm16(utterance(speak, HAPPY_ES), 8000), done)
        await watcher.until_ended(done)
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[0])
        writer.write(struct.pack(">BH", 0x01, 16) + uuid.UUID(open_call).bytes)
        writer.write(
            b"".join(struct.pack(">BH", 0x10, 320) + c for c in frames(pcm16(utterance(speak, ANGRY_ES), 8000), 320))
        )
        await writer.drain()
        async with asyncio.timeout(60):
            while not [m for m in watcher.of(open_call, "lifecycle") if m["type"] == "started"]:
                await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(reader.read(), 60) == struct.pack(">BH", 0x00, 0)  # told to hang up
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        (ended,) = await watcher.until_ended(open_call, timeout=30)
    finally:
        if proc.returncode is None:
            proc.kill()
        watching.cancel()
        await clear_node(node)
    assert ended["reason"] == "shutdown" and ended["summary"]["utterances"].get("customer", 0) >= 1
    check_call(watcher, done, {"customer"})
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {line["schema"] for line in lines} == {"emotion-monitor/call/v1", "emotion-monitor/event/v1"}


@pytest.mark.parametrize("ready", ["online", "serving calls"])
async def test_serve_stops_cleanly_on_sigterm_as_soon_as_it_says_it_is_up(broker, ready):
    """A supervisor may stop `serve` the moment it looks up: its retained `online` (the models load for seconds
    after it) or its `serving calls` line. The SIGTERM handler was installed only after both, so such a signal
    killed it (exit -15, `offline` only from the Last Will, no clean shutdown)."""
    node, port = unique_node("serve"), free_port()
    args = ["serve", "--language", "es", "--node", node, "--audiosocket", f"127.0.0.1:{port}"]
    code, err = await stop_as_soon_as_up(
        [*args, "--broker", "mqtt://127.0.0.1:1883"], node, None if ready == "online" else b"serving calls"
    )
    assert code == 0, err.decode()[-3000:]
    assert retained_under([node])[status_topic(node)] == b"offline"


def test_serve_without_listeners_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "streamer", "serve"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--audiosocket" in result.stderr
