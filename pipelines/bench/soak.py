"""Soak: a long stream pushed faster than real time through the whole chain to a real MQTT broker.

Reports RSS after warm-up and at the end, spool high-water mark, dropped/shed counts and event counts, so a
leak or unbounded queue shows up as numbers. Speech: the demo sentences plus pauses, looped.

    .venv/bin/python -m pipelines.bench.soak [--minutes 60] [--speed 10] [--broker mqtt://127.0.0.1:1883] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from pipelines.bench.live import SENTENCES, build_stream, report
from streamer.demo import speak
from streamer.frames import SAMPLE_RATE, AudioChunk
from streamer.pipeline import Engine, PipelineOptions, run_stream
from streamer.publisher import MqttOptions, MqttSink
from streamer.retained import cleared_after
from streamer.sources import CHUNK_S


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class LoopSource:
    """The same audio over and over, paced at `speed` × real time; samples RSS once warm."""

    name = "soak"

    def __init__(self, audio: np.ndarray, seconds: float, speed: float) -> None:
        self.audio, self.seconds, self.speed = audio, seconds, speed
        self.rss_warm: float | None = None

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        step = int(CHUNK_S * SAMPLE_RATE)
        total = int(self.seconds * SAMPLE_RATE)
        t0 = time.monotonic()
        for i in range(0, total, step):
            j = i % len(self.audio)
            piece = self.audio[j : j + step]
            await asyncio.sleep(max(0.0, t0 + (i + len(piece)) / SAMPLE_RATE / self.speed - time.monotonic()))
            if self.rss_warm is None and i >= 120 * SAMPLE_RATE:  # two minutes of audio in
                self.rss_warm = rss_mb()
            yield AudioChunk(piece, time.monotonic())


async def soak(args: argparse.Namespace) -> dict:
    audio, _ = build_stream([speak(s) for s in SENTENCES], pause_s=1.5)
    engine = Engine(node=f"soak{uuid.uuid4().hex[:6]}")
    # the node's status, health, last state and discovery configs go when the run ends, an error or Ctrl-C too
    with cleared_after([engine.node], args.broker):
        sink = MqttSink(MqttOptions(spool="memory"), args.broker, engine.node)
        await sink.start()
        source = LoopSource(audio, args.minutes * 60, args.speed)
        rss_start = rss_mb()
        t0 = time.monotonic()
        try:
            stats = await run_stream(source, engine, [sink], "soak", options=PipelineOptions(max_backlog=64))
            wall = time.monotonic() - t0
            rss_end = rss_mb()
        finally:
            await sink.close()
            engine.close()
    return {
        "audio_minutes": args.minutes,
        "speed": args.speed,
        "wall_s": round(wall, 1),
        "utterances": stats.utterances,
        "events": stats.events,
        "published": sink.published,
        "voice_only": stats.voice_only,
        "dropped_utterances": stats.dropped,
        "dropped_events": sink.dropped,
        "failed": stats.failed,
        "spool_high_water": sink.spool.high_water,
        "rss_mb_models_loaded": round(rss_start, 1),
        "rss_mb_warm": round(source.rss_warm or float("nan"), 1),
        "rss_mb_end": round(rss_end, 1),
        "rss_growth_mb_after_warmup": round(rss_end - (source.rss_warm or rss_start), 1),
        "latency_ms_p50": round(float(np.percentile(stats.latencies_ms, 50)), 1),
        "latency_ms_p95": round(float(np.percentile(stats.latencies_ms, 95)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="minutes of audio")
    parser.add_argument("--speed", type=float, default=10.0, help="times real time")
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    result = asyncio.run(soak(args))
    report(result, args.json)


if __name__ == "__main__":
    main()
