"""Concurrent live calls through the real `emotion-monitor serve`: end of speech → event at an MQTT subscriber.

Starts `emotion-monitor serve --audiosocket` as its own process (or `--servers K` of them sharing the calls and
the GPU), then N AudioSocket clients (this process) each play a call in real time: 20 ms frames of 8 kHz slin,
Spanish sentences separated by pauses as long as the speech (≈ 50 % speech), calls starting `--stagger` s apart.
Ground-truth ends of speech come from the samples. Reports latency p50/p95/p99, the servers' CPU (cores busy,
CPU s per audio s), peak memory and, with a GPU, its mean utilisation and peak memory.

    .venv/bin/python -m pipelines.bench.calls --calls 1 8 16 24 [--seconds 60] [--uem N] [--json-dir docs/bench]
    .venv/bin/python -m pipelines.bench.calls --calls 100 300 --servers 4 --stagger 0.02   # a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiomqtt
import numpy as np
import soxr
import yaml

from pipelines.bench.live import add_clip_arguments, bench_clips, build_stream, report
from streamer.frames import SAMPLE_RATE
from streamer.retained import cleared_after

FRAME_S = 0.02


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _play_all(ports: list[int], calls: dict[str, np.ndarray], stagger_s: float, starts: dict[str, float]) -> None:
    """Every call in real time from one ticker: each 20 ms frame is sent when its last sample would exist.

    Call k connects (to server k mod len(ports)) up front and starts talking `k * stagger_s` later; one loop
    waking every 20 ms for all calls keeps a few hundred calls on time where a task per call would not.
    """
    step = int(8000 * FRAME_S) * 2
    slins, writers, readers, offsets = [], [], [], []
    for k, (call_id, audio) in enumerate(calls.items()):
        slins.append((np.clip(soxr.resample(audio, SAMPLE_RATE, 8000), -1, 1) * 32767).astype("<i2").tobytes())
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[k % len(ports)])
        writer.write(struct.pack(">BH", 0x01, 16) + uuid.UUID(call_id).bytes)
        readers.append(reader)
        writers.append(writer)
        offsets.append(round(k * stagger_s / FRAME_S))
    t0 = time.monotonic()
    for call_id, offset in zip(calls, offsets, strict=True):
        starts[call_id] = t0 + offset * FRAME_S
    ticks = max(o + -(-len(s) // step) for o, s in zip(offsets, slins, strict=True))
    for tick in range(ticks + 1):
        await asyncio.sleep(max(0.0, t0 + (tick + 1) * FRAME_S - time.monotonic()))
        for slin, writer, offset in zip(slins, writers, offsets, strict=True):
            frame = tick - offset
            if 0 <= frame * step < len(slin):
                chunk = slin[frame * step : (frame + 1) * step]
                writer.write(struct.pack(">BH", 0x10, len(chunk)) + chunk)
            elif frame * step >= len(slin) and frame * step - step < len(slin):
                writer.write(struct.pack(">BH", 0x00, 0))  # hang up after the last frame
    await asyncio.gather(*(w.drain() for w in writers))
    await asyncio.gather(*(r.read() for r in readers))
    for writer in writers:
        writer.close()


async def _wait_port(port: int, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"emotion-monitor serve exited with {server.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.2)
    raise TimeoutError("emotion-monitor serve did not listen in time")


def _server_config(args: argparse.Namespace, calls: int, path: Path) -> Path:
    """The server's YAML (`--config`, if any) with `ingest.max_calls` raised to what each server will get."""
    config = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    ingest = config.setdefault("ingest", {})
    ingest["max_calls"] = max(ingest.get("max_calls", 64), -(-calls // args.servers))
    path.write_text(yaml.safe_dump(config))
    return path


class GpuSampler:
    """GPU utilisation and memory from `nvidia-smi` every 0.5 s while a run lasts (nothing without a GPU)."""

    def __init__(self) -> None:
        self._proc = None
        if shutil.which("nvidia-smi"):
            query = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "500"]
            self._proc = subprocess.Popen(["nvidia-smi", *query], stdout=subprocess.PIPE, text=True)

    def stop(self) -> dict:
        if self._proc is None:
            return {}
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        samples = [tuple(float(v) for v in line.split(",")) for line in out.splitlines() if line.count(",") == 1]
        if not samples:
            return {}
        util, memory = zip(*samples, strict=True)
        return {"gpu_util_mean_pct": round(statistics.mean(util), 1), "gpu_memory_peak_mb": max(memory)}


async def bench(calls: int, args: argparse.Namespace, clips: list[np.ndarray], node: str | None = None) -> dict:
    """`calls` calls through `args.servers` servers, nodes `<node>-<k>`; what they retained on the broker is
    deleted at the end, however the run ends. `node` is the caller's own name (a test's, which its guard sweeps);
    by default a fresh `benchcalls<hex>`."""
    node = node or f"benchcalls{uuid.uuid4().hex[:6]}"
    ports = [_free_port() for _ in range(args.servers)]
    pause = float(np.mean([len(c) for c in clips])) / SAMPLE_RATE  # as much silence as speech
    streams = {}
    for i in range(calls):
        order, audio, ends = clips[i % len(clips) :] + clips[: i % len(clips)], np.zeros(0, np.float32), []
        while len(audio) < args.seconds * SAMPLE_RATE:
            more, more_ends = build_stream(order, pause)
            ends += [len(audio) / SAMPLE_RATE + e for e in more_ends]
            audio = np.concatenate([audio, more])
        streams[str(uuid.uuid4())] = (audio, ends)
    with tempfile.TemporaryDirectory() as tmp, cleared_after([node], args.broker):
        config = _server_config(args, calls, Path(tmp) / "serve.yaml")
        logs = [open(Path(tmp) / f"serve{k}.log", "w+") for k in range(args.servers)]  # noqa: SIM115
        serve = [sys.executable, "-m", "streamer", "serve", "--broker", args.broker, "--config", str(config)]
        servers = [  # a node each: a node's spool belongs to one process
            subprocess.Popen(
                [*serve, "--node", f"{node}-{k}", "--audiosocket", f"127.0.0.1:{port}"], stderr=log, text=True
            )
            for k, (port, log) in enumerate(zip(ports, logs, strict=True))
        ]
        received: list[tuple[float, str, dict]] = []
        try:
            for port, server in zip(ports, servers, strict=True):
                await _wait_port(port, server)
            host, mqtt_port = args.broker.removeprefix("mqtt://").split(":")

            async def subscribe(ready: asyncio.Event) -> None:
                async with aiomqtt.Client(host, int(mqtt_port)) as client:
                    await client.subscribe("emotion/v1/+/call/#", qos=1)
                    ready.set()
                    async for message in client.messages:
                        if message.payload and str(message.topic).startswith(f"emotion/v1/{node}-"):
                            # (an empty retained message clears an ended call's state)
                            received.append((time.monotonic(), str(message.topic), json.loads(message.payload)))

            ready = asyncio.Event()
            subscriber = asyncio.create_task(subscribe(ready))
            await ready.wait()
            starts: dict[str, float] = {}
            gpu = GpuSampler()
            cpu0, wall0 = sum(_proc_cpu_s(s.pid) for s in servers), time.monotonic()
            await _play_all(ports, {cid: a for cid, (a, _) in streams.items()}, args.stagger, starts)
            deadline = time.monotonic() + 60
            while sum(t.endswith("/lifecycle") and m["type"] == "ended" for _, t, m in received) < calls:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            cpu, wall = sum(_proc_cpu_s(s.pid) for s in servers) - cpu0, time.monotonic() - wall0
            peak_mb = sum(_proc_peak_mb(s.pid) for s in servers)
            gpu_figures = gpu.stop()
            subscriber.cancel()
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                server.wait(timeout=60)
            log_tail = []
            for log in logs:
                log.seek(0)
                log_tail += log.read().strip().splitlines()[-3:]
                log.close()
    latencies, stages, unmatched = [], [], 0
    events = [(a, m) for a, t, m in received if t.endswith("/event")]
    for arrived, event in events:
        truths = streams[event["call_id"]][1]
        truth = min(truths, key=lambda e: abs(e - event["end_s"]))
        if abs(truth - event["end_s"]) > 0.25:
            unmatched += 1
            continue
        latencies.append((arrived - (starts[event["call_id"]] + truth)) * 1000)
        stages.append(event["latency_ms"])
    lat = np.array(latencies)
    audio_s = sum(len(a) for a, _ in streams.values()) / SAMPLE_RATE

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)), 1) if len(lat) else None

    return {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cores",
        "calls": calls,
        "audio_s": round(audio_s, 1),
        "speech_share": 0.5,
        "utterances_true": sum(len(e) for _, e in streams.values()),
        "events": len(events),
        "events_without_a_true_end_nearby": unmatched,
        "voice_only": sum(e["asr"]["rejected"] == "overload" for _, e in events),
        "calls_ended": sum(t.endswith("/lifecycle") and m["type"] == "ended" for _, t, m in received),
        "latency_ms_p50": pct(50),
        "latency_ms_p95": pct(95),
        "latency_ms_p99": pct(99),
        "latency_ms_max": round(float(lat.max()), 1) if len(lat) else None,
        "stage_ms_p50": {k: round(float(np.median([s[k] for s in stages])), 1) for k in stages[0]} if stages else {},
        "server_cpu_cores_busy": round(cpu / wall, 2),
        "server_cpu_s_per_audio_s": round(cpu / audio_s, 3),
        "server_peak_rss_mb": round(peak_mb, 1),
        "servers": args.servers,
        "stagger_s": args.stagger,
        **gpu_figures,
        "server_log_tail": log_tail,
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line; `bench_all` parses its own runs with it too, so the two never drift apart."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--seconds", type=float, default=60, help="audio per call")
    add_clip_arguments(parser)
    parser.add_argument("--config", help="YAML config for the servers (e.g. another max_batch)")
    parser.add_argument("--servers", type=int, default=1, help="`serve` processes sharing the calls (and the GPU)")
    parser.add_argument("--stagger", type=float, default=0.37, help="seconds between the starts of two calls")
    parser.add_argument("--json-dir", help="write calls_<N>.json here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    clips = bench_clips(args)
    for calls in args.calls:
        result = asyncio.run(bench(calls, args, clips))
        report(result, f"{args.json_dir}/calls_{calls}.json" if args.json_dir else None)


if __name__ == "__main__":
    main()
