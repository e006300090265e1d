"""The microphone path for real: PortAudio captures from an ALSA device whose input is a file of speech.

ALSA's `file` plugin with `infile` turns a raw PCM file into a capture device, so PyAudio, the device choice
and the live pipeline run exactly as with a USB headset, on a machine without a sound card.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soxr

from streamer.frames import SAMPLE_RATE
from tests.conftest import HAPPY_ES, silence

pytest.importorskip("pyaudio", reason="PyAudio is not installed (needs apt portaudio19-dev; ./setup.sh does it)")

RATE = 44100  # the rate PortAudio opens the fake device at (its default)


@pytest.fixture(scope="module")
def fake_home(tmp_path_factory, speak):
    home = tmp_path_factory.mktemp("home")
    audio = np.concatenate([silence(1.0), speak(HAPPY_ES), silence(30.0)])
    stereo = np.repeat((soxr.resample(audio, SAMPLE_RATE, RATE) * 32767).astype("<i2")[:, None], 2, axis=1)
    (home / "speech.raw").write_bytes(stereo.tobytes())
    (home / ".asoundrc").write_text(
        'pcm.fakemic {\n type file\n slave.pcm "null"\n file "/dev/null"\n'
        f' infile "{home / "speech.raw"}"\n format "raw"\n'
        ' hint { show on description "Fake microphone" }\n}\n'
    )
    return home


def emotion_monitor(home, *args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "streamer", *args],
        env={**os.environ, "HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def test_devices_lists_the_fake_microphone(fake_home):
    out, _ = emotion_monitor(fake_home, "devices").communicate(timeout=30)
    assert b"fakemic" in out


def test_live_microphone_to_event(fake_home, broker, tmp_path, mqtt_node):
    """The words come through the microphone path, with the default latency budget: an utterance that did not wait
    keeps its words even where Whisper alone takes longer than the budget (about 0.85 s for this phrase without
    AVX-512)."""
    events = tmp_path / "events.jsonl"
    proc = emotion_monitor(
        fake_home,
        "run",
        "--language",
        "es",
        "--source",
        "mic:fake",
        "--broker",
        "mqtt://127.0.0.1:1883",
        "--quiet",
        "--node",
        mqtt_node,
        "--jsonl",
        str(events),
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (events.exists() and events.read_text().strip()):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    event = json.loads(events.read_text().splitlines()[0])
    assert event["source"] == "mic:fakemic"
    assert "gracias" in event["transcript"].lower()
    assert proc.returncode == 0, stderr.decode()


def test_unknown_microphone_names_what_exists(fake_home, mqtt_node):
    """The node is named: the host name would be a real-looking node if anything were published."""
    proc = emotion_monitor(
        fake_home, "run", "--source", "mic:Blue Yeti", "--broker", "mqtt://127.0.0.1:1883", "--node", mqtt_node
    )
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert b"no input device matches 'Blue Yeti'; available: 0: fakemic" in stderr
