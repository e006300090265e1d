"""Whisper via CTranslate2: one encoder pass per utterance serves the transcript and the voice emotion.

We call the CTranslate2 model directly (not `WhisperModel.transcribe`) because `transcribe` runs its own
encoder pass that we could not share, pads every input to 30 s, and falls back to higher temperatures
(which once turned 1 s of audio into 14 s of CPU time).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streamer.frames import SAMPLE_RATE, Transcript, Utterance
from streamer.models import WHISPER_BASE_ID, ModelFileError, whisper_base_dir

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = 320  # one encoder output frame = 20 ms
MAX_WINDOW_S = 30.0


@dataclass
class RecogniserOptions:
    """Whisper settings. `model: base` is the bundled multilingual base; any faster-whisper model
    name already in the local cache, or a CTranslate2 model directory, can be used instead."""

    model: str = "base"
    device: str = "auto"  # auto | cpu | cuda
    compute_type: str = "auto"  # auto → float16 on CUDA, int8 on CPU
    cpu_threads: int = 2
    # Model replicas that run batches side by side, sharing `cpu_threads` on a CPU. None: one per CPU thread on
    # a CPU (many streams: two 1-thread replicas beat one 2-thread one, 16 calls p95 0.84 vs 1.03 s measured here),
    # 1 on a GPU; `run` (one stream) takes one replica with every thread (`for_one_stream`).
    workers: int | None = None
    language: str | None = "auto"  # auto (or None): Whisper detects it per utterance; or a code such as es
    beam_size: int = 1
    # The encoder input is padded with silence to at least this many seconds. Whisper was trained on
    # 30 s windows; 10 s keeps 98 % transcript agreement with 30 s at a quarter of the encoder cost.
    encoder_window_s: float = 10.0
    no_speech_threshold: float = 0.6
    log_prob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4
    max_chars_per_speech_second: float = 30.0
    max_tokens_per_second: float = 12.0


def language_code(value: str | None) -> str | None:
    """The Whisper language code `value` names, or None for detection (`auto`, null). A misspelt language would
    fail every utterance, so it is refused up front, with the valid codes."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    if value is None or value == "auto":
        return None
    if value not in _LANGUAGE_CODES:
        raise ValueError(f"unknown language {value!r}: use auto or a Whisper code: {', '.join(_LANGUAGE_CODES)}")
    return value


def for_one_stream(opts: RecogniserOptions) -> RecogniserOptions:
    """The options for a single live stream: unless `workers` is set, one replica with every thread, which
    recognises each utterance sooner (encoding ≈ 90 ms with 2 threads against ≈ 128 ms with one, here) while nothing
    else waits."""
    return opts if opts.workers is not None else dataclasses.replace(opts, workers=1)


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def guard(text: str, no_speech_prob: float, avg_logprob: float, speech_s: float, opts: RecogniserOptions) -> str | None:
    """Why a transcript should be dropped as hallucinated, or None to keep it.

    Checks: the VAD heard speech at all, Whisper's own no-speech rule, repetition (compression ratio),
    and agreement with the VAD (more text than the detected speech can hold).
    """
    if not text:
        return "empty"
    if speech_s < 0.1:
        return "no_vad_speech"
    if no_speech_prob > opts.no_speech_threshold and avg_logprob < opts.log_prob_threshold:
        return "no_speech"
    if compression_ratio(text) > opts.compression_ratio_threshold:
        return "repetition"
    if len(text) > opts.max_chars_per_speech_second * max(speech_s, 0.5):
        return "longer_than_speech"
    return None


def _pieces(utterance: Utterance) -> list[tuple[np.ndarray, int]]:
    """The ≤30 s pieces the encoder takes, each with the samples its pooled frames cover: the audio, and for the
    last piece also `pad_s` of the silence padding that follows it."""
    step = int(MAX_WINDOW_S * SAMPLE_RATE)
    audio = utterance.audio
    starts = range(0, max(len(audio), 1), step)
    pad = round(utterance.pad_s * SAMPLE_RATE)
    return [(audio[o : o + step], len(audio[o : o + step]) + pad * (o == starts[-1])) for o in starts]


