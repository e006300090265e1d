"""CPU per utterance: our single-encoder-pass chain vs. ASR alone vs. a naive pipeline, in the same run.

naive = faster-whisper `transcribe` (its own Silero VAD, default beam search and temperature fallback),
then a separate emotion pass that encodes the audio again (padded to 30 s, as Whisper expects, or the voice
branch's own pass when the voice head reads one) for the voice head, then the text head. Ours = one encoder pass
(10 s window) shared by transcript and voice emotion, plus the voice branch's own unpadded pass of the first
encoder layers when the voice head reads one (`streamer.voice_encoder`).
Clips: UEM held-out speakers (or espeak-ng sentences when the data is absent).

    .venv/bin/python -m pipelines.bench.naive [--clips 30] [--json OUT]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from pipelines.bench.live import SENTENCES, report, uem_clips
from streamer.demo import speak
from streamer.frames import SAMPLE_RATE, Utterance
from streamer.pipeline import Engine
from streamer.recogniser import Recogniser, RecogniserOptions
from streamer.segmenter import speech_seconds


def cpu_per_utterance(chains: dict[str, Callable[[Utterance], None]], utterances: list[Utterance], passes: int = 2):
    """CPU seconds per utterance of each chain. The chains take turns on every utterance, so a change in the
    machine's speed during the run (a shared VM) hits them alike and their ratios hold."""
    for fn in chains.values():
        fn(utterances[0])  # warm-up
    spent = dict.fromkeys(chains, 0.0)
    for _ in range(passes):
        for u in utterances:
            for name, fn in chains.items():
                t0 = time.process_time()
                fn(u)
                spent[name] += time.process_time() - t0
    return {name: cpu / (passes * len(utterances)) for name, cpu in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=30)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    try:
        clips = uem_clips(args.clips)
        corpus = "UEM test1+test2"
    except FileNotFoundError:
        clips, corpus = [speak(s) for s in SENTENCES], "espeak-ng"
    engine = Engine()
    whisper = engine.recogniser._whisper
    padded = Recogniser(RecogniserOptions(encoder_window_s=30.0))
    utterances = [Utterance.whole(c, "bench", speech_seconds(c)) for c in clips]

    def ours(u: Utterance) -> None:
        engine.process(u, 0)

    def asr_only(u: Utterance) -> None:
        engine.recogniser.recognise(u)

    def naive(u: Utterance) -> None:
        segments, _ = whisper.transcribe(u.audio, language="es", vad_filter=True)
        text = " ".join(s.text for s in segments).strip()
        voice = engine.classifier.voice
        # the second, separate encoder pass: Whisper's own (padded to 30 s), or the one the voice head was trained on
        frames = padded._encode(u.audio)[1] if voice.encoder is None else voice.encoder.frames(u.audio)
        engine.classifier.classify_voice(frames)
        if text:
            engine.classifier.classify_text([text])

    result = {
        "corpus": corpus,
        "clips": len(clips),
        "mean_clip_s": round(float(np.mean([len(c) for c in clips])) / SAMPLE_RATE, 2),
    }
    for name, cpu in cpu_per_utterance({"ours": ours, "asr_only": asr_only, "naive": naive}, utterances).items():
        result[f"cpu_s_per_utterance_{name}"] = round(cpu, 4)
    result["emotion_cpu_over_asr"] = round(
        result["cpu_s_per_utterance_ours"] / result["cpu_s_per_utterance_asr_only"] - 1, 3
    )
    result["naive_over_ours"] = round(result["cpu_s_per_utterance_naive"] / result["cpu_s_per_utterance_ours"], 2)
    report(result, args.json)


if __name__ == "__main__":
    main()
