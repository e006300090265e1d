"""Shared fixtures: real speech from espeak-ng, real noise from sox, the real Mosquitto, the real models."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamer.frames import LABELS, SAMPLE_RATE, Emotion, EmotionEvent, Transcript, Utterance
from streamer.retained import clear_retained_under, retained_under  # noqa: F401 (the tests check with it)

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("EMOTION_DATA_DIR", REPO.parent / "shared" / "data"))
BROKER = ("127.0.0.1", 1883)

ANGRY_ES = "Estoy harto, es la tercera vez que llamo y nadie me soluciona nada. Es una vergüenza."
HAPPY_ES = "Muchas gracias, estoy muy contento con el paquete."
ANGRY_EN = "I am furious! This is the third time I call and nobody fixes anything. It is outrageous."
HAPPY_EN = "Thank you so much, I am really happy with the package, it made my day!"
# Emotion-neutral everyday sentences: material for long or many utterances
NEUTRAL_ES = [
    "El tren de las ocho llega siempre con retraso.",
    "Mañana iremos al mercado a comprar fruta.",
    "La biblioteca cierra a las nueve de la noche.",
    "Mi hermano trabaja en un hospital de Madrid.",
    "Este verano queremos viajar a la costa.",
    "El perro del vecino ladra todas las mañanas.",
    "Necesito cambiar la rueda de la bicicleta.",
    "Hoy hace mucho calor en la ciudad.",
    "Los niños juegan en el parque después del colegio.",
]


def make_event(
    stream: str,
    seq: int,
    node: str = "test",
    *,
    label: str = "anger",
    confidence: float = 0.1667,
    text: str | None = None,
    incongruent: bool = False,
    final: bool = True,
) -> EmotionEvent:
    """A complete event built from the real dataclasses, for the sinks' tests (the model stages are tested elsewhere):
    `label` at `confidence`, the rest shared evenly; the transcript is `frase <seq>` unless `text` is given."""
    now = time.monotonic()
    scores = {lab: confidence if lab == label else round((1 - confidence) / 5, 4) for lab in LABELS}
    utterance = Utterance(
        stream=stream,
        segment_id=seq,
        audio=np.zeros(1600, np.float32),
        start_s=seq * 2.0,
        end_s=seq * 2.0 + 1.0,
        speech_end_arrived=now - 0.4,
        emitted=now - 0.1,
        wall_end=time.time(),
        speech_s=0.8,
        source="test",
    )
    transcript = Transcript(
        text=f"frase {seq}" if text is None else text,
        language="es",
        language_probability=1.0,
        no_speech_prob=0.01,
        avg_logprob=-0.2,
        compression_ratio=1.0,
        rejected=None,
        encoder_frames=np.zeros((50, 512), np.float32),
        encode_ms=80.0,
        decode_ms=50.0,
    )
    emotion = Emotion(
        scores=scores,
        audio_scores=scores,
        text_scores=scores,
        label=label,
        confidence=confidence,
        valence=-0.2,
        arousal=0.28,
        incongruent=incongruent,
        ms=10.0,
    )
    return EmotionEvent(
        node=node,
        stream=stream,
        seq=seq,
        utterance=utterance,
        transcript=transcript,
        emotion=emotion,
        models={"asr": "a", "emotion": "b"},
        ready=now,
        final=final,
    )


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Spools and generated files of the tests go to a private cache; Whisper's joined files are linked in."""
    from streamer.models import WHISPER_BASE_SHA256, whisper_base_dir

    shared = whisper_base_dir()
    cache = tmp_path_factory.mktemp("cache")
    (cache / "whisper-base").mkdir()
    for name in WHISPER_BASE_SHA256:
        (cache / "whisper-base" / name).symlink_to(shared / name)
    previous = os.environ.get("EMOTION_MONITOR_CACHE")
    os.environ["EMOTION_MONITOR_CACHE"] = str(cache)
    yield cache
    if previous is None:
        del os.environ["EMOTION_MONITOR_CACHE"]
    else:
        os.environ["EMOTION_MONITOR_CACHE"] = previous


@pytest.fixture(scope="session")
def speak(tmp_path_factory):
    """Spanish (or other) speech from espeak-ng, 16 kHz mono float32."""
    if not shutil.which("espeak-ng"):
        pytest.fail("espeak-ng is required by the tests (./setup.sh installs it)")
    from streamer.demo import speak as synthesise

    cache: dict[tuple[str, str], np.ndarray] = {}

    def _speak(text: str, voice: str = "es") -> np.ndarray:
        if (text, voice) not in cache:
            cache[text, voice] = synthesise(text, voice, speed=150)  # the phrases below were chosen at 150 wpm
        return cache[text, voice]

    return _speak


@pytest.fixture(scope="session")
def pink_noise(tmp_path_factory) -> np.ndarray:
    """3 s of pink noise from sox (WebRTC VAD alone calls this speech)."""
    path = tmp_path_factory.mktemp("noise") / "pink.wav"
    subprocess.run(
        ["sox", "-n", "-r", "16000", "-c", "1", "-b", "16", str(path), "synth", "3", "pinknoise", "vol", "0.3"],
        check=True,
    )
    audio, _ = sf.read(path, dtype="float32")
    return audio


