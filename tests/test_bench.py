"""The benchmark machinery on a tiny run: two live calls through `emotion-monitor serve`, then the report."""

import argparse
import asyncio
import json

import pytest

from pipelines import bench_all, bench_calls

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
