"""The benchmark suite in one command: every benchmark, then a markdown table and a PNG plot in `docs/bench/`.

- single live stream (espeak-ng, and UEM held-out speakers when the data is there), repeated: median, min–max;
- CPU per utterance against a naive pipeline, and emotion's share over ASR alone (same run);
- concurrent live calls through `emotion-monitor serve` (the sweep);
then `docs/bench/RESULTS.md` and `docs/bench/calls.png` from all the JSON files in `docs/bench/`.

    .venv/bin/python -m pipelines.bench.all [--repeat 3] [--calls 1 8 16 24] [--seconds 60] [--out docs/bench]
    .venv/bin/python -m pipelines.bench.all --report-only     # redraw the table and the plot from the JSON
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
from pathlib import Path

from pipelines.bench import calls as bench_calls
from pipelines.bench import live as bench_live


def _spread(values: list[float | None]) -> str:
    """`median (min–max)` over repeated runs; one value alone."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})"


def _load(out: Path, pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob(pattern))]


def write_report(out: Path) -> Path:
    """RESULTS.md: one table per benchmark from the JSON files present; calls.png: latency and CPU vs calls."""
    lines = ["# Benchmark results", "", "Written by `python -m pipelines.bench.all` from the JSON files here.", ""]
    live = {}
    for run in _load(out, "live_*_run*.json"):
        live.setdefault(run["speech"], []).append(run)
    if live:
        lines += [
            "## One live stream: end of speech → event at an MQTT subscriber (ms; median (min–max) over runs)",
            "",
            "| speech | runs | events | p50 | p95 | max | CPU s per audio s | machine |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for speech, runs in live.items():
            lines.append(
                f"| {speech} | {len(runs)} | {runs[0]['events']} | {_spread([r['latency_ms_p50'] for r in runs])} | "
                f"{_spread([r['latency_ms_p95'] for r in runs])} | {_spread([r['latency_ms_max'] for r in runs])} | "
                f"{statistics.median(r['cpu_s_per_audio_s'] for r in runs):.3f} | {runs[0]['machine']} |"
            )
        lines.append("")
    naive = out / "bench_naive.json"
    if naive.exists():
        n = json.loads(naive.read_text())
        lines += ["## CPU per utterance (same run)", "", "```json", json.dumps(n, indent=2), "```", ""]
    calls = sorted(_load(out, "calls_*.json"), key=lambda r: r["calls"])
    if calls:
        lines += [
            "## Concurrent live calls through `emotion-monitor serve` (AudioSocket, 8 kHz, ≈ 50 % speech)",
            "",
            "| calls | events | voice-only | p50 ms | p95 ms | p99 ms | server cores busy | CPU s per audio s "
            "| peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in calls:
            lines.append(
                f"| {r['calls']} | {r['events']} | {r['voice_only']} | {r['latency_ms_p50']} | {r['latency_ms_p95']} "
                f"| {r['latency_ms_p99']} | {r['server_cpu_cores_busy']} | {r['server_cpu_s_per_audio_s']} "
                f"| {r['server_peak_rss_mb']} |"
            )
        lines += ["", "![latency and CPU against concurrent calls](calls.png)", ""]
        _plot(calls, out / "calls.png")
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def _plot(calls: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["calls"] for r in calls]
    fig, latency = plt.subplots(figsize=(7, 4))
    for key, style in (("latency_ms_p50", "o-"), ("latency_ms_p95", "s-"), ("latency_ms_p99", "^--")):
        latency.plot(x, [r[key] for r in calls], style, label=key.removeprefix("latency_ms_"))
    latency.axhline(1500, color="grey", linestyle=":", label="p95 target 1.5 s")
    latency.set_xlabel("concurrent live calls")
    latency.set_ylabel("end of speech → event received (ms)")
    cpu = latency.twinx()
    cpu.bar(x, [r["server_cpu_cores_busy"] for r in calls], alpha=0.15, color="C3", width=1.5)
    cpu.set_ylabel("server CPU cores busy (bars)")
    latency.legend(loc="upper left")
    latency.set_title(f"emotion-monitor serve, {calls[0]['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/bench")
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the single-stream benchmark")
    parser.add_argument("--uem", type=int, default=40, help="UEM clips for the single stream (0: espeak-ng only)")
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 8, 16, 24])
    parser.add_argument("--seconds", type=float, default=60, help="audio per call in the sweep")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        speeches = [("espeak", 0)] + ([("uem", args.uem)] if args.uem and bench_live.has_uem() else [])
        for speech, clips in speeches:
            for run in range(args.repeat):  # each run in a fresh process, as a daemon starts (models in a process
                # that loaded others before ran up to 10 % slower here)
                path = out / f"live_{speech}_run{run}.json"
                live = ["-m", "pipelines.bench.live", "--broker", args.broker, "--uem", str(clips), "--json", str(path)]
                subprocess.run([sys.executable, *live], check=True, stdout=subprocess.DEVNULL)
                bench_live.report(json.loads(path.read_text()) | {"speech": speech}, str(path))
        if bench_live.has_uem():  # the naive comparison runs on UEM clips
            naive = [sys.executable, "-m", "pipelines.bench.naive", "--json", str(out / "bench_naive.json")]
            subprocess.run(naive, check=True)
        sweep = bench_calls.build_parser().parse_args(["--broker", args.broker, "--seconds", str(args.seconds)])
        clips = [bench_live.speak(s) for s in bench_live.SENTENCES]
        for calls in args.calls:
            bench_live.report(asyncio.run(bench_calls.bench(calls, sweep, clips)), str(out / f"calls_{calls}.json"))
    print(f"wrote {write_report(out)}")


if __name__ == "__main__":
    main()
