"""The shared broker after the tests: nothing retained under the node names they made up, even when they fail.

A dashboard (or Home Assistant) on the same broker lists every node with a retained status, and every stream with a
retained state, so what a test leaves behind shows up there as offline nodes. conftest's guard deletes it; this
checks the guard on a real flow in a pytest run of its own: `emotion-monitor run` with Home Assistant discovery and
a last state with its `ended` marker, `emotion-monitor serve` with its status and health, a publisher owned by a
module fixture, and a test that fails after all of them."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, clear_retained_under, retained_under

pytestmark = pytest.mark.slow

FLOW = '''
import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from streamer.frames import SAMPLE_RATE
from streamer.publisher import MqttOptions, MqttSink
from tests.conftest import free_port, make_event, retained_under, unique_node

REPORT = Path(os.environ["RETAINED_REPORT"])
URL = "mqtt://127.0.0.1:1883"
names = {}


def report(**entries):
    """Names first, then what was retained: the outer test checks these even if this run dies half-way."""
    data = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    REPORT.write_text(json.dumps(data | entries))


async def publish(node):
    sink = MqttSink(MqttOptions(spool="memory"), URL, node)
    await sink.start()
    sink.stream_started("desk", None, None)
    sink.send(make_event("desk", 0, node))
    sink.stream_ended("desk", None, None)
    await sink.close()


@pytest.fixture(scope="module")
def module_node():
    """Owned by the module: still there for the module's second test, gone after the module."""
    node = unique_node("hygmod")
    report(module=node)
    asyncio.run(publish(node))
    return node


def test_flow_fails_after_publishing(broker, module_node, conversation, tmp_path):
    names.update(run=unique_node("hygrun"), serve=unique_node("hygserve"))
    report(**names)
    wav = tmp_path / "conversation.wav"
    sf.write(wav, conversation[0], SAMPLE_RATE)
    cli = [sys.executable, "-m", "streamer"]
    run = [*cli, "run", "--language", "es", "--source", f"file:{wav}", "--fast", "--quiet", "--stream", "desk"]
    subprocess.run([*run, "--broker", URL, "--node", names["run"]], check=True, timeout=300)
    port = free_port()
    serve = [*cli, "serve", "--language", "es", "--audiosocket", f"127.0.0.1:{port}", "--broker", URL]
    proc = subprocess.Popen([*serve, "--node", names["serve"]], stderr=subprocess.PIPE, text=True)
    try:
        while "serving calls" not in (line := proc.stderr.readline()):  # online, listening
            assert line, "serve stopped before serving"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    report(retained={node: sorted(retained_under([node])) for node in (module_node, *names.values())})
    pytest.fail("on purpose: what this test left retained must go all the same")


def test_next_test_starts_clean_while_the_module_node_stays(broker, module_node):
    report(between={node: sorted(retained_under([node])) for node in (module_node, *names.values())})
'''


def test_a_failing_flow_leaves_nothing_retained(broker, tmp_path):
    flow, report = tmp_path / "test_flow.py", tmp_path / "report.json"
    flow.write_text(FLOW)
    env = os.environ | {"PYTHONPATH": str(REPO), "RETAINED_REPORT": str(report)}
    command = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q", str(flow)]
    command += ["-o", "asyncio_default_fixture_loop_scope=function"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    got = json.loads(report.read_text()) if report.exists() else {}
    names = [got[k] for k in ("module", "run", "serve") if k in got]
    try:
        left = retained_under(names)
    finally:
        clear_retained_under(names)  # this test's own failure leaves nothing behind either
    assert "1 failed, 1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on purpose" in result.stdout
    module, run, serve = got["module"], got["run"], got["serve"]
    retained = got["retained"]
    # the flow did leave what a dashboard would list: statuses, health, states with `ended`, discovery configs
    for node in (module, run):
        assert {f"emotion/v1/{node}/status", f"emotion/v1/{node}/desk/state"} <= set(retained[node])
        assert f"homeassistant/sensor/{node}/desk_emotion/config" in retained[node]
    assert f"emotion/v1/{run}/health" in retained[run]
    assert {f"emotion/v1/{serve}/status", f"emotion/v1/{serve}/health"} <= set(retained[serve])
    # the failed test's nodes went at its end, the module's at the module's end
    assert got["between"] == {module: retained[module], run: [], serve: []}
    assert left == {}
