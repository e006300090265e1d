"""The whole chain, as a user runs it: the `emotion-monitor` command, real audio, the real Mosquitto."""

import asyncio
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamer.classifier import EmotionClassifier
from streamer.event import validate
from streamer.frames import SAMPLE_RATE
from tests.conftest import ANGRY_ES, HAPPY_ES, free_port, silence, stop_as_soon_as_up, unique_node
from tests.test_publisher import clear_node, receive, retained

CLI = [sys.executable, "-m", "streamer"]


def cli(*args: str, stdin: bytes | None = None, env: dict | None = None, timeout: float = 240):
    return subprocess.run(
        [*CLI, *args], input=stdin, capture_output=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def conversation_wav(conversation, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "conversation.wav"
    sf.write(path, conversation[0], SAMPLE_RATE, subtype="PCM_16")
    return path


async def test_run_publishes_each_utterance_to_mosquitto(broker, conversation_wav, tmp_path):
    node, stream = unique_node("n"), "desk"
    started = asyncio.Event()
    collector = asyncio.create_task(receive(*broker, f"emotion/v1/{node}/{stream}/event", 2, started, 120))
    await started.wait()
    out = tmp_path / "events.jsonl"
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "run",
        "--language",
        "es",
        "--source",
        f"file:{conversation_wav}",
        "--fast",
        "--broker",
        "mqtt://127.0.0.1:1883",
        "--node",
        node,
        "--stream",
        stream,
        "--jsonl",
        str(out),
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    events = [json.loads(payload) for _, payload, _ in await collector]
    await clear_node(node)
    assert [e["seq"] for e in events] == [0, 1]
    for event in events:
        validate(event)
        assert event["node"] == node and event["stream"] == stream and event["final"] is True
        assert abs(sum(event["scores"].values()) - 1) < 0.01
        assert event["latency_ms"]["total"] >= event["latency_ms"]["asr"] > 0
    assert "malo" in events[0]["transcript"].lower()
    assert "gracias" in events[1]["transcript"].lower()
    assert [e["event_id"] for e in read_jsonl(out)] == [e["event_id"] for e in events]
    for event in events:  # the live view shows each event's label and seq
        assert f"{stream}#{event['seq']}" in stderr.decode() and event["label"].upper() in stderr.decode()


def test_stdin_pcm_at_8k(conversation):
    audio, _ = conversation
    import soxr

    pcm8k = (soxr.resample(audio, SAMPLE_RATE, 8000) * 32767).astype("<i2").tobytes()
    node = unique_node("n")
    result = cli(
        "run",
        "--language",
        "es",
        "--source",
        "stdin",
        "--rate",
        "8000",
        "--broker",
        "mqtt://127.0.0.1:1883",
        "--quiet",
        "--stream",
        "stdin-test",
        "--node",
        node,
        "--jsonl",
        "-",
        stdin=pcm8k,
    )
    assert result.returncode == 0, result.stderr.decode()
    asyncio.run(clear_node(node))
    events = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(events) == 2
    assert all(e["source"] == "stdin" for e in events)


def test_unreadable_source_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00junk" * 10)
    node = unique_node("n")
    result = cli(
        "run", "--source", f"file:{bad}", "--fast", "--quiet", "--broker", "mqtt://127.0.0.1:1883", "--node", node
    )
    asyncio.run(clear_node(node))
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert "broken.wav" in stderr and "Traceback" not in stderr


def test_analyze_whole_file_gives_one_event_per_file(speak, tmp_path):
    paths = []
    for name, audio in (("angry", speak(ANGRY_ES)), ("happy", speak(HAPPY_ES)), ("silence", silence(2.0))):
        paths.append(tmp_path / f"{name}.flac")
        sf.write(paths[-1], audio, SAMPLE_RATE)
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(os.urandom(2000))
    out = tmp_path / "out.jsonl"
    result = cli("analyze", *map(str, paths), str(corrupt), "--whole-file", "--language", "es", "--jsonl", str(out))
    assert result.returncode == 1  # one file failed, the others were analysed
    assert "corrupt.mp3" in result.stderr.decode()
    events = {Path(e["source"].removeprefix("file:")).stem: e for e in read_jsonl(out)}
    assert set(events) == {"angry", "happy", "silence"}
    for event in events.values():
        validate(event)
    assert events["silence"]["transcript"] == ""
    assert events["silence"]["text_scores"] is None
    assert "tercera vez" in events["angry"]["transcript"].lower()
    assert events["happy"]["text_scores"]["joy"] > events["happy"]["text_scores"]["anger"]


def test_analyze_without_whole_file_segments_and_ignores_silence(conversation_wav, tmp_path):
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, silence(3.0), SAMPLE_RATE)
    out = tmp_path / "out.jsonl"
    result = cli("analyze", str(conversation_wav), str(quiet), "--language", "es", "--jsonl", str(out))
    assert result.returncode == 0, result.stderr.decode()
    events = read_jsonl(out)
    assert [(e["stream"], e["seq"]) for e in events] == [("conversation", 0), ("conversation", 1)]


def test_classify_text(tmp_path):
    src = tmp_path / "in.csv"
    with open(src, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows(
            [[1, ANGRY_ES], [2, HAPPY_ES], [3, ""], [4, "Me siento muy triste y solo desde que murió mi padre."]]
        )
    out = tmp_path / "out.jsonl"
    result = cli("classify-text", "--csv", str(src), "--column", "text", "--jsonl", str(out))
    assert result.returncode == 0, result.stderr.decode()
    rows = read_jsonl(out)
    assert [r["row"] for r in rows] == [0, 1, 2, 3]
    # the complaint: the default words head (a vote of e5 layers+USE and TF-IDF) reads it as sadness 0.48 / anger 0.39
    assert "anger" in sorted(rows[0]["scores"], key=rows[0]["scores"].get)[-2:]
    assert rows[0]["label"] in ("anger", "disgust", "sadness")
    assert rows[1]["label"] == "joy"
    assert rows[2]["label"] is None
    assert rows[3]["label"] == "sadness"
    bad = cli("classify-text", "--csv", str(src), "--column", "nope", "--jsonl", str(out))
    assert bad.returncode == 1 and "no column 'nope'" in bad.stderr.decode()


def test_classify_text_in_english_uses_the_english_head(tmp_path):
    src = tmp_path / "in.csv"
    # not "I am absolutely furious with you": the English head reads first-person statements of anger as sadness
    # (0.55 vs anger 0.27; model card, English words head), which the float head barely did not (anger 0.49 / 0.38)
    src.write_text("text\nYou make me so mad!\n")
    out = tmp_path / "out.jsonl"
    result = cli("classify-text", "--csv", str(src), "--column", "text", "--language", "en", "--jsonl", str(out))
    assert result.returncode == 0, result.stderr.decode()
    [row] = read_jsonl(out)
    assert row["label"] == "anger" and row["language"] == "en"
    assert row["model"]["emotion"] == EmotionClassifier().text_model_for("en").model_id
    auto = cli("classify-text", "--csv", str(src), "--column", "text", "--language", "auto", "--jsonl", str(out))
    assert auto.returncode == 2 and "needs the language of the texts" in auto.stderr.decode()


@pytest.mark.parametrize("command", ["run", "analyze", "classify-text"])
def test_an_unknown_language_is_a_start_up_error(command, tmp_path):
    """Before: accepted, then every utterance failed with a traceback and the exit status was 0."""
    args = {"run": ["--source", "file:x.wav"], "analyze": ["x.wav", "--jsonl", "-"]}
    args["classify-text"] = ["--csv", "x.csv", "--column", "text", "--jsonl", "-"]
    result = cli(command, *args[command], "--language", "english", timeout=30)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "unknown language 'english'" in stderr and ", en, " in stderr and "Traceback" not in stderr


def test_devices_and_install_service(tmp_path):
    result = cli("devices")
    assert result.returncode == 0 and result.stdout
    result = cli(
        "install-service",
        "--",
        "--source",
        "mic:USB",
        "--broker",
        "mqtt://h:1883",
        env={"XDG_CONFIG_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr.decode()
    unit = (tmp_path / "systemd" / "user" / "emotion-monitor.service").read_text()
    assert "run --buffer-offline --source mic:USB --broker mqtt://h:1883" in unit  # the daemon may start first
    assert "[Install]" in unit


def test_install_service_explains_a_missing_user_bus(tmp_path):
    """Before: a CalledProcessError traceback from `systemctl --user daemon-reload`."""
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")}
    result = subprocess.run(
        [*CLI, "install-service", "--enable"],
        capture_output=True,
        text=True,
        env=env | {"XDG_CONFIG_HOME": str(tmp_path)},
    )
    assert result.returncode == 1
    assert "no systemd user bus" in result.stderr and "loginctl enable-linger" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "systemd" / "user" / "emotion-monitor.service").is_file()  # written, nothing lost


@pytest.mark.parametrize(
    ("broker", "cause"),
    [
        ("mqtt://no-such-broker.invalid:1883", "cannot resolve the host name 'no-such-broker.invalid'"),
        ("mqtt://127.0.0.1:{port}", "connection refused"),
    ],
)
def test_run_with_a_broker_that_cannot_be_reached_exits_at_once(broker, cause, tmp_path):
    """Before: exit status 0 after retrying forever, "trying 3.1.1" in the log, and a spool file per wrong URL."""
    audio = tmp_path / "speech.wav"
    sf.write(audio, silence(1.0), SAMPLE_RATE)
    cache = tmp_path / "cache"
    broker = broker.format(port=free_port())
    result = cli(
        "run", "--source", f"file:{audio}", "--broker", broker, env={"EMOTION_MONITOR_CACHE": str(cache)}, timeout=10
    )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert f"MQTT broker {broker} cannot be reached: {cause}" in stderr and "--buffer-offline" in stderr
    assert "3.1.1" not in stderr and "Traceback" not in stderr
    assert not list(cache.glob("spool/*.sqlite"))


async def test_serve_publishes_nothing_when_a_listener_cannot_bind(broker):
    """Before: a port in use failed `serve` only after it had published its retained status and health."""
    node, port = unique_node("bind"), free_port()
    with socket.create_server(("127.0.0.1", port)):
        result = await asyncio.to_thread(
            cli, "serve", "--audiosocket", f"127.0.0.1:{port}", "--broker", "mqtt://127.0.0.1:1883", "--node", node
        )
    stderr = result.stderr.decode()
    assert result.returncode == 1 and f"audiosocket listener 127.0.0.1:{port}" in stderr and "in use" in stderr
    assert await retained(f"emotion/v1/{node}/#") == {}


async def test_run_stops_cleanly_on_sigterm_as_soon_as_it_is_online(broker, speak, tmp_path):
    """As `serve` (test_ingest): a supervisor may stop `run` the moment its retained `online` appears, while the
    models still load. The signal handler used to be installed only after that, so such a SIGTERM killed it (exit
    -15, no clean shutdown)."""
    from streamer.event import status_topic
    from streamer.retained import retained_under

    wav = tmp_path / "long.wav"
    sf.write(wav, np.concatenate([speak(ANGRY_ES), silence(20.0)]), SAMPLE_RATE)  # still playing when stopped
    node = unique_node("run")
    args = ["run", "--language", "es", "--node", node, "--quiet", "--source", f"file:{wav}"]
    code, err = await stop_as_soon_as_up([*args, "--broker", "mqtt://127.0.0.1:1883"], node)
    assert code == 0, err.decode()[-3000:]
    assert retained_under([node])[status_topic(node)] == b"offline"
