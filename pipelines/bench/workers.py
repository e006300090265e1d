"""Scale-out throughput: the same job set through 1 and then 2 `emotion-monitor worker` processes, and the cost of
a job on the wire (payload bytes per audio second, FLAC vs raw PCM; encode/decode time; broker round trip).

Each worker gets CPUs / workers Whisper threads by default, so 1 and 2 workers use the same CPU budget.
Jobs are espeak-ng sentences, one utterance each, spread over `--streams` streams (the engine batches across
streams), all published at once after a warm-up; throughput is jobs / (first publish → last event at a
subscriber). Worker start-up (model loading) is not timed.

    .venv/bin/python -m pipelines.bench.workers [--workers 1 2] [--streams 4] [--rounds 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiomqtt
import numpy as np

from pipelines.bench.live import SENTENCES, report
from streamer.demo import speak
from streamer.distributed.jobs import Job, decode, encode, job_topic
from streamer.frames import SAMPLE_RATE, Utterance
from streamer.retained import cleared_after

BROKER = ("127.0.0.1", 1883)
BROKER_URL = f"mqtt://{BROKER[0]}:{BROKER[1]}"


def make_jobs(node: str, streams: int, rounds: int, first: int = 0) -> list[Job]:
    """Every sentence once per round and stream; seq and segment ids count per stream from `first`."""
    audio = [speak(s) for s in SENTENCES]
    jobs = []
    for stream in range(streams):
        for i, clip in enumerate([clip for _ in range(rounds) for clip in audio], first):
            whole = Utterance.whole(clip, f"s{stream}")
            jobs.append(Job(node, i, Utterance(**{**whole.__dict__, "segment_id": i}), time.time() + 3600))
    return jobs


def wire_costs(jobs: list[Job]) -> dict:
    audio_s = sum(len(j.utterance.audio) for j in jobs) / SAMPLE_RATE
    costs: dict = {"audio_s": round(audio_s, 1), "jobs": len(jobs)}
    for codec in ("flac", "pcm"):
        started = time.perf_counter()
        payloads = [encode(j, codec) for j in jobs]
        encoded = time.perf_counter()
        for payload in payloads:
            decode(payload)
        decoded = time.perf_counter()
        costs[codec] = {
            "bytes_per_audio_s": round(sum(map(len, payloads)) / audio_s),
            "encode_ms_per_job": round((encoded - started) * 1000 / len(jobs), 2),
            "decode_ms_per_job": round((decoded - encoded) * 1000 / len(jobs), 2),
        }
    return costs


async def round_trip(payloads: list[bytes]) -> dict:
    """Publish each payload (QoS 1) to a topic we subscribe to, one at a time: publish → PUBACK, publish → delivery."""
    topic = f"bench/rtt/{uuid.uuid4().hex[:8]}"
    acked, delivered = [], []
    async with aiomqtt.Client(*BROKER, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(topic, qos=1)
        for payload in payloads:
            started = time.perf_counter()
            await client.publish(topic, payload, qos=1)
            acked.append(time.perf_counter() - started)
            await anext(client.messages)
            delivered.append(time.perf_counter() - started)
    ms = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 2)  # noqa: E731
    return {"puback_ms_p50": ms(acked, 50), "delivery_ms_p50": ms(delivered, 50), "delivery_ms_p95": ms(delivered, 95)}


def worker_id(i: int) -> str:
    """Worker `i`'s id: its status and health are on `emotion/v1/worker-<id>/…`."""
    return f"bench-worker-{i}"


def start_workers(n: int, group: str, node: str, logs: Path, threads: int) -> list[tuple[subprocess.Popen, Path]]:
    config = logs / "workers.yaml"
    config.write_text(f"recogniser: {{cpu_threads: {threads}}}\nmqtt: {{health_interval_s: 0}}\n")
    procs = []
    for i in range(n):
        log = logs / f"worker-{i}.log"
        with open(log, "w") as out:
            command = [
                sys.executable,
                "-m",
                "streamer",
                "worker",
                "--group",
                group,
                "--id",
                worker_id(i),
                "--jobs",
                f"emotion/v1/jobs/{node}/#",
                "--config",
                str(config),
            ]
            procs.append((subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT), log))
    return procs


