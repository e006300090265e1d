"""Calls: the part every telephony protocol shares.

A protocol handler (AudioSocket, Twilio, FreeSWITCH) opens a `Call` on the `CallHub`, pushes each speaker's
PCM into it and ends it with a reason. Each speaker (role) becomes its own stream through `run_stream`, so
the customer's and the agent's voices are cut, recognised and classified apart, on the one shared `Engine`.
The hub publishes the call's lifecycle (started, ended with a summary) and escalation alerts.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from streamer.audio import StreamConditioner
from streamer.event import call_topic, iso_utc
from streamer.frames import LABELS, AudioChunk, EmotionEvent
from streamer.metrics import HEALTH
from streamer.pipeline import Engine, PipelineOptions, run_stream
from streamer.publisher import MessageSink, Sink
from streamer.segmenter import SegmenterOptions

log = logging.getLogger(__name__)

CALL_SCHEMA = "emotion-monitor/call/v1"
ALERT_SCHEMA = "emotion-monitor/alert/v1"
T = TypeVar("T")


class ProtocolError(ValueError):
    """A malformed or unexpected message: the call ends with reason `error` and this message."""


class CallEnded(Exception):
    """Raised inside a handler when its call is over for a reason other than a protocol error."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CallRejected(RuntimeError):
    """The hub will not take this call (limit reached, shutting down, bad token)."""


@dataclass
class EscalationRule:
    """Alert when `role`'s `label` score is ≥ `min_confidence` in `hits` of its last `window` utterances."""

    role: str = "customer"
    label: str = "anger"
    min_confidence: float = 0.7
    hits: int = 2
    window: int = 3

    def describe(self) -> str:
        return f"{self.role} {self.label} ≥ {self.min_confidence:g} in {self.hits} of the last {self.window} utterances"


@dataclass
class IngestOptions:
    """Listeners (`HOST:PORT`, or a bare port on 127.0.0.1; null = off) and the limits every call obeys."""

    audiosocket: str | None = None
    twilio: str | None = None
    freeswitch: str | None = None
    audiohook: str | None = None
    max_calls: int = 64
    max_frame_bytes: int = 32_768
    max_call_s: float = 4 * 3600.0
    idle_s: float = 30.0  # no audio for this long ends the call (reason idle)
    # Shared secret for WebSocket ingest (Bearer header, ?token=, or the protocol's own parameters);
    # env EMOTION_MONITOR_INGEST_TOKEN or token_file. None: no token asked (the listeners bind 127.0.0.1).
    token: str | None = None
    token_file: str | None = None
    # The protocols' channel names → the role in events and topics.
    roles: dict[str, str] = field(
        default_factory=lambda: {
            "inbound": "customer",  # Twilio inbound track; AudioSocket (the channel Asterisk reads: the caller)
            "outbound": "agent",  # Twilio outbound track
            "caller": "customer",  # FreeSWITCH mono, or the left channel of stereo
            "callee": "agent",  # FreeSWITCH stereo, right channel
            "mixed": "mixed",  # FreeSWITCH mixed: both voices in one channel
            "external": "customer",  # Genesys AudioHook, left channel
            "internal": "agent",  # Genesys AudioHook, right channel
        }
    )
    escalation: EscalationRule = field(default_factory=EscalationRule)

    def role(self, channel: str) -> str:
        return self.roles.get(channel, channel)

    def token_ok(self, offered: str | None) -> bool:
        return self.token is None or (offered is not None and hmac.compare_digest(offered, self.token))


