"""The wire format: `EmotionEvent` → JSON dict (schema `emotion-monitor/event/v1`) and MQTT topic names."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from functools import cache
from importlib import resources

from streamer.frames import EmotionEvent

SCHEMA_ID = "emotion-monitor/event/v1"
TOPIC_ROOT = "emotion/v1"
_UNSAFE = re.compile(r"[^\w.\-]")


def topic_safe(name: str) -> str:
    """An id usable as one MQTT topic level: no wildcards (`#`, `+`), separators, NUL or spaces."""
    return _UNSAFE.sub("_", name)[:128] or "_"


def event_topic(node: str, stream: str, call_id: str | None = None, role: str | None = None) -> str:
    """`emotion/v1/<node>/<stream>/event`, or `emotion/v1/<node>/call/<call_id>/<role>/event` for a call track."""
    if call_id is not None:
        return f"{call_topic(node, call_id)}/{topic_safe(role or 'mixed')}/event"
    return f"{TOPIC_ROOT}/{topic_safe(node)}/{topic_safe(stream)}/event"


def state_topic(node: str, stream: str, call_id: str | None = None, role: str | None = None) -> str:
    """The retained last state of a stream: the sibling of its event topic."""
    return event_topic(node, stream, call_id, role).removesuffix("/event") + "/state"


def request_topic(node: str) -> str:
    """Ask the daemon for its streams and health (answer on the MQTT v5 response topic, else `…/response`)."""
    return f"{TOPIC_ROOT}/{topic_safe(node)}/request"


def call_topic(node: str, call_id: str) -> str:
    """The prefix of one call's topics: `…/<role>/event`, `…/lifecycle` and `…/alert` sit under it."""
    return f"{TOPIC_ROOT}/{topic_safe(node)}/call/{topic_safe(call_id)}"


def status_topic(node: str) -> str:
    return f"{TOPIC_ROOT}/{topic_safe(node)}/status"


def health_topic(node: str) -> str:
    return f"{TOPIC_ROOT}/{topic_safe(node)}/health"


def iso_utc(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_id(node: str, stream: str, segment_id: int, interim_end_s: float | None = None) -> str:
    """Stable per utterance, so subscribers drop QoS-1 duplicates (and a distributed job carries it as its id);
    an interim event (the speech so far) is told apart by where the speech so far ends."""
    return f"{node}/{stream}/{segment_id}/" + ("final" if interim_end_s is None else f"interim@{interim_end_s:g}")


def to_wire(event: EmotionEvent, publish_transcript: bool = True) -> dict:
    u, t, e = event.utterance, event.transcript, event.emotion
    wire = {
        "schema": SCHEMA_ID,
        "event_id": event_id(event.node, event.stream, u.segment_id, None if event.final else u.end_s),
        "node": event.node,
        "stream": event.stream,
        "seq": event.seq,
        "segment_id": u.segment_id,
        "start_s": u.start_s,
        "end_s": u.end_s,
        "time": iso_utc(u.wall_end),
        "language": t.language,
        "transcript": t.text if publish_transcript else "",
        "label": e.label,
        "confidence": e.confidence,
        "scores": e.scores,
        "audio_scores": e.audio_scores,
        "text_scores": e.text_scores,
        "valence": e.valence,
        "arousal": e.arousal,
        "incongruent": e.incongruent,
        "final": event.final,
        "model": event.models,
        "asr": {
            "language_probability": round(t.language_probability, 4),
            "no_speech_prob": round(t.no_speech_prob, 4),
            "avg_logprob": round(t.avg_logprob, 4),
            "rejected": t.rejected,
        },
        "latency_ms": event.latency.as_dict(),
    }
    if u.source:
        wire["source"] = u.source
    if event.call_id is not None:
        wire["call_id"], wire["role"] = event.call_id, event.role
    return wire


@cache
def schema() -> dict:
    return json.loads((resources.files("streamer") / "schema" / "event-v1.schema.json").read_text())


def validate(wire: dict) -> None:
    """Raise `jsonschema.ValidationError` when `wire` does not follow the v1 schema."""
    import jsonschema

    jsonschema.validate(wire, schema(), format_checker=jsonschema.FormatChecker())
