"""Semantic endpointing: does Whisper's speculative transcript end a sentence at true ends only?

Each clip (one recorded sentence) is played through the real segmenter with an endless hangover, so every pause
gets the speculative guess the live pipeline would make after one window of silence; the real recogniser
transcribes each guess. A pause inside the clip that the rule would close is an extra cut (a sentence split in
two); the pause after the clip is its true end. For each silence threshold this compares a plain hangover of
that length (every pause that long is cut) with semantic endpointing (only those whose guess ends with . ? !),
and writes JSON and a markdown table.

    .venv/bin/python -m pipelines.bench.endpointing [--uem N] [--espeak] [--out docs/bench]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from pipelines.bench.live import SENTENCES
from pipelines.data.corpora import read_uem
from streamer.audio import load_audio
from streamer.demo import speak
from streamer.frames import SAMPLE_RATE, AudioChunk
from streamer.recogniser import Recogniser, RecogniserOptions
from streamer.segmenter import WINDOW, Segmenter, SegmenterOptions

# espeak-ng's long comma pauses (200–300 ms) make it the hard case for endpointing
COMMA_SENTENCES = (
    "Mire, le llamo porque, la verdad, estoy bastante cansado de esperar.",
    "Ayer fui a la tienda, compré pan, leche y huevos, y luego volví a casa.",
    "Si me lo hubiera dicho antes, no habría pasado nada, pero ahora es tarde.",
    "Bueno, pues nada, quería saber si ya tienen mi pedido, que lo hice el lunes.",
    "Oiga, perdone, es que no me llega la factura, y ya van tres meses.",
    "Cuando llegué, la puerta estaba abierta, las luces encendidas, y nadie en casa.",
)
HANGOVER_MS = SegmenterOptions().hangover_ms  # pauses this long are cut with or without the rule
HANGOVER_WINDOWS = round(HANGOVER_MS * SAMPLE_RATE / 1000 / WINDOW)


def pause_guesses(clip: np.ndarray, recogniser: Recogniser) -> list[dict]:
    """One row per pause the segmenter speculates on: its silence in windows, whether it is the clip's end, and
    whether the guess's transcript ends a sentence."""
    opts = SegmenterOptions(hangover_ms=60_000, speculate_ms=32)
    audio = np.concatenate([np.zeros(SAMPLE_RATE * 3 // 10, np.float32), clip, np.zeros(SAMPLE_RATE, np.float32)])
    n = len(audio) // WINDOW
    windows = audio[: n * WINDOW].reshape(n, WINDOW)
    _, speech = Segmenter("judge", opts).judge(windows)
    cutter = Segmenter("pauses", opts)
    guesses = [u for window in windows for u in cutter.push(AudioChunk(window, 0.0)) if u.tentative]
    rows = []
    for guess, transcript in zip(guesses, recogniser.recognise_batch([(g, True) for g in guesses]), strict=True):
        first = round(guess.end_s * SAMPLE_RATE / WINDOW)
        silence = next((k for k in range(first, n) if speech[k]), n) - first
        rows.append({"silence_windows": silence, "end": first + silence == n, "text": transcript.text,
                     "ends_sentence": transcript.ends_sentence})  # fmt: skip
    return rows


def summarise(clips: list[list[dict]]) -> dict:
    """Extra cuts per sentence by threshold, plain hangover vs. semantic rule, and the rule's hit rate at ends."""
    inner = [row for rows in clips for row in rows if not row["end"]]
    ends = [row for rows in clips for row in rows if row["end"]]
    baseline = sum(row["silence_windows"] >= HANGOVER_WINDOWS for row in inner)
    table = []
    for t in range(2, HANGOVER_WINDOWS):
        pauses = [row for row in inner if t <= row["silence_windows"] < HANGOVER_WINDOWS]
        table.append({
            "threshold_ms": t * WINDOW * 1000 // SAMPLE_RATE,
            "extra_cuts_per_sentence_plain": round((baseline + len(pauses)) / len(clips), 3),
            "extra_cuts_per_sentence_semantic": round(
                (baseline + sum(row["ends_sentence"] for row in pauses)) / len(clips), 3
            ),
        })  # fmt: skip
    return {
        "sentences": len(clips),
        "ends_closed_early": round(sum(row["ends_sentence"] for row in ends) / max(1, len(ends)), 3),
        "hangover_ms": HANGOVER_MS,
        "extra_cuts_per_sentence_hangover": round(baseline / len(clips), 3),
        "thresholds": table,
    }


def markdown(results: dict[str, dict]) -> str:
    lines = [
        "# Semantic endpointing: extra cuts inside sentences against the silence that closes an utterance",
        "",
        "An extra cut splits one recorded sentence in two. *Plain*: a hangover of that length. *Semantic*: the",
        f"{HANGOVER_MS} ms hangover, or that much silence when the speculative transcript ends with . ? !"
        " (`sentence_end_ms`).",
        "",
    ]
    for corpus, summary in results.items():
        lines += [
            f"**{corpus}**: {summary['sentences']} sentences; at their true ends {summary['ends_closed_early']:.0%} of"
            f" the guesses end a sentence; a {summary['hangover_ms']} ms hangover makes"
            f" {summary['extra_cuts_per_sentence_hangover']}"
            " extra cuts per sentence.",
            "",
            "| silence ms | extra cuts per sentence, plain | semantic |",
            "|---|---|---|",
            *(
                f"| {row['threshold_ms']} | {row['extra_cuts_per_sentence_plain']} |"
                f" {row['extra_cuts_per_sentence_semantic']} |"
                for row in summary["thresholds"]
            ),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uem", type=int, default=400, help="UEM clips, drawn from every speaker (0 = none)")
    parser.add_argument("--espeak", action="store_true", help="also espeak-ng sentences, with and without commas")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/bench")
    args = parser.parse_args()
    recogniser = Recogniser(RecogniserOptions(workers=1))
    corpora: dict[str, list[np.ndarray]] = {}
    if args.uem:
        records = read_uem().records
        random.Random(args.seed).shuffle(records)
        corpora["UEM (acted Spanish)"] = [load_audio(r.path) for r in records[: args.uem]]
    if args.espeak:
        corpora["espeak-ng"] = [speak(s) for s in (*SENTENCES, *COMMA_SENTENCES)]
    results = {name: summarise([pause_guesses(c, recogniser) for c in clips]) for name, clips in corpora.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "endpointing.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out / "endpointing.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
