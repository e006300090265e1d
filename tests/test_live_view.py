"""The terminal view: plain lines off a terminal, lines plus a live per-stream table on one."""

from __future__ import annotations

import io
import logging
import sys

from rich.console import Console

from streamer.live_view import ConsoleSink
from tests.conftest import make_event


async def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    sink = ConsoleSink(Console(file=out, width=60))  # narrower than a line: still one line per utterance
    await sink.start()
    sink.send(make_event("desk", 0, label="anger", confidence=0.81, text="¡Estoy harto de esperar!"))
    sink.send(make_event("desk", 1, label="joy", confidence=0.64, text="Qué tristeza todo", incongruent=True))
    await sink.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 2
    assert "desk#0" in lines[0] and "ANGER" in lines[0] and "Estoy harto de esperar" in lines[0]
    assert "JOY" in lines[1] and "≠ voice/words" in lines[1]
    assert "\x1b[" not in text  # no colours or cursor movement in a file


async def test_live_table_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, width=160, height=30, force_terminal=True, color_system="truecolor")
    sink = ConsoleSink(console)
    handler = logging.StreamHandler(sys.stderr)  # as `logging.basicConfig` in the CLI
    logging.getLogger().addHandler(handler)
    await sink.start()
    for seq, (label, conf) in enumerate([("neutral", 0.6), ("anger", 0.7), ("anger", 0.9)]):
        sink.send(make_event("customer", seq, label=label, confidence=conf, text=f"cliente {seq}"))
    sink.send(make_event("agent", 0, label="joy", confidence=0.66, text="Con mucho gusto le ayudo.", incongruent=True))
    sink.send(make_event("agent", 1, label="sadness", confidence=0.5, text="un momento", final=False))
    logging.getLogger("emotion-monitor.test").warning("a log record while the table is shown")
    await sink.close()
    logging.getLogger().removeHandler(handler)
    assert handler.stream is sys.stderr

    recorder = Console(record=True, width=160, height=30, file=io.StringIO())
    recorder.print(sink.table())
    table = recorder.export_text()
    customer = next(line for line in table.splitlines() if line.startswith("customer"))
    assert "ANGER" in customer and "0.90" in customer and "cliente 2" in customer
    assert "▅▆█" in customer  # one block per utterance, its height the confidence
    agent = next(line for line in table.splitlines() if line.startswith("agent"))
    assert "SADNESS" in agent and "un momento" in agent  # the interim event is shown as current...
    assert "≠" in agent and " 1 " in agent  # ...but only the final one is counted
    assert "neutral" in table and "voice/words disagree" in table  # the legend

    written = out.getvalue()
    assert "a log record while the table is shown" in written  # printed above the table, through rich
    assert "customer#2" in written and "cliente 2" in written  # the per-utterance log lines
    assert "\x1b[" in written  # drawn with colours and cursor control


async def test_no_transcripts_when_they_are_private():
    out = io.StringIO()
    sink = ConsoleSink(Console(file=out, width=200), show_transcript=False)
    sink.send(make_event("desk", 0, label="fear", confidence=0.7, text="mi secreto"))
    recorder = Console(record=True, width=160, file=io.StringIO())
    recorder.print(sink.table())
    assert "mi secreto" not in out.getvalue() + recorder.export_text()
    assert "FEAR" in out.getvalue()