def wait_ready(procs: list[tuple[subprocess.Popen, Path]]) -> None:
    """Until every worker has loaded its models and subscribed (apart from starting them, so that a worker that
    fails, or Ctrl-C while the models load, still stops all of them)."""
    for proc, log in procs:
        while " ready: " not in log.read_text():
            if proc.poll() is not None:
                raise RuntimeError(log.read_text())
            time.sleep(0.3)


async def through(jobs: list[Job], node: str) -> float:
    """Publish all jobs at once; seconds until each has its event."""
    wanted = {j.id for j in jobs}
    async with aiomqtt.Client(*BROKER, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(f"emotion/v1/{node}/+/event", qos=1)
        started = time.perf_counter()
        for job in jobs:
            await client.publish(job_topic(node, job.utterance.stream), encode(job), qos=1)
        async for message in client.messages:
            wanted.discard(json.loads(message.payload)["event_id"])
            if not wanted:
                return time.perf_counter() - started
    raise RuntimeError("subscription ended")


def bench_pool(workers: int, args: argparse.Namespace, logs: Path) -> dict:
    """`workers` workers on a node of their own; what the node and the workers retained (the streams' last states,
    the workers' status and health) is deleted at the end, however the run ends."""
    node = f"bench{uuid.uuid4().hex[:8]}"
    threads = args.cpu_threads or max(1, (os.cpu_count() or 1) // workers)
    worker_nodes = [f"/worker-{worker_id(i)}/" for i in range(workers)]  # slashes: worker-1 is not worker-10
    with cleared_after([node, *worker_nodes], BROKER_URL):
        procs = start_workers(workers, f"bench-{node}", node, logs, threads)
        try:
            wait_ready(procs)
            asyncio.run(through(make_jobs(node, args.streams, 1)[: 2 * workers], node))  # warm-up
            jobs = make_jobs(node, args.streams, args.rounds, first=1000)  # ids apart from the warm-up's
            seconds = asyncio.run(through(jobs, node))
            load = os.getloadavg()[0]
        finally:
            for proc, _ in procs:
                proc.terminate()
            for proc, _ in procs:
                proc.wait(60)
    audio_s = sum(len(j.utterance.audio) for j in jobs) / SAMPLE_RATE
    batches = [
        line.rsplit("mean batch ", 1)[1].strip()
        for _, log in procs
        for line in log.read_text().splitlines()
        if "mean batch" in line
    ]
    return {
        "workers": workers,
        "cpu_threads_per_worker": threads,
        "jobs": len(jobs),
        "seconds": round(seconds, 2),
        "utterances_per_s": round(len(jobs) / seconds, 2),
        "audio_s_per_s": round(audio_s / seconds, 2),
        "mean_batch": batches,
        "load_average_1m_after": round(load, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="each sentence this often per stream")
    parser.add_argument("--cpu-threads", type=int, help="Whisper threads per worker (default: CPUs / workers)")
    parser.add_argument("--json", help="write the figures here (e.g. docs/bench/workers.json)")
    args = parser.parse_args()
    jobs = make_jobs("bench", args.streams, args.rounds)
    result: dict = {
        "conditions": {
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "load_average_1m_before": round(os.getloadavg()[0], 2),
            "broker": "Mosquitto on 127.0.0.1 (loopback: no network latency)",
            "note": "workers and the broker share the CPUs; each worker runs Whisper with recogniser.cpu_threads",
        },
        "wire": wire_costs(jobs),
        "broker_round_trip_flac": asyncio.run(round_trip([encode(j) for j in jobs])),
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["throughput"] = [bench_pool(n, args, Path(tmp)) for n in args.workers]
    report(result, args.json)
    print(f"\n{'workers':>7} {'threads':>7} {'jobs':>5} {'seconds':>8} {'utt/s':>6} {'audio s/s':>9}")
    for row in result["throughput"]:
        print(
            f"{row['workers']:>7} {row['cpu_threads_per_worker']:>7} {row['jobs']:>5} {row['seconds']:>8} "
            f"{row['utterances_per_s']:>6} {row['audio_s_per_s']:>9}"
        )


if __name__ == "__main__":
    main()
