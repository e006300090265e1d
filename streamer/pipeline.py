"""The asyncio wiring: source → segmenter → recogniser → classifier → sinks, one task pair per stream.

The models live in one `Engine` whose work runs on worker threads (one per model replica): CTranslate2 and the
heads release the GIL, so the event loop keeps reading audio while utterances are being recognised.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from streamer.adaptation import StreamHistories
from streamer.classifier import ClassifierOptions, EmotionClassifier
from streamer.frames import EmotionEvent, Latency, Transcript, Utterance
from streamer.metrics import HEALTH, STAGE_LATENCY
from streamer.publisher import Sink, StreamSink
from streamer.recogniser import Recogniser, RecogniserOptions
from streamer.segmenter import Segmenter, SegmenterOptions
from streamer.sources import FileSource, Source

log = logging.getLogger(__name__)


class Superseded(Exception):
    """A guess dropped after its encoder pass because speech went on: it was neither decoded nor classified."""


@dataclass
class _Job:
    utterance: Utterance
    seq: int
    decode: bool
    future: asyncio.Future[EmotionEvent]
    spare: bool  # a guess (speculation, interim): runs only on a spare worker, after every waiting final


class Engine:
    """Whisper + emotion heads, loaded once and shared by every stream.

    Utterances from all streams wait in one queue; whenever the worker thread is free it takes every waiting
    utterance, at most one per stream and `max_batch` in all, oldest first, and recognises them in one batch.
    A stream has at most one utterance waiting here (its own backlog stays in its `run_stream`), so a
    talkative stream cannot starve the others, and each stream's events stay in order. Guesses (speculative and
    interim utterances) go after every final, and are only sent while a worker is spare (`has_spare_worker`).
    """

    def __init__(
        self,
        recogniser: RecogniserOptions | None = None,
        classifier: ClassifierOptions | None = None,
        node: str = "local",
        max_batch: int | None = None,
        latency_budget_ms: float = 0.0,
    ) -> None:
        self.node = node
        self.latency_budget_s = latency_budget_ms / 1000
        self._decode_s = 0.0  # recent wall time of a batch that decoded (moving average)
        self.recogniser = Recogniser(recogniser)
        self.classifier = EmotionClassifier(classifier)
        self.histories = StreamHistories()  # each stream's past utterances, for the voice head's normalisation
        self.models = {"asr": self.recogniser.model_id, "emotion": self.classifier.model_id}
        # A batch's whole time is added to each member's latency: on a CPU two at a time already gives most of
        # the throughput gain (measured: 0.55 → 0.41 s per utterance; 8 at a time 0.35 s, but 2.8 s per batch).
        self.max_batch = max(1, max_batch or (16 if self.recogniser.device == "cuda" else 2))
        self._executor = ThreadPoolExecutor(max_workers=self.recogniser.workers, thread_name_prefix="engine")
        self._waiting: list[_Job] = []
        self._batchers: set[asyncio.Task] = set()  # one loop per model replica
        self._busy: set[str] = set()  # streams with a final in a running batch: their next final waits, in order
        self._running = 0  # batches being processed
        self.in_flight = 0
        self.batches = 0
        self.batched = 0  # utterances processed in batches; batched / batches = mean batch size
        self.superseded = 0  # guesses dropped after their encoder pass (speech went on)

    def process(self, utterance: Utterance, seq: int, decode: bool = True) -> EmotionEvent:
        """One utterance, synchronously (offline analysis and benchmarks)."""
        outcome = self.process_batch([(utterance, seq, decode)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def process_batch(
        self, items: list[tuple[Utterance, int, bool]], wanted: Callable[[int], bool] = lambda i: True
    ) -> list[EmotionEvent | Exception]:
        """Events for a batch; an utterance that breaks the batch is retried alone so only it fails. Items no
        longer `wanted` once encoded (superseded guesses) are neither decoded nor classified."""
        started = time.monotonic()
        try:
            transcripts = self.recogniser.recognise_batch([(u, decode) for u, _, decode in items], wanted)
        except Exception as e:
            if len(items) == 1:
                return [e]
            return [outcome for item in items for outcome in self.process_batch([item])]
        outcomes: list[EmotionEvent | Exception] = []
        for (utterance, seq, _), transcript in zip(items, transcripts, strict=True):
            if transcript.rejected == "superseded":
                self.superseded += 1
                outcomes.append(Superseded(f"stream {utterance.stream} segment {utterance.segment_id}"))
                continue
            try:
                outcomes.append(self._event(utterance, seq, transcript, started))
            except Exception as e:
                outcomes.append(e)
        return outcomes

    def remember(self, event: EmotionEvent) -> None:
        """A stream's final event: its frames and prosody now count in the stream's statistics (when the voice head
        uses them)."""
        if self.classifier.voice.adapts and event.final:
            self.histories.remember(event.stream, event.transcript.encoder_frames, event.prosody)

    def forget(self, stream: str) -> None:
        self.histories.forget(stream)

    def _event(self, utterance: Utterance, seq: int, transcript: Transcript, started: float) -> EmotionEvent:
        t0 = time.perf_counter()
        prosody = self.classifier.voice.prosody_of(utterance.audio)  # None when the voice head reads no prosody
        emotion = self.classifier.classify(transcript, self.histories.get(utterance.stream), prosody)
        latency = Latency(
            vad=(utterance.emitted - utterance.speech_end_arrived) * 1000,
            queue=(started - utterance.emitted) * 1000,
            asr=transcript.encode_ms + transcript.decode_ms,
            emotion=(time.perf_counter() - t0) * 1000,
        )
        return EmotionEvent(
            node=self.node,
            stream=utterance.stream,
            seq=seq,
            utterance=utterance,
            transcript=transcript,
            emotion=emotion,
            models={**self.models, "emotion": self.classifier.model_id_for(transcript.language)},
            ready=time.monotonic(),
            latency=latency,
            prosody=prosody,
        )

    def has_spare_worker(self) -> bool:
        """True when a guess would start now without delaying any final: no final waits and a worker is free."""
        return self._running < self.recogniser.workers and all(job.spare for job in self._waiting)

    async def aprocess(self, utterance: Utterance, seq: int, decode: bool = True, spare: bool = False) -> EmotionEvent:
        """The event for `utterance`; `spare` marks a guess, which yields to every final (see the class doc)."""
        loop = asyncio.get_running_loop()
        job = _Job(utterance, seq, decode, loop.create_future(), spare)
        self._waiting.append(job)
        self._batchers = {t for t in self._batchers if not t.done() and t.get_loop() is loop}
        if len(self._batchers) < self.recogniser.workers:
            self._batchers.add(loop.create_task(self._run_batches(), name="engine-batches"))
        self.in_flight += 1
        try:
            return await job.future
        finally:
            self.in_flight -= 1

    def _take_batch(self) -> list[_Job]:
        batch: list[_Job] = []
        streams: set[str] = set()
        now = time.monotonic()
        for job in sorted(self._waiting, key=lambda job: job.spare):  # finals first, each kind oldest first
            if job.future.done():  # its stream stopped waiting (cancelled, or a superseded guess)
                self._waiting.remove(job)
            elif job.utterance.stream not in streams | self._busy and len(batch) < self.max_batch:
                streams.add(job.utterance.stream)
                late = now - job.utterance.emitted + self._decode_s > self.latency_budget_s
                if self.latency_budget_s and late and not job.spare:
                    job.decode = False  # overloaded: the voice now beats the words too late
                batch.append(job)
                self._waiting.remove(job)
        self._busy |= {job.utterance.stream for job in batch if not job.spare}
        return batch

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while batch := self._take_batch():
            items = [(job.utterance, job.seq, job.decode) for job in batch]
            started = time.monotonic()
            self._running += 1
            try:
                # a guess whose stream dropped it (speech went on) while it was being encoded is not decoded;
                # Future.done() only reads a flag, so asking it from the worker thread is safe
                outcomes = await loop.run_in_executor(
                    self._executor, self.process_batch, items, lambda i: not batch[i].future.done()
                )
            finally:
                self._running -= 1
                self._busy -= {job.utterance.stream for job in batch if not job.spare}
            if any(job.decode for job in batch):
                self._decode_s += 0.3 * (time.monotonic() - started - self._decode_s)
            self.batches += 1
            self.batched += len(batch)
            for job, outcome in zip(batch, outcomes, strict=True):
                if job.future.done():
                    continue
                if isinstance(outcome, Exception):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass
class PipelineOptions:
    """Batching and the overload policy. The audio reader never waits: when the recogniser falls behind,
    utterances beyond `voice_only_backlog` waiting are classified from the voice alone (no decoding), and beyond
    `max_backlog` the oldest waiting utterance is dropped; both are logged and counted."""

    voice_only_backlog: int = 3
    max_backlog: int = 32
    max_batch: int | None = None  # utterances of different streams recognised together; None: 2 on CPU, 16 on GPU
    # Live sources (run, serve): when an utterance's wait since its cut plus the recent recognition time would
    # pass this, it is classified from the voice alone (no transcript), so latency stays bounded when there are
    # more streams than the machine can transcribe. 0 = never.
    latency_budget_ms: float = 1000.0


@dataclass
class StreamStats:
    utterances: int = 0
    events: int = 0
    failed: int = 0
    voice_only: int = 0
    dropped: int = 0
    error: str | None = None
    latencies_ms: list[float] = field(default_factory=list)


def _observe(event: EmotionEvent) -> None:
    for stage, ms in event.latency.as_dict().items():
        STAGE_LATENCY.labels(stage).observe(ms / 1000)


async def run_stream(
    source: Source,
    engine: Engine,
    sinks: Sequence[Sink],
    stream: str,
    segmenter: SegmenterOptions | None = None,
    options: PipelineOptions | None = None,
    stop: asyncio.Event | None = None,
    call_id: str | None = None,
    role: str | None = None,
) -> StreamStats:
    """Run one stream until its source ends or `stop` is set; then finish the utterances already cut.

    `call_id` and `role` mark the stream as one speaker of a phone call (its events carry them).

    Errors of the source or of one utterance are logged, never raised: the other streams and the daemon go on.
    """
    opts = options or PipelineOptions()
    stats = StreamStats()
    backlog: collections.deque[Utterance] = collections.deque()
    ready = asyncio.Event()
    done = False
    cutter = Segmenter(stream, segmenter, source=source.name)
    # semantic endpointing depends on how soon a guess is ready, so a file read as fast as possible is cut by the
    # hangover alone, the same way on every run
    live = not isinstance(source, FileSource) or source.realtime
    HEALTH.queues[stream] = backlog.__len__

    def enqueue(utterance: Utterance) -> None:
        if len(backlog) >= opts.max_backlog:
            lost = backlog.popleft()
            stats.dropped += 1
            HEALTH.count("dropped")
            log.error(
                "stream %s: %d utterances waiting, dropped segment %d (%d dropped so far)",
                stream,
                len(backlog) + 1,
                lost.segment_id,
                stats.dropped,
            )
        backlog.append(utterance)
        ready.set()

    speculation: tuple[Utterance, asyncio.Future[EmotionEvent]] | None = None
    interim_task: asyncio.Task | None = None
    finalised = -1  # the last segment whose final event went out: later interims of it are stale

    def emit(event: EmotionEvent) -> None:
        event.seq, event.call_id, event.role = stats.events, call_id, role
        stats.events += 1
        for sink in sinks:
            sink.send(event)

    async def run_interim(utterance: Utterance) -> None:
        try:
            event = await engine.aprocess(utterance, 0, decode=False, spare=True)
        except Exception:
            log.debug("stream %s: interim of segment %d failed", stream, utterance.segment_id, exc_info=True)
            return
        if utterance.segment_id > finalised:
            event.final = False
            event.transcript = dataclasses.replace(event.transcript, rejected="interim")
            emit(event)

    def interim(utterance: Utterance) -> None:
        """Voice-only emotion of the speech so far, only on a spare worker (never at a final's expense)."""
        nonlocal interim_task
        if backlog or not engine.has_spare_worker() or (interim_task and not interim_task.done()):
            return
        interim_task = asyncio.create_task(run_interim(utterance))

    def drop_speculation() -> None:
        """Speech went on after the guess: it is dropped if it has not started, and not decoded if it is
        being encoded."""
        nonlocal speculation
        if speculation:
            speculation[1].cancel()
            speculation = None

    def end_sentence(*_: object) -> None:
        """Close the utterance now if its guess is ready, ends a sentence, and the silence has lasted
        `sentence_end_ms`; asked after each chunk and when a guess is ready."""
        if not live or not speculation or not speculation[1].done() or speculation[1].cancelled():
            return
        future = speculation[1]
        if future.exception() is None and future.result().transcript.ends_sentence:
            utterance = cutter.end_sentence(speculation[0])
            if utterance:
                enqueue(utterance)

    def speculate(utterance: Utterance) -> None:
        """Recognise a tentative utterance while the hangover runs, on a spare worker only. It supersedes the
        stream's previous guess."""
        nonlocal speculation
        if backlog:  # the guess in hand may be for the final waiting there
            return
        drop_speculation()
        if not engine.has_spare_worker():
            return
        future = asyncio.ensure_future(engine.aprocess(utterance, 0, spare=True))
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # a superseded guess may fail quietly
        future.add_done_callback(end_sentence)
        speculation = (utterance, future)

    async def confirmed(utterance: Utterance, seq: int) -> EmotionEvent | None:
        """The speculative event for exactly this utterance, renumbered; None when there is none."""
        nonlocal speculation
        guess, speculation = speculation, None
        if guess is None or not guess[0].same_cut(utterance):
            if guess:
                guess[1].cancel()
            return None
        try:
            event = await guess[1]
        except Exception:
            return None
        event.seq, event.utterance, event.ready = seq, utterance, time.monotonic()
        event.latency.vad = (utterance.emitted - utterance.speech_end_arrived) * 1000
        event.latency.queue = 0.0  # asr and emotion ran during the hangover
        return event

    async def read() -> None:
        nonlocal done
        try:
            async with contextlib.aclosing(source.chunks()) as chunks:
                async for chunk in chunks:
                    for utterance in cutter.push(chunk):
                        if utterance.interim:
                            interim(utterance)
                        else:
                            (speculate if utterance.tentative else enqueue)(utterance)
                    if speculation and cutter.spoke_after(speculation[0]):
                        drop_speculation()
                    end_sentence()
        except asyncio.CancelledError:
            log.info("stream %s: stopping, finishing %d waiting utterances", stream, len(backlog))
        except Exception as e:  # a broken source ends its own stream only
            stats.error = f"{type(e).__name__}: {e}"
            log.error("stream %s: source %s failed: %s", stream, source.name, e)
        finally:
            for utterance in cutter.flush():
                enqueue(utterance)
            done = True
            ready.set()

    async def work() -> None:
        nonlocal finalised
        while backlog or not done:
            if not backlog:
                ready.clear()
                await ready.wait()
                continue
            decode = len(backlog) <= opts.voice_only_backlog
            utterance = backlog.popleft()
            stats.utterances += 1
            try:
                event = await confirmed(utterance, stats.events) or await engine.aprocess(
                    utterance, stats.events, decode
                )
            except Exception:
                stats.failed += 1
                HEALTH.count("failed")
                log.exception("stream %s: segment %d could not be processed", stream, utterance.segment_id)
                continue
            decode = event.transcript.rejected != "overload"  # a reused speculation was decoded
            if not decode:
                stats.voice_only += 1
                log.warning(
                    "stream %s: behind by %d utterances, segment %d classified from the voice only",
                    stream,
                    len(backlog) + 1,
                    utterance.segment_id,
                )
            HEALTH.count("processed" if decode else "voice_only")
            finalised = utterance.segment_id
            engine.remember(event)
            emit(event)
            stats.latencies_ms.append(event.latency.total)
            _observe(event)

    announced = [sink for sink in sinks if isinstance(sink, StreamSink)]
    for sink in announced:
        sink.stream_started(stream, call_id, role)
    reader = asyncio.create_task(read())
    stopper = asyncio.create_task(stop.wait()) if stop else None
    if stopper:
        stopper.add_done_callback(lambda _: reader.cancel())
    try:
        await asyncio.gather(reader, work())
    finally:
        if stopper:
            stopper.cancel()
        if interim_task:
            interim_task.cancel()
        HEALTH.queues.pop(stream, None)
        engine.forget(stream)
        for sink in announced:
            sink.stream_ended(stream, call_id, role)
    return stats