@pytest.fixture(scope="session")
def conversation(speak) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Two one-clause sentences separated by pauses, with the true speech spans (from the samples, not a VAD)."""
    parts, spans, t = [silence(1.0)], [], 1.0
    for text in ("Estoy furioso con este servicio tan malo", HAPPY_ES):
        speech = speak(text)
        active = np.flatnonzero(np.abs(speech) > 1e-3)
        spans.append((t + active[0] / SAMPLE_RATE, t + active[-1] / SAMPLE_RATE))
        parts += [speech, silence(1.5)]
        t += (len(speech) + int(1.5 * SAMPLE_RATE)) / SAMPLE_RATE
    return np.concatenate(parts), spans


@pytest.fixture(scope="session")
def engine():
    """The Spanish engine: the tests' speech is Spanish, pinned (the default detects the language)."""
    from streamer.pipeline import Engine
    from streamer.recogniser import RecogniserOptions

    e = Engine(RecogniserOptions(language="es"), node="test")
    yield e
    e.close()


@pytest.fixture(scope="session")
def broker() -> tuple[str, int]:
    try:
        socket.create_connection(BROKER, timeout=1).close()
    except OSError:
        pytest.fail("the tests need Mosquitto on 127.0.0.1:1883 (`mosquitto -d`; .ci/run starts it)")
    return BROKER


# ---- retained messages: the shared broker is left as the tests found it --------------------------------------
# Retained status, health, last states, `ended` markers and Home Assistant discovery configs of made-up nodes stay
# on the broker after a test and show up as offline nodes on a dashboard (or devices in Home Assistant) on the same
# broker. Every node a test names comes from `unique_node`; whatever is retained under it is deleted when the scope
# that asked for it ends, pass or fail. Only topics with such a name in them are touched, never the whole broker.
# `streamer.retained` does the deleting (on 127.0.0.1:1883, BROKER, by default): the benchmarks use it too.

_ISSUED: set[str] = set()  # every name handed out this session (swept once more at its end: late Last Wills)
_OWNED: list[set[str]] = [set()]  # names by running scope: session, module, test (innermost last)


def unique_node(prefix: str = "t") -> str:
    """A node id no real monitor and no other test run uses: `prefix` and 12 hex digits. Owned by the innermost
    scope running (a test, or a module while a module fixture sets up), which deletes all retained under it."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    _ISSUED.add(name)
    _OWNED[-1].add(name)
    return name


@pytest.fixture
def mqtt_node() -> str:
    """This test's own node id (topics `emotion/v1/<node>/…`, `homeassistant/+/<node>/…`), cleared after it."""
    return unique_node("n")


@contextlib.contextmanager
def _owning_scope() -> Iterator[None]:
    """Names asked for while this scope runs are its own; its end deletes what they left retained."""
    _OWNED.append(set())
    try:
        yield
    finally:
        clear_retained_under(_OWNED.pop())


@pytest.fixture(scope="session", autouse=True)
def _retained_session() -> Iterator[None]:
    """Last, every name of the session again: a killed process's Last Will may land after its test's sweep."""
    yield
    clear_retained_under(_ISSUED)


@pytest.fixture(scope="module", autouse=True)
def _retained_module() -> Iterator[None]:
    with _owning_scope():
        yield


@pytest.fixture(autouse=True)
def _retained_test() -> Iterator[None]:
    """Set up before the test's other fixtures (autouse goes first in its scope), so it also owns their names and
    is torn down after them (their processes have stopped publishing)."""
    with _owning_scope():
        yield


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A port from bind(0) is ephemeral, so an outgoing connection
    (a test's MQTT client, say) can be given it before the test's server binds it: "address already in use"."""
    rng, end = random.SystemRandom(), max(_ephemeral_start(), 10001)
    for _ in range(200):
        port = rng.randrange(10000, end)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range after 200 tries")


def data_dir(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"dataset {name} not found at {path} (set EMOTION_DATA_DIR)")
    return path


async def stop_as_soon_as_up(args: list[str], node: str, log_line: bytes | None = None) -> tuple[int, bytes]:
    """Start `python -m streamer *args` (publishing as `node` to the local broker), send it SIGTERM the moment it
    looks up to a supervisor (its retained status `online`, or the stderr line `log_line`), and wait for it to
    exit: its exit code and stderr. A daemon must stop cleanly then, while its models may still be loading."""
    import asyncio
    import signal
    import sys

    import aiomqtt

    from streamer.event import status_topic

    async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"watch-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(status_topic(node), qos=1)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamer", *args, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(120):
                if log_line is None:
                    await anext(m async for m in client.messages if m.payload == b"online")
                else:
                    while log_line not in (line := await proc.stderr.readline()):
                        assert line, f"{args[0]} stopped before {log_line!r}"
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return proc.returncode, err