class CallTrack:
    """One speaker's audio, pushed by a protocol handler and read by `run_stream` as a source."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: asyncio.Queue[AudioChunk | None] = asyncio.Queue()
        self._conditioner: StreamConditioner | None = None

    def push(self, pcm: np.ndarray, rate: int) -> None:
        """`pcm`: int16 mono samples at `rate` Hz, resampled here to 16 kHz with state across pushes."""
        if self._conditioner is None:
            self._conditioner = StreamConditioner(rate)
        elif self._conditioner.rate != rate:
            raise ProtocolError(f"sample rate changed from {self._conditioner.rate} to {rate} Hz within a call")
        audio = self._conditioner(pcm)
        if len(audio):
            self._queue.put_nowait(AudioChunk(audio, time.monotonic()))

    def end(self) -> None:
        if self._conditioner is not None:
            tail = self._conditioner(np.zeros(0, np.int16), last=True)
            if len(tail):
                self._queue.put_nowait(AudioChunk(tail, time.monotonic()))
        self._queue.put_nowait(None)

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        while (chunk := await self._queue.get()) is not None:
            yield chunk


class CallMonitor:
    """A sink for one call's events: keeps the timeline for the summary and fires the escalation rule."""

    def __init__(self, call: Call, rule: EscalationRule) -> None:
        self.call, self.rule = call, rule
        self.events: list[EmotionEvent] = []
        self.alerts: list[dict] = []
        self._recent: dict[str, collections.deque[EmotionEvent]] = collections.defaultdict(
            lambda: collections.deque(maxlen=max(1, rule.window))
        )

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def send(self, event: EmotionEvent) -> None:
        if not event.final:
            return  # the summary and the rule count utterances once, by their final event
        self.events.append(event)
        if event.role != self.rule.role or self.rule.hits <= 0:
            return
        recent = self._recent[event.role]
        recent.append(event)
        hits = [e for e in recent if e.emotion.scores.get(self.rule.label, 0.0) >= self.rule.min_confidence]
        if len(hits) >= self.rule.hits:
            recent.clear()  # re-arm: the next alert needs fresh evidence
            self._alert(hits)

    def _alert(self, hits: list[EmotionEvent]) -> None:
        alert = {
            "schema": ALERT_SCHEMA,
            "type": "escalation",
            "node": self.call.hub.engine.node,
            "call_id": self.call.call_id,
            "role": self.rule.role,
            "rule": self.rule.describe(),
            "label": self.rule.label,
            "confidence": round(max(e.emotion.scores[self.rule.label] for e in hits), 4),
            "time": iso_utc(time.time()),
            "segment_ids": [e.utterance.segment_id for e in hits],
        }
        self.alerts.append(alert)
        HEALTH.count("alerts")
        log.warning("call %s: escalation: %s", self.call.call_id, alert["rule"])
        self.call.hub.publish(f"{call_topic(alert['node'], self.call.call_id)}/alert", alert)

    def summary(self, duration_s: float) -> dict:
        """Emotion share and mean scores per role (weighted by speech time), the timeline, peaks and alerts."""
        by_role: dict[str, list[EmotionEvent]] = collections.defaultdict(list)
        for event in self.events:
            by_role[event.role or "mixed"].append(event)
        share, mean_scores, peaks = {}, {}, []
        for role, events in by_role.items():
            weights = np.array([max(e.utterance.duration_s, 1e-3) for e in events])
            scores = np.array([[e.emotion.scores[label] for label in LABELS] for e in events])
            labels = [e.emotion.label for e in events]
            share[role] = {
                label: round(float(weights[[x == label for x in labels]].sum() / weights.sum()), 4) for label in LABELS
            }
            mean_scores[role] = dict(zip(LABELS, np.round(weights @ scores / weights.sum(), 4).tolist(), strict=True))
            emotional = sorted(
                (e for e in events if e.emotion.label != "neutral"), key=lambda e: e.emotion.confidence, reverse=True
            )
            peaks += [
                {
                    "role": role,
                    "label": e.emotion.label,
                    "confidence": e.emotion.confidence,
                    "start_s": e.utterance.start_s,
                    "transcript": e.transcript.text,
                }
                for e in emotional[:3]
            ]
        return {
            "duration_s": round(duration_s, 3),
            "utterances": {role: len(events) for role, events in by_role.items()},
            "share": share,
            "mean_scores": mean_scores,
            "timeline": [
                {
                    "start_s": e.utterance.start_s,
                    "end_s": e.utterance.end_s,
                    "role": e.role,
                    "label": e.emotion.label,
                    "confidence": e.emotion.confidence,
                    "incongruent": e.emotion.incongruent,
                }
                for e in sorted(self.events, key=lambda e: e.utterance.start_s)
            ],
            "peaks": peaks,
            "alerts": self.alerts,
        }


