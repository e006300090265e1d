"""Home Assistant MQTT discovery: one retained sensor config per stream, so HA shows each stream's emotion.

The sensor's state is the label of the stream's retained last state (`…/<stream>/state`); its attributes are
the rest of that JSON (confidence, scores, valence, arousal, time). Availability follows the node's retained
`online`/`offline` status (Last Will). Phone-call tracks get no sensor: calls come and go by the thousand.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import metadata

from streamer.event import state_topic, status_topic, topic_safe


@cache
def version() -> str:
    try:
        return metadata.version("emotion-monitor")
    except metadata.PackageNotFoundError:
        return "unknown"


def discovery_topic(prefix: str, node: str, stream: str) -> str:
    return f"{prefix}/sensor/{topic_safe(node)}/{topic_safe(stream)}_emotion/config"


def discovery_config(node: str, stream: str) -> str:
    node_id = topic_safe(node)
    return json.dumps(
        {
            "name": f"{stream} emotion",
            "unique_id": f"emotion_monitor_{node_id}_{topic_safe(stream)}",
            "state_topic": state_topic(node, stream),
            "value_template": "{{ value_json.label }}",
            "json_attributes_topic": state_topic(node, stream),
            "availability_topic": status_topic(node),
            "payload_available": "online",
            "payload_not_available": "offline",
            "icon": "mdi:emoticon-outline",
            "device": {
                "identifiers": [f"emotion_monitor_{node_id}"],
                "name": f"Emotion monitor {node}",
                "manufacturer": "emotion-monitor",
                "model": "voice + words emotion monitor",
                "sw_version": version(),
            },
            "origin": {"name": "emotion-monitor", "sw_version": version()},
        }
    )


def last_state(wire: dict) -> str:
    """The retained per-stream state, from an event on the wire."""
    keys = ("label", "confidence", "scores", "valence", "arousal", "incongruent", "transcript", "time", "event_id")
    return json.dumps({k: wire[k] for k in keys} | {"stream": wire["stream"]}, ensure_ascii=False)
