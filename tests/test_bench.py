"""The benchmark machinery on tiny runs: two live calls through two `emotion-monitor serve` processes, then the
report; the encoder-window curve on two clips; the endpointing study; the GPU bundle's parts and CUDA links."""

import argparse
import asyncio
import importlib.util
import json
import tarfile

import numpy as np
import pytest

from pipelines.bench import all as bench_all
from pipelines.bench import calls as bench_calls
from pipelines.bench import endpointing as bench_endpointing
from pipelines.bench import gpu_bundle
from pipelines.bench import windows as bench_windows
from tests.conftest import retained_under, unique_node

pytestmark = pytest.mark.slow


def test_calls_benchmark_and_report(broker, speak, tmp_path):
    """The servers' nodes are the test's own (`unique_node`), so its guard deletes what they retained even if the
    benchmark fails half-way; the benchmark deletes it itself first, as it does for a user's run."""
    clips = [speak("Buenos días, quiero consultar mi factura."), speak("Estoy harto de esperar tanto.")]
    args = argparse.Namespace(broker="mqtt://127.0.0.1:1883", seconds=1, config=None, servers=2, stagger=0.2)
    node = unique_node("benchcalls")
    result = asyncio.run(bench_calls.bench(2, args, clips, node))  # one call on each of two servers
    assert retained_under([node]) == {}
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


def test_gpu_bundle_parts_join_back_into_the_bundle(tmp_path):
    """The parts that travel one device call each unpack into exactly the folders that were packed."""
    site = tmp_path / "site"
    (site / "pkg").mkdir(parents=True)
    payload = np.random.default_rng(0).bytes(3_000_000)  # incompressible, so it spans several parts
    (site / "pkg" / "model.bin").write_bytes(payload)
    (site / "pkg" / "__init__.py").write_text("x = 1\n")
    bundle = tmp_path / "bundle.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        tar.add(site, "site")
    out = tmp_path / "parts"
    out.mkdir()
    parts = gpu_bundle.cut(bundle, out, 1_000_000)
    assert len(parts) == 4 and all(p.stat().st_size <= 1_000_000 for p in parts)
    gpu_bundle.unpack(list(reversed(parts)), tmp_path / "unpacked")  # joined in name order, whatever the listing
    assert (tmp_path / "unpacked" / "site" / "pkg" / "model.bin").read_bytes() == payload
    assert (tmp_path / "unpacked" / "site" / "pkg" / "__init__.py").read_text() == "x = 1\n"


def test_gpu_bundle_runs_benchmarks_that_exist(tmp_path):
    """The device runs each benchmark as `python -m <module>`: a renamed module would fail only there."""
    for quick in (True, False):
        for name, args in gpu_bundle.benchmarks(tmp_path, quick, "mqtt://127.0.0.1:1883", tmp_path / "clips").items():
            assert importlib.util.find_spec(args[0]) is not None, f"{name}: no module {args[0]}"
            assert str(tmp_path) in " ".join(args), f"{name} writes outside --out"


def test_gpu_bundle_links_cuda_12_names_to_the_machines_cuda_13_libraries(tmp_path):
    nvidia = tmp_path / "py" / "lib" / "python3.12" / "site-packages" / "nvidia"
    for folder, name in (("cublas", "libcublas.so.13"), ("cublas", "libcublasLt.so.13"), ("cudnn", "libcudnn.so.9")):
        (nvidia / folder / "lib").mkdir(parents=True, exist_ok=True)
        (nvidia / folder / "lib" / name).write_text(name)
    links = tmp_path / "links"
    found = gpu_bundle.cuda_libraries(links, prefix=str(tmp_path / "py"))
    assert found == [str(links), str(nvidia / "cublas" / "lib"), str(nvidia / "cudnn" / "lib")]
    assert (links / "libcublas.so.12").read_text() == "libcublas.so.13"
    assert (links / "libcublasLt.so.12").read_text() == "libcublasLt.so.13"
    assert not (links / "libcudnn.so.12").exists()


def test_endpointing_study_finds_the_true_end_and_counts_cuts(engine, speak):
    """Every pause of a sentence gets a guess; the last is its true end. The summary counts a pause as a cut by a
    plain hangover when it is long enough, and by the semantic rule only if its guess also ends a sentence."""
    clip = speak("Muchas gracias, estoy muy contento con el servicio.")
    rows = bench_endpointing.pause_guesses(clip, engine.recogniser)
    assert rows[-1]["end"] and not any(row["end"] for row in rows[:-1])
    assert rows[-1]["silence_windows"] >= 25 and rows[-1]["text"]
    inner = {"silence_windows": 6, "end": False, "text": "Muchas gracias.", "ends_sentence": True}
    broken = {"silence_windows": 6, "end": False, "text": "Muchas...", "ends_sentence": False}
    end = {"silence_windows": 30, "end": True, "text": "Muchas gracias.", "ends_sentence": True}
    summary = bench_endpointing.summarise([[inner, end], [broken, end]])
    assert summary["ends_closed_early"] == 1.0 and summary["extra_cuts_per_sentence_hangover"] == 0
    by_ms = {row["threshold_ms"]: row for row in summary["thresholds"]}
    assert by_ms[192]["extra_cuts_per_sentence_plain"] == 1.0 and by_ms[192]["extra_cuts_per_sentence_semantic"] == 0.5
    assert by_ms[224]["extra_cuts_per_sentence_plain"] == 0.0
