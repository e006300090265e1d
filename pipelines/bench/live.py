"""Live streams, end to end: end of speech → event received by a real MQTT subscriber.

The stream is Spanish speech (espeak-ng sentences, or UEM clips with `--uem`) separated by pauses, played in
real time through the real pipeline. Ground-truth speech ends come from the samples, not from the VAD.
Prints p50/p95/max latency, the stage breakdown and CPU seconds per second of audio; `--json` saves them.

    .venv/bin/python -m pipelines.bench.live [--broker mqtt://127.0.0.1:1883] [--uem N] [--streams N]
                                             [--speculate-ms MS] [--tail-ms MS] [--sentence-end-ms MS]
                                             [--config YAML] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import json
import os
import platform
import resource
import time
import uuid
from pathlib import Path

import aiomqtt
import numpy as np

from pipelines.data.corpora import UEM, data_dir
from streamer.audio import load_audio
from streamer.config import load_config
from streamer.demo import DEMO_SENTENCES, speak
from streamer.frames import SAMPLE_RATE
from streamer.pipeline import Engine, run_stream
from streamer.publisher import MqttOptions, MqttSink
from streamer.recogniser import for_one_stream
from streamer.retained import cleared_after
from streamer.sources import FileSource

SENTENCES = (
    *DEMO_SENTENCES,
    "Mañana tengo una reunión a las nueve.",
    "¿Puede repetirme el número, por favor?",
    "No entiendo por qué me cobran dos veces el mismo recibo.",
    "Muchas gracias por su ayuda, adiós.",
)


def speech_ends(clip: np.ndarray, min_gap_s: float = 0.3) -> list[float]:
    """Ends (s) of the clip's speech bursts separated by at least `min_gap_s` of silence, from the samples:
    10 ms frames whose RMS is above 8× the clip's noise floor (its 10th-percentile frame) count as speech."""
    hop = SAMPLE_RATE // 100
    rms = np.sqrt(np.mean(clip[: len(clip) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    active = rms > max(1e-4, 8 * float(np.percentile(rms, 10)))
    ends, last, gap = [], None, 0
    for i, on in enumerate(active):
        if on:
            last, gap = i, 0
            continue
        gap += 1
        if last is not None and gap == round(min_gap_s * 100):
            ends.append((last + 1) * hop / SAMPLE_RATE)
            last = None
    if last is not None:
        ends.append((last + 1) * hop / SAMPLE_RATE)
    return ends


def build_stream(clips: list[np.ndarray], pause_s: float) -> tuple[np.ndarray, list[float]]:
    """Clips separated by pauses, and the true ends of speech (a sentence with inner pauses has several)."""
    pause = np.zeros(int(pause_s * SAMPLE_RATE), np.float32)
    parts, ends, t = [pause], [], len(pause)
    for clip in clips:
        ends += [t / SAMPLE_RATE + end for end in speech_ends(clip)]
        parts += [clip, pause]
        t += len(clip) + len(pause)
    return np.concatenate(parts), ends


def _uem_manifest() -> Path:
    return data_dir() / UEM / "manifest.csv"


def has_uem() -> bool:
    return _uem_manifest().is_file()


def uem_clips(n: int) -> list[np.ndarray]:
    manifest = _uem_manifest()
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [r for r in rows if r["speaker"] in ("test1", "test2")][:n]
    return [load_audio(manifest.parent / r["path"]) for r in rows]


def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a benchmark's speech comes from: espeak-ng sentences (default), UEM clips or a folder of WAVs."""
    parser.add_argument("--uem", type=int, default=0, help="use N clips of UEM's held-out speakers instead of espeak")
    parser.add_argument("--clips-dir", help="use the WAV files here (sorted by name), e.g. where espeak-ng is absent")


def bench_clips(args: argparse.Namespace) -> list[np.ndarray]:
    if args.clips_dir:
        return [load_audio(path) for path in sorted(Path(args.clips_dir).glob("*.wav"))]
    return uem_clips(args.uem) if args.uem else [speak(s) for s in SENTENCES]


async def bench(args: argparse.Namespace) -> dict:
    """`args.streams` live streams at once, sharing one engine; stream i plays the clips rotated by i and
    starts 0.37·i s later, so the ends of speech of different streams rarely coincide."""
    import soundfile as sf

    clips = bench_clips(args)
    sources, truths = {}, {}
    for i in range(args.streams):
        order = clips[i % len(clips) :] + clips[: i % len(clips)]
        audio, ends = build_stream(order, args.pause)
        lead = np.zeros(int(0.37 * (i % 8) * SAMPLE_RATE), np.float32)
        wav = Path(args.workdir) / f"bench_live_{i}.wav"
        sf.write(wav, np.concatenate([lead, audio]), SAMPLE_RATE, subtype="PCM_16")
        sources[f"s{i}"] = FileSource(wav, realtime=True)
        truths[f"s{i}"] = [len(lead) / SAMPLE_RATE + e for e in ends]
    audio_s = args.streams * len(audio) / SAMPLE_RATE
    node = f"bench{uuid.uuid4().hex[:6]}"
    config = load_config(args.config)
    recogniser = for_one_stream(config.recogniser) if args.streams == 1 else config.recogniser  # as `run` does
    engine = Engine(recogniser, config.classifier, node, config.pipeline.max_batch)
    host, port = args.broker.removeprefix("mqtt://").split(":")
    received: list[tuple[float, dict]] = []

    async def subscribe(ready: asyncio.Event) -> None:
        async with aiomqtt.Client(host, int(port)) as client:
            await client.subscribe(f"emotion/v1/{node}/+/event", qos=1)
            ready.set()
            async for message in client.messages:
                received.append((time.monotonic(), json.loads(message.payload)))

    ready = asyncio.Event()
    cutter = dataclasses.replace(
        config.segmenter,
        **{k: v for k in ("speculate_ms", "tail_ms", "sentence_end_ms") if (v := getattr(args, k)) is not None},
    )
    # the node's status, health, last states and discovery configs go when the run ends, an error or Ctrl-C too
    with cleared_after([node], args.broker):
        subscriber = asyncio.create_task(subscribe(ready))
        sink = MqttSink(MqttOptions(spool="memory"), args.broker, node)
        try:
            await ready.wait()
            await sink.start()
            await sink.connected.wait()
            cpu0, wall0 = time.process_time(), time.monotonic()
            runs = (run_stream(src, engine, [sink], name, cutter) for name, src in sources.items())
            all_stats = await asyncio.gather(*runs)
            cpu = time.process_time() - cpu0
        finally:
            await sink.close()  # before the sweep: nothing published after it
            await asyncio.sleep(0.5)  # the last events reach the subscriber
            subscriber.cancel()
            engine.close()

    latencies, stages, unmatched = [], [], 0
    for arrived, event in received:
        truth = min(truths[event["stream"]], key=lambda e: abs(e - event["end_s"]))
        if abs(truth - event["end_s"]) > 0.25:  # the VAD cut where the samples show no pause ≥ 0.3 s
            unmatched += 1
            continue
        latencies.append((arrived - (sources[event["stream"]].started + truth)) * 1000)
        stages.append(event["latency_ms"])
    lat = np.array(latencies)
    stage_p50 = {k: round(float(np.median([s[k] for s in stages])), 1) for k in stages[0]} if stages else {}
    return {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cores",
        "streams": args.streams,
        "audio_s": round(audio_s, 1),
        "utterances_true": sum(len(t) for t in truths.values()),
        "events": len(received),
        "events_without_a_true_end_nearby": unmatched,
        "voice_only": sum(s.voice_only for s in all_stats),
        "dropped": sum(s.dropped for s in all_stats),
        "failed": sum(s.failed for s in all_stats),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "latency_ms_p95": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
        "latency_ms_max": round(float(lat.max()), 1) if len(lat) else None,
        "stage_ms_p50": stage_p50,
        "latencies_ms": sorted(round(x) for x in latencies),
        "finals_from_a_guess": sum(s["queue"] == 0 for s in stages),  # recognised during the hangover
        "guesses_dropped_after_encoding": engine.superseded,
        "cpu_s_per_audio_s": round(cpu / audio_s, 3),
        "cpu_cores_busy": round(cpu / (time.monotonic() - wall0), 2),
        "wall_s": round(time.monotonic() - wall0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def report(result: dict, path: str | None) -> None:
    """Print a benchmark's figures and, with `--json PATH`, keep them."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line; `bench_all` parses its own runs with it too, so the two never drift apart."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    add_clip_arguments(parser)
    parser.add_argument("--pause", type=float, default=1.5, help="seconds of silence between utterances")
    parser.add_argument("--streams", type=int, default=1, help="live streams at once, sharing one engine")
    parser.add_argument("--speculate-ms", type=int, help="the segmenter's speculate_ms (default: its default)")
    parser.add_argument("--sentence-end-ms", type=int, help="the segmenter's sentence_end_ms (0 = off)")
    parser.add_argument("--tail-ms", type=int, help="the segmenter's tail_ms (default: its default)")
    parser.add_argument("--config", help="daemon YAML config (e.g. other recogniser workers or threads)")
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--json", help="write the figures here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    result = asyncio.run(bench(args))
    report(result, args.json)


if __name__ == "__main__":
    main()