def log_mel(extractor, audio: np.ndarray, n: int) -> np.ndarray:
    """Whisper's log-mel input for `audio` zero-padded (or cut) to `n` samples: [mels, n / 160], contiguous, as
    CTranslate2's `encode` takes it (`extractor`: faster-whisper's `FeatureExtractor`)."""
    padded = np.zeros(n, dtype=np.float32)
    padded[: len(audio)] = audio[:n]
    return np.ascontiguousarray(extractor(padded)[:, : n // 160])


class Recogniser:
    """Loads Whisper once; `recognise` turns an utterance into a `Transcript` with its encoder frames."""

    def __init__(self, opts: RecogniserOptions | None = None) -> None:
        import ctranslate2
        import threadpoolctl
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        # numpy's OpenBLAS threads spin on after every small product (the log-mel filters, the heads) and take the
        # cores CTranslate2's threads need: measured here, encoding 137 → 128 ms with one thread, 127 → 90 ms with two.
        threadpoolctl.threadpool_limits(1, user_api="blas")

        self.opts = opts or RecogniserOptions()
        self.language = language_code(self.opts.language)
        device = self.opts.device
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        compute_type = self.opts.compute_type
        if compute_type == "auto":
            compute_type = "float16" if device == "cuda" else "int8"
        if self.opts.model == "base":
            path, self.model_id = str(whisper_base_dir()), WHISPER_BASE_ID
        else:
            path = self.model_id = self.opts.model
        self.device, self.compute_type = device, compute_type
        self.workers = max(1, self.opts.workers or (self.opts.cpu_threads if device == "cpu" else 1))
        try:
            self._whisper = WhisperModel(
                path,
                device=device,
                compute_type=compute_type,
                cpu_threads=max(1, self.opts.cpu_threads // self.workers),
                num_workers=self.workers,
                local_files_only=True,
            )
        except (OSError, ValueError) as e:  # nothing is ever downloaded: say what to do instead
            raise ModelFileError(
                f"Whisper model {path!r} is neither a CTranslate2 model directory nor in the local cache "
                f"(nothing is downloaded at run time; use `base` or a local path): {e}"
            ) from e
        self._storage = ctranslate2.StorageView
        self._cpu = ctranslate2.Device.cpu
        self._tokenizer_cls = Tokenizer
        self._tokenizers: dict[str, Tokenizer] = {}
        log.info("Whisper %s on %s/%s", self.model_id, device, compute_type)
        if device == "cuda":  # the first GPU call initialises CUDA and cuDNN: 19 s measured on an H100
            self.recognise(Utterance.whole(np.zeros(SAMPLE_RATE, np.float32), "warm-up", 0.0))

    def _tokenizer(self, language: str):
        if language not in self._tokenizers:
            self._tokenizers[language] = self._tokenizer_cls(
                self._whisper.hf_tokenizer,
                self._whisper.model.is_multilingual,
                task="transcribe",
                language=language,
            )
        return self._tokenizers[language]

    def _window(self, n_samples: int) -> int:
        """Samples the encoder sees for a ≤30 s piece: padded to the configured window, whole frames."""
        n = max(round(self.opts.encoder_window_s * SAMPLE_RATE), n_samples)
        return min(int(MAX_WINDOW_S * SAMPLE_RATE), math.ceil(n / SAMPLES_PER_FRAME) * SAMPLES_PER_FRAME)

    def _encode(self, audio: np.ndarray):
        """Encode one ≤30 s piece as `recognise` does; returns (storage, frames covering the audio)."""
        encoded, frames = self._encode_batch([audio], self._window(len(audio)))
        return encoded, frames[0, : max(1, math.ceil(len(audio) / SAMPLES_PER_FRAME))]

    def _encode_batch(self, pieces: list[np.ndarray], n: int):
        """One encoder call for pieces in a window of `n` samples; returns (storage [B, T, 512], frames as numpy)."""
        mels = [log_mel(self._whisper.feature_extractor, audio, n) for audio in pieces]
        # On a GPU the encoder output stays there for decoding, and only a copy (float16) comes back for the
        # voice head; selecting rows of that copy keeps its dtype, which the model expects.
        on_gpu = self.device == "cuda"
        encoded = self._whisper.model.encode(
            self._storage.from_array(np.ascontiguousarray(np.stack(mels))), to_cpu=not on_gpu
        )
        return encoded, np.array(encoded.to_device(self._cpu) if on_gpu else encoded)

    def _languages(self, encoded, count: int) -> list[tuple[str, float]]:
        if self.language:
            return [(self.language, 1.0)] * count
        return [(best[0][0][2:-2], float(best[0][1])) for best in self._whisper.model.detect_language(encoded)]

    def _decode(self, encoded, languages: list[str], n_samples: list[int]) -> list[tuple[str, float, float]]:
        """Greedy decoding at temperature 0 with a length cap, one batch; (text, avg log-prob, no-speech prob) each."""
        tokenizers = [self._tokenizer(language) for language in languages]
        longest = max(n_samples) / SAMPLE_RATE
        results = self._whisper.model.generate(
            encoded,
            [[*t.sot_sequence, t.no_timestamps] for t in tokenizers],
            beam_size=self.opts.beam_size,
            max_length=min(int(10 + self.opts.max_tokens_per_second * longest), 440),
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=[-1],
        )
        decoded = []
        for tokenizer, result in zip(tokenizers, results, strict=True):
            ids = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
            # CTranslate2 scores are length-normalised; undo that the way faster-whisper does
            avg_logprob = result.scores[0] * len(ids) / (len(ids) + 1)
            decoded.append((tokenizer.decode(ids).strip(), avg_logprob, result.no_speech_prob))
        return decoded

    def recognise(self, utterance: Utterance, decode: bool = True) -> Transcript:
        """Encode once; decode text unless `decode` is False (voice-only, when shedding load)."""
        return self.recognise_batch([(utterance, decode)])[0]

    def recognise_batch(
        self, items: list[tuple[Utterance, bool]], wanted: Callable[[int], bool] = lambda i: True
    ) -> list[Transcript]:
        """Recognise several utterances (of any streams) with one encoder and one decoder call per window size.

        CTranslate2 runs a batch in about the time of its longest member on a GPU, and faster than one by one
        on a CPU; the times in each `Transcript` are those of the batch its utterance was part of. `wanted(i)` is
        asked once item i is encoded: a guess that speech overtook meanwhile is not decoded (`rejected:
        "superseded"`), which frees the worker sooner.
        """
        pieces = [
            (i, k, audio, pooled) for i, (u, _) in enumerate(items) for k, (audio, pooled) in enumerate(_pieces(u))
        ]
        groups: dict[int, list[tuple[int, int, np.ndarray, int]]] = {}
        for piece in pieces:
            groups.setdefault(self._window(piece[3]), []).append(piece)
        frames: dict[tuple[int, int], np.ndarray] = {}
        decoded: dict[tuple[int, int], tuple[str, float, float]] = {}
        language = [(self.language or "", 1.0)] * len(items)
        encode_s, decode_s = [0.0] * len(items), [0.0] * len(items)
        skipped: list[str | None] = [None if decode else "overload" for _, decode in items]
        for window, group in sorted(groups.items(), reverse=True):  # longest window first: a long utterance's first
            # piece (30 s) detects the language its shorter tail is decoded in
            t0 = time.perf_counter()
            encoded, encoded_np = self._encode_batch([audio for _, _, audio, _ in group], window)
            t1 = time.perf_counter()
            for row, (i, k, _, pooled) in enumerate(group):
                frames[i, k] = encoded_np[row, : max(1, math.ceil(pooled / SAMPLES_PER_FRAME))]
                encode_s[i] += t1 - t0
            for i in {i for i, _, _, _ in group}:
                if skipped[i] is None and not wanted(i):
                    skipped[i] = "superseded"
            rows = [row for row, (i, _, _, _) in enumerate(group) if skipped[i] is None]
            if not rows:
                continue
            kept = encoded if len(rows) == len(group) else self._storage.from_array(encoded_np[rows])
            found = self._languages(kept, len(rows))
            for row, guess in zip(rows, found, strict=True):
                i, k, _, _ = group[row]
                if k == 0:
                    language[i] = guess
            texts = self._decode(kept, [language[group[r][0]][0] for r in rows], [len(group[r][2]) for r in rows])
            t2 = time.perf_counter()
            for row, text in zip(rows, texts, strict=True):
                i, k, _, _ = group[row]
                decoded[i, k] = text
                decode_s[i] += t2 - t1
        return [
            self._transcript(
                utterance,
                skipped[i],
                [frames[key] for key in sorted(frames) if key[0] == i],
                [decoded[key] for key in sorted(decoded) if key[0] == i],
                language[i],
                encode_s[i],
                decode_s[i],
            )
            for i, (utterance, _) in enumerate(items)
        ]

    def _transcript(
        self,
        utterance: Utterance,
        skipped: str | None,
        frames: list[np.ndarray],
        pieces: list[tuple[str, float, float]],
        language: tuple[str, float],
        encode_s: float,
        decode_s: float,
    ) -> Transcript:
        """Join an utterance's pieces and apply the hallucination guard; `skipped` says why it was not decoded."""
        text = " ".join(t for t, _, _ in pieces if t)
        avg_logprob = float(np.mean([p[1] for p in pieces])) if pieces else 0.0
        no_speech_prob = float(np.mean([p[2] for p in pieces])) if pieces else 0.0
        rejected = skipped or guard(text, no_speech_prob, avg_logprob, utterance.speech_s, self.opts)
        if rejected:
            log.debug("stream %s segment %d: no transcript (%s)", utterance.stream, utterance.segment_id, rejected)
        return Transcript(
            text="" if rejected else text,
            language=language[0],
            language_probability=language[1],
            no_speech_prob=no_speech_prob,
            avg_logprob=avg_logprob,
            compression_ratio=compression_ratio(text),
            rejected=rejected,
            encoder_frames=np.concatenate(frames),
            encode_ms=encode_s * 1000,
            decode_ms=decode_s * 1000,
        )
