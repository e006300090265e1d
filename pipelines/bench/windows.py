"""Encoder window and batch size: cost per utterance against agreement with Whisper's native 30 s window.

Whisper was trained on 30 s windows; shorter padding is cheaper on a CPU but may change the transcript and the
voice emotion. For each window this measures, on the same clips, the wall time per utterance of one
`Recogniser.recognise_batch` call (median over repeats) at each batch size, the mel-spectrogram share of it, its
split into encoding and greedy decoding (with the decoder's cost per generated token), how far the transcript
and the voice head's label agree with the 30 s window, and writes JSON, a markdown table and a PNG curve
(cost vs. agreement). It runs on the device `--device` names (auto: CUDA when there is one).

    .venv/bin/python -m pipelines.bench.windows [--windows 0 5 10 20 30] [--batches 1 2 4] [--uem N] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import difflib
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from pipelines.bench.live import add_clip_arguments, bench_clips
from streamer.adaptation import StreamNorm
from streamer.frames import Utterance
from streamer.models import VOICE_HEAD
from streamer.recogniser import Recogniser, RecogniserOptions
from streamer.segmenter import speech_seconds
from streamer.voice_heads import load_voice_head

NATIVE_S = 30.0


def word_agreement(a: str, b: str) -> float:
    """Share of matching words (difflib ratio over word sequences): 1.0 for identical transcripts."""
    return difflib.SequenceMatcher(None, a.lower().split(), b.lower().split()).ratio() if a or b else 1.0


def timed_batches(recogniser: Recogniser, utterances: list[Utterance], batch: int, repeats: int) -> dict:
    """Median wall ms per utterance of `recognise_batch` over batches of `batch` clips, and the mel share."""
    items = [(utterances[i % len(utterances)], True) for i in range(batch)]
    recogniser.recognise_batch(items)  # warm-up (allocations, CUDA kernels)
    walls, mels, encodes, decodes = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        transcripts = recogniser.recognise_batch(items)
        walls.append((time.perf_counter() - t0) * 1000 / batch)
        encodes.append(transcripts[0].encode_ms / batch)  # each member carries its whole batch's times
        decodes.append(transcripts[0].decode_ms / batch)
        t0 = time.perf_counter()
        for utterance, _ in items:
            recogniser._whisper.feature_extractor(np.zeros(recogniser._window(len(utterance.audio)), np.float32))
        mels.append((time.perf_counter() - t0) * 1000 / batch)
    tokenizer = recogniser._tokenizer(recogniser.language or "es")
    tokens = sum(len(tokenizer.encode(t.text)) + 1 for t in transcripts) / batch  # + end of text
    return {
        "batch": batch,
        "ms_per_utterance": round(statistics.median(walls), 2),
        "mel_ms_per_utterance": round(statistics.median(mels), 2),
        "encode_ms_per_utterance": round(statistics.median(encodes), 2),
        "decode_ms_per_utterance": round(statistics.median(decodes), 2),
        "tokens_per_utterance": round(tokens, 1),
    }


def measure(args: argparse.Namespace, clips: list[np.ndarray]) -> dict:
    utterances = [Utterance.whole(c, "bench", speech_seconds(c)) for c in clips]
    head, norm = load_voice_head(), StreamNorm.load(VOICE_HEAD)

    def voice_input(frames: np.ndarray) -> np.ndarray:
        """What the head sees for a stream's first utterance (each clip here is a stream of its own)."""
        return frames if norm is None else norm.apply(frames, None)

    rows, reference = [], None
    for window in sorted(args.windows, reverse=True):  # 30 s first: the reference the others are compared with
        recogniser = Recogniser(RecogniserOptions(device=args.device, encoder_window_s=window))
        transcripts = recogniser.recognise_batch([(u, True) for u in utterances])
        texts = [t.text for t in transcripts]
        labels = [int(np.argmax(head.predict_frames(voice_input(t.encoder_frames)))) for t in transcripts]
        reference = reference or (texts, labels)
        rows.append(
            {
                "window_s": window,
                "transcript_agreement": round(
                    float(np.mean([word_agreement(a, b) for a, b in zip(texts, reference[0], strict=True)])), 3
                ),
                "voice_label_agreement": round(
                    float(np.mean([a == b for a, b in zip(labels, reference[1], strict=True)])), 3
                ),
                "batches": [timed_batches(recogniser, utterances, b, args.repeats) for b in args.batches],
            }
        )
        device = f"{recogniser.device}/{recogniser.compute_type}"
    return {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "device": device,
        "clips": len(clips),
        "clip_s_mean": round(float(np.mean([len(c) for c in clips])) / 16000, 2),
        "reference_window_s": NATIVE_S,
        "rows": sorted(rows, key=lambda r: r["window_s"]),
    }


def write_outputs(result: dict, out: Path) -> None:
    """`windows_<device>.json`, a markdown table beside it and the cost–agreement curve as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = "windows_" + result["device"].split("/")[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    batches = [b["batch"] for b in result["rows"][0]["batches"]]
    lines = [
        f"# Encoder window vs. cost and agreement ({result['device']}, {result['clips']} clips, "
        f"mean {result['clip_s_mean']} s)",
        "",
        "| window s (0 = unpadded) | transcript agreement with 30 s | voice label agreement | "
        + " | ".join(f"ms/utt at batch {b} (mel)" for b in batches)
        + " |",
        "|---|---|---|" + "---|" * len(batches),
    ]
    for row in result["rows"]:
        cells = [f"{b['ms_per_utterance']:.1f} ({b['mel_ms_per_utterance']:.1f})" for b in row["batches"]]
        lines.append(
            f"| {row['window_s']:g} | {row['transcript_agreement']:.3f} | {row['voice_label_agreement']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        f"Where the time goes at batch {batches[0]} (the timed batches repeat the first clips): encoder pass and "
        "greedy decoding (ms per utterance), and the decoder's cost per generated token.",
        "",
        "| window s | encode ms | decode ms | tokens | decode ms per token |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        b = row["batches"][0]
        if "encode_ms_per_utterance" in b:
            tokens = b["tokens_per_utterance"]  # of the kept text: a transcript the guard dropped counts 1
            per_token = f"{b['decode_ms_per_utterance'] / tokens:.1f}" if tokens > 1 else "– (transcript dropped)"
            lines.append(
                f"| {row['window_s']:g} | {b['encode_ms_per_utterance']:.1f} | {b['decode_ms_per_utterance']:.1f} | "
                f"{tokens:.1f} | {per_token} |"
            )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, batch in enumerate(batches):
        cost = [row["batches"][k]["ms_per_utterance"] for row in result["rows"]]
        ax.plot(cost, [row["transcript_agreement"] for row in result["rows"]], "o-", label=f"batch {batch}")
        for row, c in zip(result["rows"], cost, strict=True):
            ax.annotate(f"{row['window_s']:g}s", (c, row["transcript_agreement"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("ms per utterance (log)")
    ax.set_ylabel("transcript agreement with the 30 s window")
    ax.set_title(f"Encoder window: cost vs. agreement ({result['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=float, nargs="+", default=[0, 5, 10, 20, 30])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    add_clip_arguments(parser)
    parser.add_argument("--out", default="docs/bench")
    args = parser.parse_args()
    if NATIVE_S not in args.windows:
        parser.error("--windows must include 30 (the reference)")
    clips = bench_clips(args)
    result = measure(args, clips)
    print(json.dumps(result, indent=2))
    write_outputs(result, Path(args.out))


if __name__ == "__main__":
    main()
