"""Sinks against the real Mosquitto, an embedded amqtt broker, and a broker that appears mid-run."""

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
import uuid

import aiomqtt
import pytest

from streamer.event import event_topic, status_topic, topic_safe, validate
from streamer.homeassistant import slug
from streamer.publisher import (
    BrokerUnreachableError,
    JsonlSink,
    MqttOptions,
    MqttSink,
    is_listening,
    parse_broker_url,
    resolve_broker,
)
from tests.conftest import free_port, make_event, unique_node


async def receive(
    host: str,
    port: int,
    topic: str,
    count: int,
    started: asyncio.Event,
    timeout: float = 20,
    identifier: str | None = None,
):
    """Collect `count` messages; with an `identifier`, in a persistent session the broker queues for."""
    got = []
    async with aiomqtt.Client(
        host, port, identifier=identifier or f"test-sub-{uuid.uuid4().hex[:8]}", clean_session=identifier is None
    ) as client:
        await client.subscribe(topic, qos=1)
        started.set()
        if count == 0:
            return got
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                got.append((str(message.topic), message.payload.decode(), message.retain))
                if len(got) >= count:
                    break
    return got


async def clear_retained(host: str, port: int, topic: str) -> None:
    """Leave the shared broker as we found it: an empty retained message deletes the retained status."""
    async with aiomqtt.Client(host, port) as client:
        await client.publish(topic, b"", qos=1, retain=True)


async def retained(topic: str, wait: float = 1.0) -> dict[str, bytes]:
    """What a newly connecting subscriber gets at once: the retained messages under `topic`."""
    got = {}
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"late-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(wait):
                async for message in client.messages:
                    if message.retain:
                        got[str(message.topic)] = message.payload
        except TimeoutError:
            pass
    return got


async def clear_node(node: str) -> None:
    """Delete every retained message a node left: its topics and its Home Assistant discovery configs."""
    got = await retained(f"emotion/v1/{topic_safe(node)}/#") | await retained(f"homeassistant/+/{slug(node)}/#")
    for topic in got:
        await clear_retained("127.0.0.1", 1883, topic)


async def publish_and_collect(url: str, host: str, port: int, node: str, events: int, opts: MqttOptions):
    started = asyncio.Event()
    collector = asyncio.create_task(receive(host, port, f"emotion/v1/{node}/#", events + 1, started))
    await started.wait()
    sink = MqttSink(opts, url, node)
    await sink.start()
    for i in range(events):
        sink.send(make_event("s1", i, node))
    got = await collector
    await sink.close()
    return got, sink


async def test_events_and_status_reach_mosquitto(broker):
    node = unique_node("n")
    got, sink = await publish_and_collect("mqtt://127.0.0.1:1883", *broker, node, 5, MqttOptions())
    assert (status_topic(node), "online", False) in got
    events = [json.loads(p) for t, p, _ in got if t == event_topic(node, "s1")]
    assert [e["seq"] for e in events] == list(range(5))
    for e in events:
        validate(e)
    assert sink.published == 5
    # the status is retained: a late subscriber sees offline after a clean close
    started = asyncio.Event()
    late = await receive(*broker, status_topic(node), 1, started)
    assert late == [(status_topic(node), "offline", True)]
    await clear_node(node)


