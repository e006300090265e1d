"""The benchmark machinery on tiny runs: two live calls through two `emotion-monitor serve` processes, then the
report; the encoder-window curve on two clips."""

import argparse
import asyncio
import json

import pytest

from pipelines import bench_all, bench_calls, bench_windows

pytestmark = pytest.mark.slow


def test_calls_benchmark_and_report(broker, speak, tmp_path):
    clips = [speak("Buenos días, quiero consultar mi factura."), speak("Estoy harto de esperar tanto.")]
    args = argparse.Namespace(broker="mqtt://127.0.0.1:1883", seconds=1, config=None, servers=2, stagger=0.2)
    result = asyncio.run(bench_calls.bench(2, args, clips))  # one call on each of two servers
    assert result["calls"] == 2 and result["calls_ended"] == 2 and result["servers"] == 2
    assert result["events"] >= result["utterances_true"] - 1 and result["latency_ms_p50"] > 0
    assert result["server_cpu_s_per_audio_s"] > 0 and result["server_peak_rss_mb"] > 100
    (tmp_path / "calls_2.json").write_text(json.dumps(result))
    report = bench_all.write_report(tmp_path).read_text()
    assert "| 2 |" in report and (tmp_path / "calls.png").stat().st_size > 10_000


def test_window_benchmark_compares_with_the_native_window(speak, tmp_path):
    clips = [speak("Buenos días, quiero consultar mi factura."), speak("Estoy harto de esperar tanto.")]
    args = argparse.Namespace(windows=[10.0, 30.0], batches=[1, 2], repeats=1, device="cpu")
    result = bench_windows.measure(args, clips)
    native, short = result["rows"][1], result["rows"][0]
    assert (native["window_s"], native["transcript_agreement"], native["voice_label_agreement"]) == (30.0, 1.0, 1.0)
    assert 0.0 <= short["transcript_agreement"] <= 1.0 and [b["batch"] for b in short["batches"]] == [1, 2]
    assert all(b["ms_per_utterance"] > b["mel_ms_per_utterance"] > 0 for b in short["batches"])
    assert all(b["decode_ms_per_utterance"] > 0 and b["tokens_per_utterance"] >= 3 for b in short["batches"])
    bench_windows.write_outputs(result, tmp_path)
    assert (
        "| 10 |" in (tmp_path / "windows_cpu.md").read_text()
        and "decode ms per token" in (tmp_path / "windows_cpu.md").read_text()
    )
    assert (tmp_path / "windows_cpu.png").stat().st_size > 10_000
    assert bench_windows.word_agreement("hola qué tal", "hola que tal") == 2 / 3
