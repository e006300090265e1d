"""Voice-activity segmentation: WebRTC VAD gates each 32 ms window, Silero confirms it.

WebRTC alone fires on noise; Silero alone is slower and misses nothing WebRTC would catch, so a window
counts as speech only when both agree. An utterance opens after `start_windows` speech windows among the
last `start_window_span`, closes after `hangover_ms` of non-speech, keeps `pre_roll_ms` of audio before its
first speech window, and is split at the quietest point when it reaches `max_utterance_s`.

Recognition starts speculatively after one window of silence (`speculate_ms`), on the audio up to the last
speech window plus `tail_ms`; if the silence lasts the whole hangover, that guess is the final result, so the
event goes out as soon as the hangover confirms the silence instead of a recognition time later. When that
guess ends a sentence, the pipeline may close the utterance after only `sentence_end_ms` of silence
(`end_sentence`): semantic endpointing.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from streamer.frames import SAMPLE_RATE, AudioChunk, Utterance
from streamer.models import silero_path

WINDOW = 512  # samples per decision (32 ms): Silero's window
WEBRTC_FRAME = 480  # 30 ms: the longest frame WebRTC accepts, taken from the start of each window
CONTEXT = 64  # Silero v6 looks at the 64 samples before each window


@dataclass
class SegmenterOptions:
    webrtc_mode: int = 2  # 0 (permissive) … 3 (strict)
    silero_threshold: float = 0.5
    start_windows: int = 3
    start_window_span: int = 5
    hangover_ms: int = 320
    # After this much silence a tentative utterance is handed on, so recognition overlaps the rest of the
    # hangover; it is used if the silence lasts and thrown away if speech resumes. 0 = off. It is never shorter
    # than `tail_ms`, so the tentative audio is the final audio. One window (32 ms) instead of three: one live
    # stream p50 403 vs 471 ms on UEM speech (one run each), for ≈ 1 more wasted guess per utterance.
    speculate_ms: int = 32
    # Semantic endpointing: when the speculative transcript ends a sentence (".", "?", "!"; not "..."), a live
    # stream's utterance closes after this much silence instead of the whole hangover. 0 = off. On 400 UEM
    # sentences (`pipelines.bench.endpointing`, docs/bench/endpointing.md) Whisper ends 95 % of true ends with a
    # sentence mark; 192 ms adds 0.06 cuts inside a sentence per sentence (a plain 192 ms hangover 0.12, and
    # 96 ms 0.15). The event goes out then, or when the guess is ready if that is later (≈ 300 ms on a 2-core CPU).
    sentence_end_ms: int = 192
    pre_roll_ms: int = 250
    # Audio kept after the last speech window (which itself ends ≈ 50 ms after the true end of speech).
    tail_ms: int = 32
    # The voice head pools the encoder frames up to this long after the last speech window, as in the whole
    # clips it was trained on; beyond `tail_ms` they are frames of the encoder's silence padding (`Utterance.pad_s`).
    # Measured on UEM's held-out speakers: voice macro-F1 0.816 with a 32 ms tail padded to 100 ms, 0.782
    # unpadded, 0.811 with 100 ms of real audio; transcripts differ from the 100 ms tail's in 1.6 % of words.
    voice_tail_ms: int = 100
    min_speech_ms: int = 250
    min_utterance_ms: int = 400
    max_utterance_s: float = 15.0
    # While someone speaks, every this many seconds the speech so far goes out as an interim utterance
    # (voice-only emotion, when the model is idle), so a long angry sentence is seen before it ends. 0 = off
    # (the default: consumers then get exactly one event per utterance); 1.0 is a good value.
    interim_s: float = 0.0


class SileroStream:
    """Silero v6 (ONNX, shipped in faster-whisper) run window by window with its recurrent state kept."""

    def __init__(self) -> None:
        import onnxruntime

        so = onnxruntime.SessionOptions()
        so.inter_op_num_threads = so.intra_op_num_threads = 1
        so.log_severity_level = 4
        self._session = onnxruntime.InferenceSession(
            str(silero_path()), providers=["CPUExecutionProvider"], sess_options=so
        )
        self.reset()

    def reset(self) -> None:
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """Speech probability for each row of `windows` ([n, 512])."""
        joined = np.concatenate([self._context, windows.reshape(-1)])
        rows = np.stack([joined[i * WINDOW : i * WINDOW + WINDOW + CONTEXT] for i in range(len(windows))]).astype(
            np.float32
        )
        out, self._h, self._c = self._session.run(None, {"input": rows, "h": self._h, "c": self._c})
        self._context = joined[-CONTEXT:].copy()
        return np.asarray(out).reshape(-1)


@dataclass
class _Open:
    """The utterance being collected: one entry per 32 ms window."""

    start: int  # stream sample index of the first kept sample
    windows: list[np.ndarray] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    speech: list[bool] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    speech_end: int = 0  # number of windows up to and including the last speech window

    def add(self, window: np.ndarray, prob: float, speech: bool, arrived: float) -> None:
        self.windows.append(window)
        self.probs.append(prob)
        self.speech.append(speech)
        self.arrived.append(arrived)
        if speech:
            self.speech_end = len(self.windows)

    def tail_from(self, cut: int) -> _Open:
        rest = _Open(start=self.start + cut * WINDOW)
        for entry in zip(self.windows[cut:], self.probs[cut:], self.speech[cut:], self.arrived[cut:], strict=True):
            rest.add(*entry)
        return rest


class Segmenter:
    """Feed `AudioChunk`s of one stream, get `Utterance`s. Not thread-safe; one per stream."""

    def __init__(
        self,
        stream: str,
        opts: SegmenterOptions | None = None,
        source: str = "",
        wall_start: float | None = None,
    ) -> None:
        import webrtcvad

        self.stream, self.source = stream, source
        self.opts = opts or SegmenterOptions()
        self._webrtc = webrtcvad.Vad(self.opts.webrtc_mode)
        self._silero = SileroStream()
        self._pending = np.zeros(0, dtype=np.float32)
        self._consumed = 0  # samples of the stream turned into windows
        self._recent: collections.deque[tuple[np.ndarray, float, bool, float]] = collections.deque(
            maxlen=max(1, self.opts.pre_roll_ms * SAMPLE_RATE // 1000 // WINDOW)
        )
        self._votes: collections.deque[bool] = collections.deque(maxlen=self.opts.start_window_span)
        self._open: _Open | None = None
        self._interims = 0  # interim utterances sent for the open one
        self._silence = 0
        self._next_id = 0
        self.wall_start = time.time() if wall_start is None else wall_start

    def _windows_ms(self, ms: int) -> int:
        return max(1, round(ms * SAMPLE_RATE / 1000 / WINDOW))

    def push(self, chunk: AudioChunk) -> list[Utterance]:
        data = np.concatenate([self._pending, chunk.samples]) if len(self._pending) else chunk.samples
        n = len(data) // WINDOW
        self._pending = data[n * WINDOW :].copy()
        if n == 0:
            return []
        windows = data[: n * WINDOW].reshape(n, WINDOW)
        out = []
        for window, prob, speech in zip(windows, *self.judge(windows), strict=True):
            utterance = self._step(window, prob, speech, chunk.arrived)
            if utterance:
                out.append(utterance)
        return out

    def judge(self, windows: np.ndarray) -> tuple[list[float], list[bool]]:
        """Silero probability and the joint WebRTC+Silero speech decision for each 512-sample window."""
        probs = self._silero(windows)
        pcm = (np.clip(windows[:, :WEBRTC_FRAME], -1, 1) * 32767).astype("<i2")
        speech = [
            bool(p >= self.opts.silero_threshold and self._webrtc.is_speech(f.tobytes(), SAMPLE_RATE))
            for p, f in zip(probs, pcm, strict=True)
        ]
        return [float(p) for p in probs], speech

    def spoke_after(self, guess: Utterance) -> bool:
        """Whether speech went on after the tentative `guess` was cut, so it can no longer become the final."""
        opened = self._open
        if opened is None or guess.segment_id != self._next_id:
            return False
        # end_s is rounded to the millisecond; a later speech window moves the end by a whole window
        return opened.start + opened.speech_end * WINDOW - guess.end_s * SAMPLE_RATE > WINDOW / 2

    def end_sentence(self, guess: Utterance) -> Utterance | None:
        """The final utterance for `guess`, closed now, when the silence since it has lasted `sentence_end_ms`
        (the caller knows the guess's transcript ends a sentence); None while it has not, or when speech went on."""
        opened = self._open
        if (
            opened is None
            or not self.opts.sentence_end_ms
            or self._silence < self._windows_ms(self.opts.sentence_end_ms)
            or guess.segment_id != self._next_id
            or self.spoke_after(guess)
        ):
            return None
        return self._finish()

    def flush(self) -> list[Utterance]:
        """End of stream: close the open utterance, if any."""
        if self._open is None:
            return []
        utterance = self._finish()
        return [utterance] if utterance else []

    def _finish(self) -> Utterance | None:
        """Close the open utterance for good: the final cut, up to its last speech window plus the tail."""
        assert self._open is not None
        utterance = self._close(self._open.speech_end)
        self._open = None
        return utterance

    def _step(self, window: np.ndarray, prob: float, speech: bool, arrived: float) -> Utterance | None:
        index = self._consumed
        self._consumed += WINDOW
        opts = self.opts
        if self._open is None:
            self._votes.append(speech)
            self._recent.append((window, prob, speech, arrived))
            if sum(self._votes) >= opts.start_windows:
                self._open = _Open(start=index + WINDOW - len(self._recent) * WINDOW)
                for entry in self._recent:
                    self._open.add(*entry)
                self._recent.clear()
                self._votes.clear()
                self._silence = self._interims = 0
            return None
        self._open.add(window, prob, speech, arrived)
        self._silence = 0 if speech else self._silence + 1
        if opts.speculate_ms and self._silence == self._speculate_windows() < self._windows_ms(opts.hangover_ms):
            return self._close(self._open.speech_end, tentative=True)
        if self._silence >= self._windows_ms(opts.hangover_ms):
            return self._finish()
        if len(self._open.windows) * WINDOW >= opts.max_utterance_s * SAMPLE_RATE:
            return self._split()
        if (
            speech
            and opts.interim_s
            and len(self._open.windows) * WINDOW >= (self._interims + 1) * (opts.interim_s * SAMPLE_RATE)
        ):
            self._interims += 1
            return self._close(self._open.speech_end, tail=False, tentative=True, interim=True)
        return None

    def _split(self) -> Utterance | None:
        """Cut a too-long utterance after its least speech-like window in the last third; keep the rest open."""
        assert self._open is not None
        probs = self._open.probs
        lo = 2 * len(probs) // 3
        cut = lo + int(np.argmin(probs[lo:])) + 1
        rest = self._open.tail_from(cut)
        utterance = self._close(cut, tail=False)
        self._open = rest if rest.windows else None
        self._interims = 0
        return utterance

    def _speculate_windows(self) -> int:
        """Silence after which a tentative utterance goes out: at least the tail, so its audio is final."""
        return max(self._windows_ms(self.opts.speculate_ms), self._windows_ms(self.opts.tail_ms))

    def _close(
        self, end_window: int, tail: bool = True, tentative: bool = False, interim: bool = False
    ) -> Utterance | None:
        """Emit windows [0, end_window) plus the tail; None when too short to be speech.

        A tentative utterance keeps the utterance open and its id unused: if the silence lasts, the final one
        that follows is identical; if speech resumes, it is superseded. An interim one is tentative too."""
        assert self._open is not None
        opened = self._open
        speech_ms = sum(opened.speech[:end_window]) * WINDOW * 1000 / SAMPLE_RATE
        keep = min(len(opened.windows), end_window + (self._windows_ms(self.opts.tail_ms) if tail else 0))
        pad_ms = self.opts.voice_tail_ms - (keep - end_window) * WINDOW * 1000 / SAMPLE_RATE if tail else 0.0
        if (
            end_window == 0
            or speech_ms < self.opts.min_speech_ms
            or keep * WINDOW * 1000 / SAMPLE_RATE < self.opts.min_utterance_ms
        ):
            return None
        start_s = opened.start / SAMPLE_RATE
        end_s = start_s + end_window * WINDOW / SAMPLE_RATE
        utterance = Utterance(
            stream=self.stream,
            segment_id=self._next_id,
            audio=np.concatenate(opened.windows[:keep]),
            start_s=round(start_s, 3),
            end_s=round(end_s, 3),
            speech_end_arrived=opened.arrived[end_window - 1],
            emitted=time.monotonic(),
            wall_end=self.wall_start + end_s,
            speech_s=speech_ms / 1000,
            pad_s=max(0.0, pad_ms) / 1000,
            source=self.source,
            tentative=tentative,
            interim=interim,
        )
        self._next_id += not tentative
        return utterance


_JUDGES: dict[tuple, Segmenter] = {}


def _judge(opts: SegmenterOptions | None) -> Segmenter:
    """One VAD per option set, reused across clips (loading Silero per clip would dominate short clips)."""
    opts = opts or SegmenterOptions()
    key = dataclasses.astuple(opts)
    if key not in _JUDGES:
        _JUDGES[key] = Segmenter("measure", opts)
    return _JUDGES[key]


def speech_seconds(audio: np.ndarray, opts: SegmenterOptions | None = None) -> float:
    """How much of `audio` the VAD judges speech (used when a whole file is one utterance)."""
    n = len(audio) // WINDOW
    if n == 0:
        return 0.0
    judge = _judge(opts)
    judge._silero.reset()  # each clip on its own
    _, speech = judge.judge(audio[: n * WINDOW].reshape(n, WINDOW))
    return sum(speech) * WINDOW / SAMPLE_RATE
