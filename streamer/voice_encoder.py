"""The voice head's own encoder pass: Whisper base's first layers on the unpadded utterance.

Recognition reads Whisper's last encoder layer, padded to a 10 s window. For emotion on speakers and rooms the heads
never met, the middle layers transfer better (leave-one-corpus-out, docs/models/cross_corpus.md), and CTranslate2
only returns the last layer of a model. So the voice branch runs a copy of Whisper base cut after its first
`layers` encoder layers (`streamer.ct2file.truncate_encoder`, built once into the cache from the bundled model and
checked by SHA-256: no weights are shipped), unpadded, which costs a few ms per utterance second. A head trained on
fine-tuned layers ships their low-rank delta (`VoiceEncoderOptions.delta`), merged into that copy once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.frames import SAMPLE_RATE
from streamer.recogniser import MAX_WINDOW_S, SAMPLES_PER_FRAME, log_mel

MAX_SAMPLES = int(MAX_WINDOW_S * SAMPLE_RATE)  # Whisper's positions cover 30 s


@dataclass(frozen=True)
class VoiceEncoderOptions:
    layers: int = 3
    delta: str | None = None  # a fine-tuned low-rank delta of those layers (`streamer.models.tuned_encoder_dir`)
    device: str = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = 1


class VoiceEncoder:
    """`frames(audio)` → the frames of encoder layer `layers` (after Whisper's final LayerNorm), one per 20 ms."""

    def __init__(self, opts: VoiceEncoderOptions | None = None) -> None:
        import ctranslate2
        from faster_whisper.feature_extractor import FeatureExtractor

        from streamer.models import sha256_of, tuned_encoder_dir, whisper_encoder_dir

        self.opts = opts or VoiceEncoderOptions()
        layers, delta = self.opts.layers, self.opts.delta
        self.model_id = f"whisper-base-encoder-layer{layers}-unpadded" + (
            f"-tuned-{sha256_of(Path(delta))[:12]}" if delta else ""
        )
        model_dir = tuned_encoder_dir(layers, Path(delta)) if delta else whisper_encoder_dir(layers)
        self._model = ctranslate2.models.Whisper(
            str(model_dir),
            device=self.opts.device,
            compute_type=self.opts.compute_type,
            intra_threads=self.opts.cpu_threads,
        )
        self._mel = FeatureExtractor()
        self._storage = ctranslate2.StorageView

    def frames(self, audio: np.ndarray) -> np.ndarray:
        """[max(1, ceil(len / 320)), 512] float32 frames; audio over 30 s (Whisper's positions) is encoded in 30 s
        pieces, as recognition does."""
        audio = np.asarray(audio, np.float32)
        pieces = [audio[o : o + MAX_SAMPLES] for o in range(0, max(len(audio), 1), MAX_SAMPLES)]
        return np.concatenate([self._piece(p) for p in pieces])

    def _piece(self, audio: np.ndarray) -> np.ndarray:
        mel = log_mel(self._mel, audio, max(1, math.ceil(len(audio) / SAMPLES_PER_FRAME)) * SAMPLES_PER_FRAME)
        out = self._model.encode(self._storage.from_array(mel[None]), to_cpu=True)
        return np.array(out)[0].astype(np.float32)
