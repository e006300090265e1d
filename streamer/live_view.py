"""A readable live view of events in the terminal.

Always one coloured line per utterance (a log that can be scrolled back and copied). When stderr is a terminal,
a table stays at the bottom with one row per stream: the current label, a timeline of the recent utterances
(one block per utterance, coloured by label, its height the confidence) and the last words. Not on a terminal
(CI, a pipe, a file), only the lines are written, without cursor movement.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from streamer.frames import LABELS, EmotionEvent
from streamer.publisher import stamp

COLOURS = {
    "anger": "red",
    "disgust": "green",
    "fear": "magenta",
    "joy": "yellow",
    "neutral": "white",
    "sadness": "blue",
}
BLOCKS = "▁▂▃▄▅▆▇█"
TIMELINE = 32  # utterances shown per stream


def _bar(p: float, width: int = 10) -> str:
    full = round(p * width)
    return "█" * full + "░" * (width - full)


def _top(scores: dict[str, float] | None) -> str:
    return max(scores, key=scores.get) if scores else "—"


@dataclass
class _Row:
    """What the table shows for one stream."""

    event: EmotionEvent
    utterances: int = 0
    recent: deque[tuple[str, float, bool]] = field(default_factory=lambda: deque(maxlen=TIMELINE))


class ConsoleSink:
    """Prints events to stderr, so stdout stays free for `--jsonl -`."""

    def __init__(self, console: Console | None = None, show_transcript: bool = True) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        self.show_transcript = show_transcript
        self.rows: dict[str, _Row] = {}
        self._live: Live | None = None
        self._handlers: list[tuple[logging.StreamHandler, object]] = []

    async def start(self) -> None:
        if not self.console.is_terminal:
            return
        self._live = Live(self.table(), console=self.console, refresh_per_second=4, redirect_stdout=False)
        self._live.start()
        self._route_logging()

    def _route_logging(self) -> None:
        """Log records written straight to the terminal would tear the live table: send them through Live's
        stderr proxy (installed by `Live.start`), which prints them above it."""
        proxy = sys.stderr
        for handler in logging.getLogger().handlers:
            stream = getattr(handler, "stream", None)
            if type(handler) is logging.StreamHandler and stream is getattr(proxy, "rich_proxied_file", None):
                self._handlers.append((handler, handler.setStream(proxy)))

    def send(self, event: EmotionEvent) -> None:
        if not event.latency.total:
            stamp(event)
        self.console.print(self.line(event), soft_wrap=True)  # one line per utterance, however long
        row = self.rows.setdefault(event.stream, _Row(event))
        row.event = event  # an interim event shows as the current label; only final ones are counted
        if event.final:
            row.utterances += 1
            row.recent.append((event.emotion.label, event.emotion.confidence, event.emotion.incongruent))
        if self._live is not None:
            self._live.update(self.table())

    def line(self, event: EmotionEvent) -> Text:
        """The log line of one utterance."""
        e, t = event.emotion, event.transcript
        colour = COLOURS[e.label]
        line = Text()
        line.append(datetime.now().strftime("%H:%M:%S "), style="dim")
        line.append(f"{event.stream}#{event.seq:<3} ", style="cyan")
        line.append(f"{e.label.upper():8s} {e.confidence:4.2f} {_bar(e.confidence)} ", style=f"bold {colour}")
        line.append(f"voice:{_top(e.audio_scores):8s} words:{_top(e.text_scores):8s} ", style="dim")
        line.append(f"{event.latency.total:5.0f} ms ", style="dim")
        if not event.final:
            line.append("(interim) ", style="dim italic")
        if e.incongruent:
            line.append("≠ voice/words ", style="bold magenta")
        if self.show_transcript and t.text:
            line.append(f"“{t.text}”", style="italic")
        elif t.rejected:
            line.append(f"(no text: {t.rejected})", style="dim")
        return line

    def table(self) -> Group:
        """One row per stream, the most recently active ones when there are more than the terminal holds."""
        table = Table(expand=True, box=None, pad_edge=False, header_style="bold dim")
        table.add_column("stream", style="cyan", no_wrap=True, max_width=28)
        table.add_column("now", no_wrap=True)
        table.add_column(f"last {TIMELINE} utterances", no_wrap=True)
        table.add_column("n", justify="right", style="dim")
        table.add_column("voice / words", style="dim", no_wrap=True)
        table.add_column("ms", justify="right", style="dim")
        if self.show_transcript:
            table.add_column("last words", ratio=1, no_wrap=True, overflow="ellipsis", style="italic")
        shown = max(3, self.console.size.height - 6)
        recent = sorted(self.rows.items(), key=lambda kv: kv[1].event.ready, reverse=True)[:shown]
        for stream, row in sorted(recent):
            e = row.event.emotion
            now = Text(f"{e.label.upper():8s} {e.confidence:4.2f}", style=f"bold {COLOURS[e.label]}")
            if not row.event.final:
                now.stylize("dim")
            timeline = Text()
            for label, confidence, incongruent in row.recent:
                block = "≠" if incongruent else BLOCKS[min(len(BLOCKS) - 1, int(confidence * len(BLOCKS)))]
                timeline.append(block, style="bold magenta" if incongruent else COLOURS[label])
            cells = [
                stream,
                now,
                timeline,
                str(row.utterances),
                f"{_top(e.audio_scores)} / {_top(e.text_scores)}",
                f"{row.event.latency.total:.0f}",
            ]
            if self.show_transcript:
                cells.append(row.event.transcript.text or "")
            table.add_row(*cells)
        legend = Text("  ")
        for label in LABELS:
            legend.append("█ ", style=COLOURS[label]).append(f"{label}  ", style="dim")
        legend.append("≠ voice/words disagree", style="magenta")
        return Group(table, legend)

    async def close(self) -> None:
        if self._live is not None:
            for handler, stream in self._handlers:
                handler.setStream(stream)
            self._handlers.clear()
            self._live.stop()
            self._live = None
