"""Calibrate the int8 e5 of the words heads: SmoothQuant scales from the float model's activations.

    .venv/bin/python -m pipelines.encoders.e5_int8 [--config configs/train/e5_int8.yaml]

writes `streamer/models/e5_int8_smoothing.npz` (one scale per input channel of each linear layer, `l<i>.<linear>`
as `streamer.e5onnx.LINEARS` names them), prints its SHA-256 for `streamer.models.E5_INT8_SMOOTHING_SHA256`, and
reports (`docs/models/e5_int8_parity.md`) the int8 graph against the float one on sentences that did not calibrate
it: the cosine of each output layer's pooled state, and the milliseconds per sentence of both on one thread.

Why: e5's LayerNorm and GELU outputs have a few channels tens of times larger than the rest, and a dynamic int8 step
set by them rounds the others away (layer 6's pooled state at cosine 0.974 to float on some sentences). Dividing each
input channel by s and multiplying the weights by s moves that range into the weights, which are quantized per
column: the product is unchanged in float and both sides quantize well. The per-channel activation maxima come from
the float torch model (`pipelines.encoders.e5`), one sentence at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from pipelines.encoders.e5 import LAYER_TENSORS, load_bert
from streamer.e5file import E5File
from streamer.e5onnx import LINEARS, E5Tokenizer, layer_weights

log = logging.getLogger(__name__)

# streamer.e5onnx.LINEARS → the BertLayer module whose input is that linear's input (the first of its parts')
MODULES = {linear: LAYER_TENSORS[parts[0]] for linear, parts in LINEARS.items()}


def calibration_sentences(cfg: dict, root=None) -> list[str]:
    from pipelines.data import corpora as D

    readers = {D.EMOSPEECH: lambda: D.read_emospeech(root), D.GOEMOTIONS: lambda: D.read_goemotions(root, ("train",))}
    out = []
    for name, n in cfg["sentences"].items():
        out += [r.text for r in D.limit_records(readers[name]().records, int(n), int(cfg["seed"]))]
    return out


def activation_maxima(file: E5File, sentences: list[str]) -> dict[str, np.ndarray]:
    """Per input channel of each linear layer, the largest |value| over every token of `sentences`."""
    import torch

    model, tokenizer = load_bert(file), E5Tokenizer(file)
    maxima: dict[str, np.ndarray] = {f"l{i}.{n}": 0.0 for i in range(len(model.encoder.layer)) for n in LINEARS}

    def hook(name: str):
        def record(_module, inputs, _output) -> None:
            m = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).numpy()
            maxima[name] = np.maximum(maxima[name], m)

        return record

    for i, layer in enumerate(model.encoder.layer):
        for linear, module in MODULES.items():
            layer.get_submodule(module).register_forward_hook(hook(f"l{i}.{linear}"))
    with torch.inference_mode():
        for text in sentences:  # one at a time: no padding in the maxima
            model(input_ids=torch.tensor([tokenizer.ids(text)]))
    return maxima


def smoothing_scales(file: E5File, maxima: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """s = max|x|^alpha / max|w|^(1 − alpha) per input channel (the weight maximum over every output that reads
    the channel)."""
    weights = layer_weights(file)
    out = {}
    for name, amax in maxima.items():
        layer, linear = name.split(".")
        wmax = np.max([np.abs(weights[f"{layer}.{p}.w"]).max(axis=0) for p in LINEARS[linear]], axis=0)
        out[name] = (np.maximum(amax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)).astype(np.float32)
    return out


def parity_report(smoothing: dict[str, np.ndarray], calibrated: list[str], seconds: float, cfg_path: Path) -> str:
    """The int8 graph (`smoothing`) against the float graph on `parity_sentences` not in `calibrated`."""
    from pipelines.encoders.e5 import parity_sentences
    from streamer.e5onnx import OnnxE5
    from streamer.models import e5_small_path
    from streamer.words import E5LayersEncoder

    seen = set(calibrated)
    candidates = parity_sentences(400)  # Spanish first, then English
    sentences = [t for t in candidates if t not in seen]
    n_es = sum(1 for t in candidates[: len(candidates) // 2] if t not in seen)
    layers = E5LayersEncoder.layers
    graphs, load_s = {}, {}
    for name, table in (("float32", None), ("int8", smoothing)):
        t0 = time.perf_counter()
        graphs[name] = OnnxE5(e5_small_path(), threads=1, outputs=layers, smoothing=table)
        load_s[name] = time.perf_counter() - t0
    ref, int8 = (graphs[k].pooled(sentences) for k in ("float32", "int8"))
    cos = (ref * int8).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(int8, axis=-1)
    ms = {}
    for name, graph in graphs.items():
        graph.pooled(sentences[:2])
        times = []
        for text in sentences[:n_es]:
            t0 = time.perf_counter()
            graph.pooled([text])
            times.append(1000 * (time.perf_counter() - t0))
        ms[name] = (np.median(times), np.percentile(times, 95))
    lines = [
        "# multilingual-e5-small in int8: parity with the float graph, and speed",
        "",
        f"Reproduce: `.venv/bin/python -m pipelines.encoders.e5_int8` ({seconds:.0f} s; recipe "
        f"`{cfg_path}`). The words heads' e5 (`streamer.words.E5LayersEncoder`, layers {', '.join(map(str, layers))}) "
        "with SmoothQuant int8 linear layers against the same graph in float32 (`streamer.e5onnx`), on "
        f"{n_es} EmoSPeech transcripts and {len(sentences) - n_es} GoEmotions English test comments that did not "
        "calibrate it. Cosine between the two mean-pooled states of each layer, per sentence:",
        "",
        "| sentences | layer | min | 1 % | 5 % | median |",
        "|---|---|---|---|---|---|",
    ]
    for name, part in (("Spanish", cos[:n_es]), ("English", cos[n_es:])):
        for j, layer in enumerate(layers):
            q = np.quantile(part[:, j], [0.0, 0.01, 0.05, 0.5])
            lines.append(f"| {name} ({len(part)}) | {layer} | " + " | ".join(f"{v:.4f}" for v in q) + " |")
    lines += [
        "",
        f"Milliseconds per Spanish transcript (tokenizer, embedding rows and graph; one at a time, one thread, "
        f"median / p95) on {platform.machine()} with {cpu_flags()}:",
        "",
        "| graph | median ms | p95 ms | load s |",
        "|---|---|---|---|",
        *(f"| {k} | {m:.1f} | {p:.1f} | {load_s[k]:.2f} |" for k, (m, p) in ms.items()),
    ]
    return "\n".join(lines) + "\n"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU flags"
    flags = next((line.split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
    return ", ".join(f for f in wanted if f in flags) or "no AVX2"


def main(argv: list[str] | None = None) -> int:
    from streamer.models import E5_INT8_SMOOTHING, e5_small_path, save_arrays

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/train/e5_int8.yaml"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=E5_INT8_SMOOTHING)
    ap.add_argument("--report", type=Path, default=Path("docs/models/e5_int8_parity.md"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(2)
    cfg = yaml.safe_load(args.config.read_text())
    t0 = time.perf_counter()
    file = E5File.read(e5_small_path())
    sentences = calibration_sentences(cfg, args.data_dir)
    scales = smoothing_scales(file, activation_maxima(file, sentences), float(cfg["alpha"]))
    save_arrays(args.out, scales)  # layer by layer, LINEARS' order in each
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    log.info("%d sentences, %.0f s → %s (SHA-256 %s)", len(sentences), time.perf_counter() - t0, args.out, digest)
    report = parity_report(scales, sentences, time.perf_counter() - t0, args.config)
    args.report.write_text(report, encoding="utf-8")
    log.info("%s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