async def test_last_will_marks_a_dead_publisher_offline(broker, tmp_path):
    node = unique_node("n")
    script = tmp_path / "pub.py"
    script.write_text(
        "import asyncio, os, sys\n"
        "from streamer.publisher import MqttOptions, MqttSink\n"
        "async def main():\n"
        f"    sink = MqttSink(MqttOptions(keepalive=1), 'mqtt://127.0.0.1:1883', '{node}')\n"
        "    await sink.start(); await sink.connected.wait(); print('up', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"up"
        started = asyncio.Event()
        watcher = asyncio.create_task(receive(*broker, status_topic(node), 2, started))
        await started.wait()
        proc.kill()
        got = await watcher
        assert [p for _, p, _ in got] == ["online", "offline"]
        await clear_node(node)
    finally:
        proc.kill()
        proc.wait()


async def test_embedded_broker_serves_when_none_listens():
    port = free_port()
    url, embedded = await resolve_broker(MqttOptions(url="auto", embedded_port=port))
    assert embedded is not None and url == f"mqtt://127.0.0.1:{port}"
    try:
        got, _ = await publish_and_collect(url, "127.0.0.1", port, "emb", 3, MqttOptions())
        assert sum(t.endswith("/event") for t, _, _ in got) == 3
    finally:
        await embedded.stop()


async def test_auto_uses_the_running_broker(broker):
    url, embedded = await resolve_broker(MqttOptions(url="auto"))
    assert embedded is None and url == "mqtt://127.0.0.1:1883"


def start_mosquitto(port: int, tmp_path) -> subprocess.Popen:
    """A Mosquitto the test controls, persisting sessions in tmp_path across restarts."""
    conf = tmp_path / f"mosquitto-{port}.conf"
    conf.write_text(
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
        f"persistence_location {tmp_path}/\n"
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    for _ in range(50):
        if is_listening("127.0.0.1", port):
            return proc
        time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def stop_mosquitto(proc: subprocess.Popen) -> None:
    proc.terminate()  # SIGTERM: Mosquitto saves its sessions to disk
    proc.wait()


async def collect_seqs(port: int, node: str, count: int) -> list[int]:
    started = asyncio.Event()
    got = await receive("127.0.0.1", port, f"emotion/v1/{node}/s/event", count, started, identifier="late-sub")
    return [json.loads(p)["seq"] for _, p, _ in got]


async def test_events_survive_a_broker_that_is_late_and_then_restarts(tmp_path):
    """Broker unreachable at start, then stopped mid-run: events are buffered and delivered in order.

    The subscriber keeps a persistent session, so what the monitor publishes while it is away is queued for it.
    """
    port, node = free_port(), "late"
    mosquitto = start_mosquitto(port, tmp_path)
    await collect_seqs(port, node, 0)  # create the subscriber's persistent session
    stop_mosquitto(mosquitto)
    sink = MqttSink(MqttOptions(buffer_offline=True), f"mqtt://127.0.0.1:{port}", node)
    await sink.start()
    for i in range(4):
        sink.send(make_event("s", i, node))
    await asyncio.sleep(1.0)
    assert sink.published == 0
    mosquitto = start_mosquitto(port, tmp_path)
    try:
        assert await collect_seqs(port, node, 4) == [0, 1, 2, 3]
        stop_mosquitto(mosquitto)
        for i in range(4, 8):
            sink.send(make_event("s", i, node))
        await asyncio.sleep(1.0)
        mosquitto = start_mosquitto(port, tmp_path)
        seqs = await collect_seqs(port, node, 4)
        assert sorted(set(seqs)) == [4, 5, 6, 7] and seqs == sorted(seqs)
        await sink.close()
        assert sink.dropped == 0
    finally:
        stop_mosquitto(mosquitto)


def test_broker_urls():
    opts = MqttOptions(username="envuser", password="envpass")
    a = parse_broker_url("mqtts://u%40x:p%3Aw@broker.example:8884", opts)
    assert (a.host, a.port, a.tls, a.username, a.password) == ("broker.example", 8884, True, "u@x", "p:w")
    b = parse_broker_url("mqtt://localhost", opts)
    assert (b.port, b.tls, b.username, b.password) == (1883, False, "envuser", "envpass")
    with pytest.raises(ValueError, match="broker URL"):
        parse_broker_url("http://x", opts)


def test_topic_levels_are_sanitised():
    assert topic_safe("call/+/#\x00 ñ") == "call______ñ"
    assert event_topic("a/b", "#") == "emotion/v1/a_b/_/event"


async def test_jsonl_sink_writes_valid_events(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = JsonlSink(str(path), publish_transcript=False)
    await sink.start()
    sink.send(make_event("s", 0))
    await sink.close()
    line = json.loads(path.read_text())
    validate(line)
    assert line["transcript"] == ""
    assert line["latency_ms"]["total"] >= 0


async def test_tls_with_username_and_password(tmp_path):
    """mqtts:// with a CA the test makes and a password file, against a real Mosquitto."""
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            tmp_path / "ca.key",
            "-out",
            tmp_path / "ca.crt",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            tmp_path / "server.key",
            "-out",
            tmp_path / "server.csr",
        ],
        check=True,
        capture_output=True,
    )
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    subprocess.run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            tmp_path / "server.csr",
            "-CA",
            tmp_path / "ca.crt",
            "-CAkey",
            tmp_path / "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            tmp_path / "san.ext",
            "-out",
            tmp_path / "server.crt",
        ],
        check=True,
        capture_output=True,
    )
    passwords = tmp_path / "passwd"
    passwords.write_text("monitor:s3cret\n")
    subprocess.run(["mosquitto_passwd", "-U", passwords], check=True)
    port = free_port()
    conf = tmp_path / "tls.conf"
    conf.write_text(
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
        f"cafile {tmp_path / 'ca.crt'}\ncertfile {tmp_path / 'server.crt'}\n"
        f"keyfile {tmp_path / 'server.key'}\n"
    )
    mosquitto = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if is_listening("127.0.0.1", port):
                break
            time.sleep(0.05)
        secret = tmp_path / "secret"
        secret.write_text("s3cret\n")
        opts = MqttOptions(username="monitor", password_file=str(secret), tls_ca=str(tmp_path / "ca.crt"))
        sink = MqttSink(opts, f"mqtts://127.0.0.1:{port}", "tls")
        await sink.start()
        sink.send(make_event("s", 0, "tls"))
        await asyncio.wait_for(sink.connected.wait(), 10)
        await sink.close()
        assert sink.published == 1
        # a wrong password is a start-up error that names it …
        wrong = MqttOptions(username="monitor", password="nope", tls_ca=str(tmp_path / "ca.crt"), spool="memory")
        with pytest.raises(BrokerUnreachableError, match="refused the credentials"):
            await MqttSink(wrong, f"mqtts://127.0.0.1:{port}", "tls").start()
        # … and when buffering offline it never connects: events stay buffered, nothing is lost silently
        wrong = MqttSink(dataclasses.replace(wrong, buffer_offline=True), f"mqtts://127.0.0.1:{port}", "tls")
        await wrong.start()
        wrong.send(make_event("s", 0, "tls"))
        await asyncio.sleep(1.0)
        assert wrong.published == 0 and not wrong.connected.is_set()
        await wrong.close(timeout=0.5)
    finally:
        mosquitto.terminate()
        mosquitto.wait()