class Call:
    """One live call: a track and a `run_stream` per role, a monitor, limits, and an end with a reason."""

    def __init__(self, hub: CallHub, call_id: str, protocol: str, channels: list[str], metadata: dict) -> None:
        self.hub, self.call_id, self.protocol, self.metadata = hub, call_id, protocol, metadata
        self.roles = {channel: hub.opts.role(channel) for channel in channels}
        self.started, self.started_wall = time.monotonic(), time.time()
        self.last_audio = self.started
        self.monitor = CallMonitor(self, hub.opts.escalation)
        self.tracks: dict[str, CallTrack] = {}
        self._streams: list[asyncio.Task] = []
        for role in dict.fromkeys(self.roles.values()):
            track = self.tracks[role] = CallTrack(f"{protocol}:{call_id}/{role}")
            stream = run_stream(
                track,
                hub.engine,
                [*hub.sinks, self.monitor],
                f"{call_id}/{role}",
                hub.segmenter,
                hub.pipeline,
                call_id=call_id,
                role=role,
            )
            self._streams.append(asyncio.create_task(stream, name=f"call-{call_id}-{role}"))
        self._ending: asyncio.Task | None = None
        self._reading: asyncio.Future | None = None  # the handler's pending read, cut short when we end the call

    def push(self, channel: str, pcm: np.ndarray, rate: int) -> None:
        if self._ending is not None:
            raise CallEnded("shutdown")  # the server ended the call; the connection is being closed
        if channel not in self.roles:
            raise ProtocolError(f"audio for channel {channel!r}, but the call declared {', '.join(self.roles)}")
        self.tracks[self.roles[channel]].push(pcm, rate)
        self.last_audio = time.monotonic()

    def keep_alive(self) -> None:
        """Count a control message as activity (a paused call still pinging is not idle)."""
        self.last_audio = time.monotonic()

    async def read(self, message: Awaitable[T]) -> T:
        """Await the handler's next message, ending the call when it is idle, has run out of time, or is ended
        from our side (shutdown) while the peer is silent."""
        now = time.monotonic()
        idle_left = self.last_audio + self.hub.opts.idle_s - now
        time_left = self.started + self.hub.opts.max_call_s - now
        timeout, reason = (idle_left, "idle") if idle_left <= time_left else (time_left, "max_duration")
        self._reading = asyncio.ensure_future(message)
        try:
            return await asyncio.wait_for(self._reading, max(timeout, 0.0))
        except TimeoutError:
            raise CallEnded(reason) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._ending is not None and not (current and current.cancelling()):
                raise CallEnded("shutdown") from None  # `_end` cut the read short, the handler was not cancelled
            raise

    async def follow(self, messages: Awaitable[str]) -> tuple[str, str | None]:
        """Run the handler's message loop, which returns the end reason, and end the call however it stops;
        returns (reason, error) so the handler can tell its peer."""
        try:
            reason, error = await messages, None
        except CallEnded as e:
            reason, error = e.reason, None
        except ProtocolError as e:
            reason, error = "error", str(e)
        except asyncio.CancelledError:
            await self.end("shutdown")
            raise
        except Exception as e:  # a bug must end this call only, and say so
            log.exception("call %s: handler failed", self.call_id)
            reason, error = "error", f"internal error: {type(e).__name__}: {e}"
        await self.end(reason, error)
        return reason, error

    async def end(self, reason: str, error: str | None = None) -> dict:
        """Finish the utterances already heard, publish `ended` with the summary; idempotent."""
        if self._ending is None:
            self._ending = asyncio.create_task(self._end(reason, error))
        return await asyncio.shield(self._ending)

    async def _end(self, reason: str, error: str | None) -> dict:
        duration = time.monotonic() - self.started
        if self._reading is not None and not self._reading.done():
            self._reading.cancel()  # the handler hears CallEnded("shutdown") and tells its peer
        for track in self.tracks.values():
            track.end()
        await asyncio.gather(*self._streams, return_exceptions=True)
        message = self.hub.lifecycle(self, "ended") | {
            "reason": reason,
            "error": error,
            "summary": self.monitor.summary(duration),
        }
        self.hub.publish(f"{call_topic(self.hub.engine.node, self.call_id)}/lifecycle", message)
        self.hub.calls.pop(self.call_id, None)
        HEALTH.count(f"calls_{reason}")
        (log.error if error else log.info)(
            "call %s (%s) ended after %.1f s: %s%s",
            self.call_id,
            self.protocol,
            duration,
            reason,
            f" ({error})" if error else "",
        )
        return message


class CallHub:
    """Opens calls against one engine and one set of sinks, enforces the call limit, publishes call messages."""

    def __init__(
        self,
        engine: Engine,
        sinks: list[Sink],
        opts: IngestOptions | None = None,
        segmenter: SegmenterOptions | None = None,
        pipeline: PipelineOptions | None = None,
    ) -> None:
        self.engine, self.sinks = engine, sinks
        self.opts = opts or IngestOptions()
        self.segmenter, self.pipeline = segmenter, pipeline
        self.calls: dict[str, Call] = {}
        self.closing = False

    def open(self, call_id: str | None, protocol: str, channels: list[str], metadata: dict | None = None) -> Call:
        if self.closing:
            raise CallRejected("the server is shutting down")
        if len(self.calls) >= self.opts.max_calls:
            HEALTH.count("calls_rejected")
            raise CallRejected(f"{len(self.calls)} calls already active (max_calls)")
        call_id = call_id or uuid.uuid4().hex
        base, n = call_id, 1
        while call_id in self.calls:  # the same call reconnecting while its first connection is still ending
            n += 1
            call_id = f"{base}-{n}"
        call = self.calls[call_id] = Call(self, call_id, protocol, channels, metadata or {})
        self.publish(f"{call_topic(self.engine.node, call_id)}/lifecycle", self.lifecycle(call, "started"))
        log.info("call %s (%s) started: %s", call_id, protocol, ", ".join(dict.fromkeys(call.roles.values())))
        return call

    def lifecycle(self, call: Call, kind: str) -> dict:
        return {
            "schema": CALL_SCHEMA,
            "type": kind,
            "node": self.engine.node,
            "call_id": call.call_id,
            "protocol": call.protocol,
            "roles": list(dict.fromkeys(call.roles.values())),
            "time": iso_utc(time.time()),
            "started": iso_utc(call.started_wall),
            "metadata": call.metadata,
        }

    def publish(self, topic: str, message: dict) -> None:
        for sink in self.sinks:
            if isinstance(sink, MessageSink):
                sink.send_message(topic, message)

    async def close(self) -> None:
        """Stop taking calls and end the active ones (reason shutdown), finishing what they said."""
        self.closing = True
        await asyncio.gather(*(call.end("shutdown") for call in list(self.calls.values())))
