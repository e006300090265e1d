"""Scale-out: `emotion-monitor ingest` and two `emotion-monitor worker` processes on the real Mosquitto with the
real models; one killed with SIGKILL mid-run; expired and poison jobs."""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import soundfile as sf
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamer.distributed.jobs import Job, JobError, decode, encode, header
from streamer.event import validate
from streamer.frames import SAMPLE_RATE, Utterance
from tests.conftest import HAPPY_ES, REPO, silence, unique_node

BROKER_URL = "mqtt://127.0.0.1:1883"
CLI = [sys.executable, "-m", "streamer"]


class Collector:
    """Every message on the given filters, from a paho client thread (MQTT v5)."""

    def __init__(self, *filters: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._client.on_message = lambda _c, _u, m: self._add(m.topic, m.payload, m.retain)
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.connect("127.0.0.1", 1883)
        self._client.loop_start()
        self._client.subscribe([(f, 1) for f in filters])
        assert subscribed.wait(5)

    def _add(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            self.messages.append((topic, payload, retain))

    def on(self, suffix: str, prefix: str = "") -> list[bytes]:
        with self._lock:
            return [p for t, p, r in self.messages if t.endswith(suffix) and t.startswith(prefix) and not r]

    def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    def publish(self, topic: str, payload: bytes, properties: Properties | None = None, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain, properties=properties).wait_for_publish(5)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Pool:
    """Worker processes of one group, each with a fixed id (its persistent session) and a log file."""

    def __init__(self, tmp: Path, node: str, config: Path) -> None:
        self.tmp, self.node, self.config = tmp, node, config
        self.group = f"test-{node}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str) -> None:
        log = self.tmp / f"{name}-{len(list(self.tmp.glob(name + '-*.log')))}.log"
        self.logs[name] = log
        with open(log, "w") as out:
            self.procs[name] = subprocess.Popen(
                [
                    *CLI,
                    "worker",
                    "--broker",
                    BROKER_URL,
                    "--group",
                    self.group,
                    "--id",
                    self.worker_id(name),
                    "--jobs",
                    f"emotion/v1/jobs/{self.node}/#",
                    "--config",
                    str(self.config),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def worker_id(self, name: str) -> str:
        return f"{self.node}-{name}"

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        for name, log in self.logs.items():
            while " ready: " not in log.read_text():
                assert self.procs[name].poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"worker {name} not ready: {log.read_text()}"
                time.sleep(0.3)

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self, name: str) -> str:
        """SIGTERM: the worker leaves the group and finishes its jobs; its log."""
        self.procs[name].send_signal(signal.SIGTERM)
        assert self.procs[name].wait(60) == 0, self.logs[name].read_text()
        return self.logs[name].read_text()


def clear_retained(filters: list[str]) -> None:
    """Delete the retained messages these tests made (status, health, last state), so the broker stays clean."""
    seen = Collector(*filters)
    time.sleep(1.0)
    for topic in {t for t, p, retained in seen.messages if retained and p}:
        seen.publish(topic, b"", retain=True)
    seen.close()


@pytest.fixture(scope="module")
def node() -> str:
    return unique_node("dist")


@pytest.fixture(scope="module")
def pool(broker, node, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    config = tmp / "scale-out.yaml"
    # 2 attempts 4 s apart: long enough to see other jobs finish while a poison job waits for its retry.
    config.write_text(
        "distributed: {max_attempts: 2, retry_delay_s: 4.0, session_expiry_s: 120}\nmqtt: {health_interval_s: 0}\n"
        "recogniser: {language: es}\n"  # the jobs are Spanish speech
    )
    workers = Pool(tmp, node, config)
    workers.start("a")
    workers.start("b")
    workers.wait_ready()
    yield workers
    for name, proc in workers.procs.items():
        if proc.poll() is None:
            workers.stop(name)
    workers_topics = [f"emotion/v1/worker-{workers.worker_id(n)}/#" for n in "ab"]
    clear_retained([f"emotion/v1/{node}/#", f"homeassistant/+/{node}/#", *workers_topics])


@pytest.fixture(scope="module")
def speech_file(speak, tmp_path_factory) -> Path:
    """Sixteen short sentences with pauses (as many jobs)."""
    sentences = (
        "Buenos días, quiero consultar mi pedido.",
        "Estoy muy enfadado con este servicio.",
        HAPPY_ES,
        "Tengo mucho miedo de perder mi dinero.",
    )
    parts = [silence(0.5)]
    for sentence in sentences * 4:
        parts += [speak(sentence), silence(1.0)]
    path = tmp_path_factory.mktemp("speech") / "sentences.wav"
    sf.write(path, np.concatenate(parts), SAMPLE_RATE)
    return path


def ingest(speech_file: Path, node: str, stream: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *CLI,
            "ingest",
            "--source",
            f"file:{speech_file}",
            "--fast",
            "--broker",
            BROKER_URL,
            "--node",
            node,
            "--stream",
            stream,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def events_by_id(collector: Collector, node: str, stream: str) -> tuple[Counter, dict[str, dict]]:
    events = [json.loads(p) for p in collector.on(f"/{stream}/event", f"emotion/v1/{node}/")]
    return Counter(e["event_id"] for e in events), {e["event_id"]: e for e in events}


def job_ids(collector: Collector, node: str, stream: str) -> list[str]:
    return [header(p)["id"] for p in collector.on(f"/{stream}", f"emotion/v1/jobs/{node}/")]


def test_job_round_trip(speak):
    audio = speak(HAPPY_ES)
    utterance = Utterance(
        **{**Utterance.whole(audio, "s1", speech_s=1.5, source="file:x.wav").__dict__, "pad_s": 0.068}
    )
    job = Job("node-a", 7, utterance, expires=time.time() + 60)
    sizes = {}
    for codec in ("flac", "pcm"):
        payload = encode(job, codec)
        sizes[codec] = len(payload)
        back = decode(payload)
        assert back.id == "node-a/s1/0/final" == header(payload)["id"]
        assert (back.node, back.seq, back.utterance.stream, back.utterance.speech_s) == ("node-a", 7, "s1", 1.5)
        assert back.utterance.pad_s == 0.068
        assert np.max(np.abs(back.utterance.audio - audio)) < 1e-4  # 16-bit quantisation only
        assert abs(back.utterance.speech_end_arrived - utterance.speech_end_arrived) < 0.01  # via wall-clock time
        assert back.utterance.wall_end == utterance.wall_end
    assert sizes["flac"] < 0.8 * sizes["pcm"]
    corrupt = encode(job)[:-1000]
    with pytest.raises(JobError):
        decode(corrupt)
    with pytest.raises(JobError):
        decode(b"\x00\x00\x00\x05hello")


def test_a_worker_reads_the_prosody_of_the_jobs_audio(engine, speak):
    """A worker runs each job through the same `Engine` (`Worker._settle`: `aprocess`, then `remember`), so the voice
    head's prosody comes from the job's decoded audio (16-bit, as the ingest node cut it) and counts in that worker's
    history of the stream."""
    audio = speak(HAPPY_ES)
    job = decode(encode(Job("node-a", 0, Utterance.whole(audio, "node-a-s"), expires=time.time() + 60)))
    voice = engine.classifier.voice
    event = engine.process(job.utterance, job.seq)
    assert event.prosody is not None and np.abs(job.utterance.audio - audio).max() > 0  # 16-bit, not the original
    np.testing.assert_array_equal(event.prosody, voice.prosody_of(job.utterance.audio))
    pitch = list(voice.prosody.names).index("f0_mean")
    assert abs(event.prosody[pitch] - voice.prosody_of(audio)[pitch]) < 0.01  # semitones: the same voice
    engine.remember(event)
    try:
        history = engine.histories.get("node-a-s")
        assert history.prosody.utterances == history.frames.utterances == 1
        np.testing.assert_array_equal(history.prosody.moments()[0], event.prosody)
    finally:
        engine.forget("node-a-s")


def test_one_event_per_utterance_with_two_workers(pool, node, speech_file):
    collector = Collector(f"emotion/v1/{node}/#", f"emotion/v1/jobs/{node}/#")
    try:
        done = ingest(speech_file, node, "calm")
        assert done.returncode == 0, done.stderr
        collector.wait(lambda: len(job_ids(collector, node, "calm")) >= 12, 30, "the jobs")
        jobs = job_ids(collector, node, "calm")
        collector.wait(lambda: set(events_by_id(collector, node, "calm")[0]) >= set(jobs), 180, "an event per job")
        time.sleep(1.0)  # a duplicate would come now
        counts, events = events_by_id(collector, node, "calm")
    finally:
        collector.close()
    assert sorted(counts) == sorted(jobs) and set(counts.values()) == {1}, counts
    assert sorted(e["seq"] for e in events.values()) == list(range(len(jobs)))
    for event in events.values():
        validate(event)
        assert event["node"] == node and event["stream"] == "calm"
        assert event["latency_ms"]["total"] > 0
    assert sum(bool(e["transcript"]) for e in events.values()) >= len(jobs) - 2


def test_killed_worker_loses_no_utterance(pool, node, speech_file):
    """SIGKILL worker b while it holds jobs; restarted with its id (as a supervisor would), it gets them again."""
    collector = Collector(f"emotion/v1/{node}/#", f"emotion/v1/jobs/{node}/#")
    try:
        done = ingest(speech_file, node, "kill")
        assert done.returncode == 0, done.stderr
        collector.wait(lambda: events_by_id(collector, node, "kill")[0], 60, "the first event")
        pool.kill("b")
        jobs = job_ids(collector, node, "kill")
        before = set(events_by_id(collector, node, "kill")[0])
        assert len(before) < len(jobs) - 2, "the run ended before the kill"
        pool.start("b")
        pool.wait_ready()
        collector.wait(lambda: set(events_by_id(collector, node, "kill")[0]) >= set(jobs), 180, "an event per job")
        time.sleep(1.0)
        counts, events = events_by_id(collector, node, "kill")
        log = pool.stop("b")
        pool.start("b")  # back in the group for the next test
        pool.wait_ready()
    finally:
        collector.close()
    assert sorted(counts) == sorted(jobs)  # at least once; duplicates share their event_id
    assert sorted(e["seq"] for e in events.values()) == list(range(len(jobs)))  # order restorable per stream
    handled = re.search(r"worker \S+: (\d+) jobs", log)
    assert handled and int(handled[1]) >= 1, log  # the restarted worker took the jobs its killed self held


def test_expired_and_poison_jobs(pool, node, speak):
    """An expired job is skipped and counted; a corrupt one is dead-lettered after 2 attempts without holding up
    the good jobs behind it."""
    collector = Collector(f"emotion/v1/{node}/#", f"emotion/v1/deadletter/{node}/#")
    try:
        audio = np.concatenate([silence(0.3), speak(HAPPY_ES), silence(0.3)])

        def job(segment: int, expires: float) -> bytes:
            utterance = Utterance.whole(audio, "direct")
            utterance = Utterance(**{**utterance.__dict__, "segment_id": segment})
            return encode(Job(node, segment, utterance, expires))

        poison = job(0, time.time() + 60)
        poison = poison[: len(poison) - 4000] + bytes(4000)  # the FLAC frames at the end are garbage
        topic = f"emotion/v1/jobs/{node}/direct"
        collector.publish(topic, poison)
        collector.publish(topic, job(1, time.time() - 5))  # expired before it was sent
        for segment in (2, 3):
            collector.publish(topic, job(segment, time.time() + 60))
        collector.wait(lambda: collector.on("/direct", f"emotion/v1/deadletter/{node}/"), 60, "the dead letter")
        counts, _ = events_by_id(collector, node, "direct")
        letter = json.loads(collector.on("/direct", f"emotion/v1/deadletter/{node}/")[0])
        health = {name: request_health(collector, pool.worker_id(name)) for name in "ab"}
    finally:
        collector.close()
    assert sorted(counts) == [f"{node}/direct/2/final", f"{node}/direct/3/final"]  # before the dead letter
    assert letter["job_id"] == f"{node}/direct/0/final" and letter["attempts"] == 2
    assert "LibsndfileError" in letter["reason"] or "samples" in letter["reason"]
    assert base64.b64decode(letter["job"]) == poison
    assert sum(h["utterances"].get("expired", 0) for h in health.values()) == 1, health
    assert sum(h["utterances"].get("failed", 0) for h in health.values()) == 1, health


def request_health(collector: Collector, worker_id: str) -> dict:
    """Ask a worker over MQTT v5 request/response (`emotion/v1/worker-<id>/request`)."""
    answer_topic = f"test/{worker_id}/answer"
    answers = Collector(answer_topic)
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = answer_topic
    collector.publish(f"emotion/v1/worker-{worker_id}/request", b"{}", properties)
    answers.wait(lambda: answers.messages, 10, f"{worker_id}'s answer")
    answers.close()
    return json.loads(answers.messages[0][1])["health"]