async def test_spooled_events_survive_a_restart_of_the_monitor(broker, tmp_path):
    """Broker unreachable until the monitor stops: the events wait on disk and the next run sends them."""
    spool = str(tmp_path / "spool.sqlite")
    node = unique_node("n")
    first = MqttSink(MqttOptions(spool=spool, buffer_offline=True), f"mqtt://127.0.0.1:{free_port()}", node)
    await first.start()
    for i in range(3):
        first.send(make_event("s", i, node))
    await first.close(timeout=0.5)
    assert first.published == 0
    started = asyncio.Event()
    collector = asyncio.create_task(receive(*broker, f"emotion/v1/{node}/s/event", 3, started))
    await started.wait()
    second = MqttSink(MqttOptions(spool=spool), "mqtt://127.0.0.1:1883", node)
    assert second.spool.size() == 3
    await second.start()
    assert [json.loads(p)["seq"] for _, p, _ in await collector] == [0, 1, 2]
    await second.close()
    assert second.published == 3
    await clear_node(node)


def test_full_spool_drops_interim_before_final_and_counts(tmp_path):
    from streamer.spool import Spool

    spool = Spool(tmp_path / "s.sqlite", max_events=3)
    spool.append("t", "final-0", final=True)
    spool.append("t", "interim-1", final=False)
    spool.append("t", "final-2", final=True)
    spool.append("t", "final-3", final=True)  # full: the interim one goes
    assert [m.payload for m in spool.head()] == ["final-0", "final-2", "final-3"]
    spool.append("t", "final-4", final=True)  # no interim left: the oldest goes, counted
    assert [m.payload for m in spool.head()] == ["final-2", "final-3", "final-4"]
    assert spool.dropped == 2 and spool.high_water == 3


def test_a_spool_file_serves_one_process_at_a_time(tmp_path):
    """A second monitor with the same node and broker would block on SQLite and publish the first one's events."""
    from streamer.spool import Spool, SpoolInUseError

    path = tmp_path / "s.sqlite"
    first = Spool(path)
    first.append("t", "kept")
    other = subprocess.run(
        [sys.executable, "-c", f"from streamer.spool import Spool; Spool({str(path)!r})"],
        capture_output=True,
        text=True,
    )
    assert other.returncode != 0 and "in use by another process" in other.stderr
    with pytest.raises(SpoolInUseError):
        Spool(path)
    first.close()
    second = Spool(path)  # released on close: the next run takes over what is left
    assert [m.payload for m in second.head()] == ["kept"]
    second.close()


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("mqtt://no-such-broker.invalid:1883", "cannot resolve the host name 'no-such-broker.invalid'"),
        ("mqtt://127.0.0.1:{port}", "connection refused: nothing listens on 127.0.0.1:{port}"),
    ],
)
async def test_a_broker_that_cannot_be_reached_at_start_up_is_an_error(url, cause, tmp_path, caplog):
    """Before: "no MQTT v5 …, trying 3.1.1", then retries forever, and a spool file per mistyped URL."""
    port = free_port()
    url, cause = url.format(port=port), cause.format(port=port)
    sink = MqttSink(MqttOptions(spool=str(tmp_path / "spool.sqlite")), url, "typo")
    t0 = time.monotonic()
    with pytest.raises(BrokerUnreachableError, match=f"{url} cannot be reached: {cause}.*--buffer-offline"):
        await sink.start()
    assert time.monotonic() - t0 < 10
    assert "3.1.1" not in caplog.text
    assert not list(tmp_path.iterdir())  # no spool left behind


def test_a_spool_file_goes_when_it_is_empty(tmp_path):
    from streamer.spool import Spool

    kept, emptied = Spool(tmp_path / "kept.sqlite"), Spool(tmp_path / "emptied.sqlite")
    kept.append("t", "waiting")
    emptied.append("t", "sent")
    emptied.remove(emptied.head()[0].rowid)
    kept.close()
    emptied.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.sqlite", "kept.sqlite.lock"]
