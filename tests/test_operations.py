"""Operations: graceful SIGTERM, overload shedding, /metrics and /healthz, on the real chain."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from streamer.frames import SAMPLE_RATE
from streamer.pipeline import PipelineOptions, run_stream
from streamer.sources import FileSource
from tests.conftest import NEUTRAL_ES, free_port, silence
from tests.test_pipeline import ListSink

SENTENCES = NEUTRAL_ES[:6]


@pytest.fixture(scope="module")
def many_utterances(speak, tmp_path_factory):
    path = tmp_path_factory.mktemp("ops") / "many.wav"
    sf.write(path, np.concatenate([np.concatenate([speak(s), silence(0.8)]) for s in SENTENCES]), SAMPLE_RATE)
    return path


async def test_overload_sheds_to_voice_only_then_drops_oldest(engine, many_utterances):
    """Played as fast as possible, the recogniser falls behind: no reader stall, every outcome counted."""
    sink = ListSink()
    stats = await run_stream(
        FileSource(many_utterances, realtime=False),
        engine,
        [sink],
        "busy",
        options=PipelineOptions(voice_only_backlog=1, max_backlog=3),
    )
    assert stats.events + stats.dropped + stats.failed == stats.utterances + stats.dropped
    assert stats.voice_only >= 1 and stats.events >= 3
    assert [e.seq for e in sink.events] == list(range(stats.events))
    shed = [e for e in sink.events if e.transcript.rejected == "overload"]
    assert len(shed) == stats.voice_only
    assert all(e.emotion.text_scores is None and e.emotion.scores == e.emotion.audio_scores for e in shed)
    unhurried = ListSink()
    calm = await run_stream(
        FileSource(many_utterances, realtime=False),
        engine,
        [unhurried],
        "calm",
        options=PipelineOptions(voice_only_backlog=100, max_backlog=100),
    )
    assert calm.voice_only == calm.dropped == 0 and calm.events == stats.utterances + stats.dropped


def start_monitor(path, node: str, *args):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamer",
            "run",
            "--language",
            "es",
            "--source",
            f"file:{path}",
            "--quiet",
            "--broker",
            "mqtt://127.0.0.1:1883",
            "--node",
            node,
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )


def wait_for_lines(proc, count: int, timeout: float = 90) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while len(lines) < count and time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            break
        lines.append(line)
    return lines


def test_sigterm_finishes_the_utterance_in_progress(speak, tmp_path, broker, mqtt_node):
    path = tmp_path / "two.wav"
    second = speak("Mañana iremos al mercado a comprar fruta y verdura para toda la semana.")
    sf.write(path, np.concatenate([silence(0.5), speak(SENTENCES[0]), silence(1.0), second, silence(5.0)]), SAMPLE_RATE)
    proc = start_monitor(path, mqtt_node, "--jsonl", "-")
    try:
        assert len(wait_for_lines(proc, 1)) == 1  # first sentence published, real time
        time.sleep(1.5)  # the second sentence is being spoken
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    events = [json.loads(line) for line in out.decode().splitlines()]
    assert proc.returncode == 0, err.decode()
    # the second sentence was cut short by the signal, but not lost
    assert [e["segment_id"] for e in events] == [1] and events[0]["transcript"]
    assert "Traceback" not in err.decode()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_and_healthz(many_utterances, broker, tmp_path, mqtt_node):
    port = free_port()
    config = tmp_path / "c.yaml"
    config.write_text("mqtt:\n  health_interval_s: 0.5\n")
    proc = start_monitor(
        many_utterances, mqtt_node, "--metrics", f"127.0.0.1:{port}", "--jsonl", "-", "--config", str(config)
    )
    try:
        assert len(wait_for_lines(proc, 2)) == 2
        status, body = get(f"http://127.0.0.1:{port}/healthz")
        health = json.loads(body)
        assert status == 200 and health["status"] == "ok" and health["mqtt_connected"] and health["streams"] == 1
        status, metrics = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert 'emotion_monitor_utterances_total{outcome="processed"}' in metrics
        assert 'emotion_monitor_stage_latency_seconds_count{stage="asr"}' in metrics
        assert "emotion_monitor_events_published_total" in metrics and "emotion_monitor_spool_size" in metrics
        assert get(f"http://127.0.0.1:{port}/nope")[0] == 404
        time.sleep(1.0)
        retained = subprocess.run(
            ["mosquitto_sub", "-t", f"emotion/v1/{mqtt_node}/health", "-C", "1", "-W", "10"],
            capture_output=True,
            timeout=20,
        )
        published = json.loads(retained.stdout)  # the counts are also published, retained, over MQTT
        assert published["utterances"]["processed"] >= 1 and published["mqtt_connected"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


async def test_every_utterance_arrives_once_across_two_broker_restarts(engine, many_utterances, tmp_path):
    """The whole chain publishing while the broker goes away twice: after dropping QoS-1 duplicates by
    event_id, each utterance's event arrives exactly once and in order."""
    from streamer.publisher import MqttOptions, MqttSink
    from tests.test_publisher import collect_seqs, start_mosquitto, stop_mosquitto

    port, node = free_port(), "late"
    broker = start_mosquitto(port, tmp_path)
    await collect_seqs(port, node, 0)  # the subscriber's persistent session
    sink = MqttSink(MqttOptions(spool=str(tmp_path / "spool.sqlite")), f"mqtt://127.0.0.1:{port}", node)
    await sink.start()
    engine.node = node

    async def outages():
        nonlocal broker
        for _ in range(2):
            await asyncio.sleep(1.0)
            stop_mosquitto(broker)
            await asyncio.sleep(1.0)
            broker = start_mosquitto(port, tmp_path)

    try:
        chaos = asyncio.create_task(outages())
        stats = await run_stream(
            FileSource(many_utterances, realtime=True),
            engine,
            [sink],
            "s",
            options=PipelineOptions(voice_only_backlog=100, max_backlog=100),
        )
        await chaos
        seqs: list[int] = []
        while len(set(seqs)) < stats.events:  # QoS 1 may deliver a message twice
            seqs += await collect_seqs(port, node, stats.events - len(set(seqs)))
        await sink.close()
    finally:
        engine.node = "test"
        stop_mosquitto(broker)
    unique = list(dict.fromkeys(seqs))
    assert stats.events == len(SENTENCES) and unique == list(range(stats.events))
    assert sink.dropped == 0
