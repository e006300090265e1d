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
from streamer.frames import AudioChunk, EmotionEvent, Latency, Transcript, Utterance
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
    A stream has at most one utterance waiting here (its own backlog stays in its `StreamRunner`), so a
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
            frames = event.transcript.encoder_frames if event.voice_frames is None else event.voice_frames
            self.histories.remember(event.stream, frames, event.prosody)

    def forget(self, stream: str) -> None:
        self.histories.forget(stream)

    def _event(self, utterance: Utterance, seq: int, transcript: Transcript, started: float) -> EmotionEvent:
        t0 = time.perf_counter()
        voice = self.classifier.voice
        frames = voice.frames_of(utterance.audio, transcript.encoder_frames)  # its own pass when the head has one
        prosody = voice.prosody_of(utterance.audio)  # None when the voice head reads no prosody
        emotion = self.classifier.classify(transcript, self.histories.get(utterance.stream), prosody, frames)
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
            voice_frames=None if frames is transcript.encoder_frames else frames,
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
                # never shed one that waited less than a recent recognition: a CPU too slow for the budget still
                # transcribes, and sheds only its backlog
                late = now - job.utterance.emitted + self._decode_s > max(self.latency_budget_s, 2 * self._decode_s)
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
    # more streams than the machine can transcribe. Never below twice the recent recognition time, so a CPU slower
    # than the budget sheds only utterances that waited. 0 = never.
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


