"""The asyncio wiring: source → segmenter → recogniser → classifier → sinks, one task pair per stream.

The models live in one `Engine` whose work runs on a single worker thread: CTranslate2 and the heads
release the GIL, so the event loop keeps reading audio while an utterance is being recognised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from streamer.classifier import ClassifierOptions, EmotionClassifier
from streamer.frames import EmotionEvent, Latency, Utterance
from streamer.publisher import Sink
from streamer.recogniser import Recogniser, RecogniserOptions
from streamer.segmenter import Segmenter, SegmenterOptions
from streamer.sources import Source

log = logging.getLogger(__name__)


class Engine:
    """Whisper + emotion heads, loaded once and shared by every stream."""

    def __init__(
        self,
        recogniser: RecogniserOptions | None = None,
        classifier: ClassifierOptions | None = None,
        node: str = "local",
    ) -> None:
        self.node = node
        self.recogniser = Recogniser(recogniser)
        self.classifier = EmotionClassifier(classifier)
        self.models = {"asr": self.recogniser.model_id, "emotion": self.classifier.model_id}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    def process(self, utterance: Utterance, seq: int) -> EmotionEvent:
        started = time.monotonic()
        transcript = self.recogniser.recognise(utterance)
        emotion = self.classifier.classify(transcript)
        latency = Latency(
            vad=(utterance.emitted - utterance.speech_end_arrived) * 1000,
            queue=(started - utterance.emitted) * 1000,
            asr=transcript.encode_ms + transcript.decode_ms,
            emotion=emotion.ms,
        )
        return EmotionEvent(
            node=self.node,
            stream=utterance.stream,
            seq=seq,
            utterance=utterance,
            transcript=transcript,
            emotion=emotion,
            models=self.models,
            ready=time.monotonic(),
            latency=latency,
        )

    async def aprocess(self, utterance: Utterance, seq: int) -> EmotionEvent:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.process, utterance, seq)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass
class StreamStats:
    utterances: int = 0
    events: int = 0
    failed: int = 0
    error: str | None = None
    latencies_ms: list[float] = field(default_factory=list)


async def run_stream(
    source: Source, engine: Engine, sinks: Sequence[Sink], stream: str, segmenter: SegmenterOptions | None = None
) -> StreamStats:
    """Run one stream to its end. Errors of the source or of one utterance are logged, never raised:
    the other streams and the daemon go on."""
    stats = StreamStats()
    utterances: asyncio.Queue[Utterance | None] = asyncio.Queue()
    cutter = Segmenter(stream, segmenter, source=source.name)

    async def read() -> None:
        try:
            async for chunk in source.chunks():
                for utterance in cutter.push(chunk):
                    utterances.put_nowait(utterance)
        except Exception as e:  # a broken source ends its own stream only
            stats.error = f"{type(e).__name__}: {e}"
            log.error("stream %s: source %s failed: %s", stream, source.name, e)
        finally:
            for utterance in cutter.flush():
                utterances.put_nowait(utterance)
            utterances.put_nowait(None)

    async def work() -> None:
        while (utterance := await utterances.get()) is not None:
            stats.utterances += 1
            try:
                event = await engine.aprocess(utterance, stats.events)
            except Exception:
                stats.failed += 1
                log.exception("stream %s: segment %d could not be processed", stream, utterance.segment_id)
                continue
            stats.events += 1
            for sink in sinks:
                sink.send(event)
            stats.latencies_ms.append(event.latency.total)

    await asyncio.gather(read(), work())
    return stats
