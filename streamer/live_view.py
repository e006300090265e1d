"""A readable live view of events in the terminal: one coloured line per utterance."""

from __future__ import annotations

from datetime import datetime

from rich.console import Console
from rich.text import Text

from streamer.frames import EmotionEvent
from streamer.publisher import stamp

COLOURS = {
    "anger": "red",
    "disgust": "green",
    "fear": "magenta",
    "joy": "yellow",
    "neutral": "white",
    "sadness": "blue",
}


def _bar(p: float, width: int = 10) -> str:
    full = round(p * width)
    return "█" * full + "░" * (width - full)


class ConsoleSink:
    """Prints events to stderr, so stdout stays free for `--jsonl -`."""

    def __init__(self, console: Console | None = None, show_transcript: bool = True) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        self.show_transcript = show_transcript

    async def start(self) -> None:
        pass

    def send(self, event: EmotionEvent) -> None:
        if not event.latency.total:
            stamp(event)
        e, t = event.emotion, event.transcript
        colour = COLOURS[e.label]
        line = Text()
        line.append(datetime.now().strftime("%H:%M:%S "), style="dim")
        line.append(f"{event.stream}#{event.seq:<3} ", style="cyan")
        line.append(f"{e.label.upper():8s} {e.confidence:4.2f} {_bar(e.confidence)} ", style=f"bold {colour}")
        voice = max(e.audio_scores, key=e.audio_scores.get)
        words = max(e.text_scores, key=e.text_scores.get) if e.text_scores else "—"
        line.append(f"voice:{voice:8s} words:{words:8s} ", style="dim")
        line.append(f"{event.latency.total:5.0f} ms ", style="dim")
        if e.incongruent:
            line.append("≠ voice/words ", style="bold magenta")
        if self.show_transcript and t.text:
            line.append(f"“{t.text}”", style="italic")
        elif t.rejected:
            line.append(f"(no text: {t.rejected})", style="dim")
        self.console.print(line)

    async def close(self) -> None:
        pass