class StreamRunner:
    """One stream's run: its segmenter, its backlog of cut utterances, its guess in flight (speculation), its
    interim task, the last segment finalised and its stats.

    The state lives here rather than in closures so that each step (enqueue, speculate, confirm, push a chunk,
    finish the oldest utterance) can be driven and checked on its own. `run` reads the source and works off the
    backlog at once, as two tasks, until the source ends or `stop` is set; a runner runs once.
    """

    def __init__(
        self,
        source: Source,
        engine: Engine,
        sinks: Sequence[Sink],
        stream: str,
        segmenter: SegmenterOptions | None = None,
        options: PipelineOptions | None = None,
        call_id: str | None = None,
        role: str | None = None,
    ) -> None:
        self.source, self.engine, self.sinks, self.stream = source, engine, sinks, stream
        self.options = options or PipelineOptions()
        self.call_id, self.role = call_id, role
        self.stats = StreamStats()
        self.backlog: collections.deque[Utterance] = collections.deque()  # final utterances not yet sent to the engine
        self.ready = asyncio.Event()  # set when the backlog grows or the source has ended
        self.done = False  # the source has ended and its last utterance is in the backlog
        self.cutter = Segmenter(stream, segmenter, source=source.name)
        # semantic endpointing depends on how soon a guess is ready, so a file read as fast as possible is cut by
        # the hangover alone, the same way on every run
        self.live = not isinstance(source, FileSource) or source.realtime
        self.speculation: tuple[Utterance, asyncio.Future[EmotionEvent]] | None = None
        self.interim_task: asyncio.Task[None] | None = None
        self.finalised = -1  # the last segment whose final event went out: later interims of it are stale

    async def run(self, stop: asyncio.Event | None = None) -> StreamStats:
        """Announce the stream, read and work until the source ends (or `stop`), then finish and announce its end."""
        HEALTH.queues[self.stream] = self.backlog.__len__
        announced = [sink for sink in self.sinks if isinstance(sink, StreamSink)]
        for sink in announced:
            sink.stream_started(self.stream, self.call_id, self.role)
        reader = asyncio.create_task(self.read())
        stopper = asyncio.create_task(stop.wait()) if stop else None
        if stopper:
            stopper.add_done_callback(lambda _: reader.cancel())
        try:
            await asyncio.gather(reader, self.work())
        finally:
            if stopper:
                stopper.cancel()
            if self.interim_task:
                self.interim_task.cancel()
            HEALTH.queues.pop(self.stream, None)
            self.engine.forget(self.stream)
            for sink in announced:
                sink.stream_ended(self.stream, self.call_id, self.role)
        return self.stats

    def enqueue(self, utterance: Utterance) -> None:
        """Queue a final utterance; the reader never waits, so beyond `max_backlog` the oldest one is dropped."""
        if len(self.backlog) >= self.options.max_backlog:
            lost = self.backlog.popleft()
            self.stats.dropped += 1
            HEALTH.count("dropped")
            log.error(
                "stream %s: %d utterances waiting, dropped segment %d (%d dropped so far)",
                self.stream,
                len(self.backlog) + 1,
                lost.segment_id,
                self.stats.dropped,
            )
        self.backlog.append(utterance)
        self.ready.set()

    def emit(self, event: EmotionEvent) -> None:
        """Number the event in the stream's one sequence (finals and interims alike) and hand it to every sink."""
        event.seq, event.call_id, event.role = self.stats.events, self.call_id, self.role
        self.stats.events += 1
        for sink in self.sinks:
            sink.send(event)

    def push(self, chunk: AudioChunk) -> None:
        """One chunk of audio: route what the segmenter cuts (interim, guess or final), drop a guess that speech
        overtook, and close the utterance early if its guess ends a sentence."""
        for utterance in self.cutter.push(chunk):
            if utterance.interim:
                self.interim(utterance)
            elif utterance.tentative:
                self.speculate(utterance)
            else:
                self.enqueue(utterance)
        if self.speculation and self.cutter.spoke_after(self.speculation[0]):
            self.drop_speculation()
        self.end_sentence()

    def interim(self, utterance: Utterance) -> None:
        """Voice-only emotion of the speech so far, only on a spare worker (never at a final's expense)."""
        if self.backlog or not self.engine.has_spare_worker() or (self.interim_task and not self.interim_task.done()):
            return
        self.interim_task = asyncio.create_task(self.run_interim(utterance))

    async def run_interim(self, utterance: Utterance) -> None:
        """Send the interim event unless the segment's final went out first (a late interim would read as news)."""
        try:
            event = await self.engine.aprocess(utterance, 0, decode=False, spare=True)
        except Exception:
            log.debug("stream %s: interim of segment %d failed", self.stream, utterance.segment_id, exc_info=True)
            return
        if utterance.segment_id > self.finalised:
            event.final = False
            event.transcript = dataclasses.replace(event.transcript, rejected="interim")
            self.emit(event)

    def speculate(self, utterance: Utterance) -> None:
        """Recognise a tentative utterance while the hangover runs, on a spare worker only. It supersedes the
        stream's previous guess."""
        if self.backlog:  # the guess in hand may be for the final waiting there
            return
        self.drop_speculation()
        if not self.engine.has_spare_worker():
            return
        future = asyncio.ensure_future(self.engine.aprocess(utterance, 0, spare=True))
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # a superseded guess may fail quietly
        future.add_done_callback(self.end_sentence)
        self.speculation = (utterance, future)

    def drop_speculation(self) -> None:
        """Speech went on after the guess: it is dropped if it has not started, and not decoded if it is
        being encoded."""
        if self.speculation:
            self.speculation[1].cancel()
            self.speculation = None

    def end_sentence(self, *_: object) -> None:
        """Close the utterance now if its guess is ready, ends a sentence, and the silence has lasted
        `sentence_end_ms`; asked after each chunk and when a guess is ready."""
        if not self.live or not self.speculation or not self.speculation[1].done() or self.speculation[1].cancelled():
            return
        future = self.speculation[1]
        if future.exception() is None and future.result().transcript.ends_sentence:
            utterance = self.cutter.end_sentence(self.speculation[0])
            if utterance:
                self.enqueue(utterance)

    async def confirmed(self, utterance: Utterance, seq: int) -> EmotionEvent | None:
        """The speculative event for exactly this utterance, renumbered; None when there is none."""
        guess, self.speculation = self.speculation, None
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

    async def read(self) -> None:
        """Feed the source's chunks to `push` until it ends, fails or is cancelled; then cut what is still open."""
        try:
            async with contextlib.aclosing(self.source.chunks()) as chunks:
                async for chunk in chunks:
                    self.push(chunk)
        except asyncio.CancelledError:
            log.info("stream %s: stopping, finishing %d waiting utterances", self.stream, len(self.backlog))
        except Exception as e:  # a broken source ends its own stream only
            self.stats.error = f"{type(e).__name__}: {e}"
            log.error("stream %s: source %s failed: %s", self.stream, self.source.name, e)
        finally:
            for utterance in self.cutter.flush():
                self.enqueue(utterance)
            self.done = True
            self.ready.set()

    async def work(self) -> None:
        """Finish the backlog's utterances in order, one at a time, until the source has ended and none is left."""
        while self.backlog or not self.done:
            if not self.backlog:
                self.ready.clear()
                await self.ready.wait()
                continue
            await self.finish_next()

    async def finish_next(self) -> None:
        """The oldest waiting utterance's final event: its confirmed guess, or a new recognition (voice-only when
        more than `voice_only_backlog` wait); a failure is counted and logged, and the stream goes on."""
        decode = len(self.backlog) <= self.options.voice_only_backlog
        utterance = self.backlog.popleft()
        self.stats.utterances += 1
        try:
            event = await self.confirmed(utterance, self.stats.events) or await self.engine.aprocess(
                utterance, self.stats.events, decode
            )
        except Exception:
            self.stats.failed += 1
            HEALTH.count("failed")
            log.exception("stream %s: segment %d could not be processed", self.stream, utterance.segment_id)
            return
        decode = event.transcript.rejected != "overload"  # a reused speculation was decoded
        if not decode:
            self.stats.voice_only += 1
            log.warning(
                "stream %s: behind by %d utterances, segment %d classified from the voice only",
                self.stream,
                len(self.backlog) + 1,
                utterance.segment_id,
            )
        HEALTH.count("processed" if decode else "voice_only")
        self.finalised = utterance.segment_id
        self.engine.remember(event)
        self.emit(event)
        self.stats.latencies_ms.append(event.latency.total)
        _observe(event)


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
    runner = StreamRunner(source, engine, sinks, stream, segmenter, options, call_id, role)
    return await runner.run(stop)
