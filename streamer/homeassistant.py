"""Home Assistant MQTT discovery, as HA documents it: retained configs that stay across restarts (the node's
retained `online`/`offline` status, with its Last Will, says whether the entities are available).

Per stream: an enum sensor (the label, with the options), confidence, valence and arousal sensors (state class
measurement, so HA keeps statistics and graphs them), all read from the stream's retained last state
(`…/<stream>/state`), and an `event` entity that fires once per utterance with its label (two angry utterances
in a row are two events; the sensor's state would not change). Per node, once it takes calls: an escalation
binary sensor, on while a call that raised an escalation alert lasts. Phone-call tracks get no sensors: calls
come and go by the thousand.

Discovery topic ids only hold `[a-zA-Z0-9_-]` (HA ignores others silently): `slug` transliterates, and the
readable id stays in the entity's `name`.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from functools import cache
from importlib import metadata

from streamer.event import TOPIC_ROOT, state_topic, status_topic, topic_safe
from streamer.frames import LABELS

_NOT_ID = re.compile(r"[^a-zA-Z0-9_-]")


@cache
def version() -> str:
    try:
        return metadata.version("emotion-monitor")
    except metadata.PackageNotFoundError:
        return "unknown"


def slug(name: str) -> str:
    """`name` as a discovery id: accents dropped (`baño` → `bano`), other characters `_`; when a character had
    no Latin spelling, a short hash keeps different names apart (`客服` and `通话` must not share entities)."""
    letters = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    safe = _NOT_ID.sub("_", letters) or "_"
    return safe if letters.isascii() else f"{safe}_{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def utterance_topic(node: str, stream: str) -> str:
    """One message per utterance with its label, for HA's event entity (not retained: events are not state)."""
    return f"{TOPIC_ROOT}/{topic_safe(node)}/{topic_safe(stream)}/utterance"


def escalation_topic(node: str) -> str:
    """The node's retained escalation state: `{"state": "ON"|"OFF", "calls": [...], "last": <alert>}`."""
    return f"{TOPIC_ROOT}/{topic_safe(node)}/escalation"


# What the enum sensor shows as attributes; they land in HA's recorder database, so the transcript only on request.
ATTRIBUTES = ("scores", "incongruent", "time", "event_id")


@dataclass(frozen=True)
class Discovery:
    """The discovery configs of one node. `expire_after_s`: a sensor not updated for that long shows unavailable
    (0: never); `transcript`: the enum sensor's attributes include the transcript; `url`: the device's
    configuration URL (the dashboard)."""

    prefix: str
    node: str
    expire_after_s: int = 3600
    transcript: bool = False
    url: str | None = None

    def _device(self) -> dict:
        device = {
            "identifiers": [f"emotion_monitor_{slug(self.node)}"],
            "name": f"Emotion monitor {self.node}",
            "manufacturer": "emotion-monitor",
            "model": "voice + words emotion monitor",
            "sw_version": version(),
        }
        return device | ({"configuration_url": self.url} if self.url else {})

    def _config(self, component: str, object_id: str, name: str, fields: dict) -> tuple[str, str]:
        node_id = slug(self.node)
        config = {
            "name": name,
            "unique_id": f"emotion_monitor_{node_id}_{object_id}",
            "availability_topic": status_topic(self.node),
            "payload_available": "online",
            "payload_not_available": "offline",
            **fields,
            "device": self._device(),
            "origin": {"name": "emotion-monitor", "sw_version": version()},
        }
        topic = f"{self.prefix}/{component}/{node_id}/{object_id}/config"
        return topic, json.dumps(config, ensure_ascii=False)

    def stream(self, stream: str) -> dict[str, str]:
        """The configs of a stream's entities, by discovery topic."""
        sid, state = slug(stream), state_topic(self.node, stream)
        expiry = {"expire_after": self.expire_after_s} if self.expire_after_s else {}
        keys = ATTRIBUTES + (("transcript",) if self.transcript else ())
        attributes = "{{ {" + ", ".join(f"'{k}': value_json.{k}" for k in keys) + "} | tojson }}"

        def measurement(what: str, template: str, extra: dict) -> tuple[str, str]:
            fields = {"state_topic": state, "value_template": template, "state_class": "measurement"}
            return self._config("sensor", f"{sid}_{what}", f"{stream} {what}", fields | extra | expiry)

        configs = [
            # the object id of the first sensor is the one earlier versions announced: HA keeps its entity
            self._config(
                "sensor",
                f"{sid}_emotion",
                f"{stream} emotion",
                {
                    "state_topic": state,
                    "value_template": "{{ value_json.label }}",
                    "device_class": "enum",
                    "options": list(LABELS),
                    "json_attributes_topic": state,
                    "json_attributes_template": attributes,
                    "icon": "mdi:emoticon-outline",
                }
                | expiry,
            ),
            measurement(
                "confidence",
                "{{ (value_json.confidence * 100) | round(1) }}",
                {"unit_of_measurement": "%", "icon": "mdi:gauge"},
            ),
            measurement("valence", "{{ value_json.valence }}", {"icon": "mdi:thumbs-up-down"}),
            measurement("arousal", "{{ value_json.arousal }}", {"icon": "mdi:lightning-bolt"}),
            self._config(
                "event",
                f"{sid}_utterance",
                f"{stream} utterance",
                {"state_topic": utterance_topic(self.node, stream), "event_types": list(LABELS)},
            ),
        ]
        return dict(configs)

    def escalation(self) -> tuple[str, str]:
        """The node's escalation binary sensor (problem: on while an escalated call lasts)."""
        return self._config(
            "binary_sensor",
            "call_escalation",
            "call escalation",
            {
                "state_topic": escalation_topic(self.node),
                "value_template": "{{ value_json.state }}",
                "payload_on": "ON",
                "payload_off": "OFF",
                "device_class": "problem",
                "json_attributes_topic": escalation_topic(self.node),
                "json_attributes_template": "{{ {'calls': value_json.calls, 'last': value_json.last} | tojson }}",
            },
        )

    def utterance(self, wire: dict) -> tuple[str, str]:
        """The event entity's message for a final event on the wire."""
        keys = ("confidence", "valence", "arousal", "incongruent", "event_id", "time")
        keys += ("transcript",) if self.transcript else ()
        message = {"event_type": wire["label"]} | {k: wire.get(k) for k in keys}
        return utterance_topic(self.node, wire["stream"]), json.dumps(message, ensure_ascii=False)


def last_state(wire: dict) -> str:
    """The retained per-stream state, from an event on the wire."""
    keys = ("label", "confidence", "scores", "valence", "arousal", "incongruent", "transcript", "time", "event_id")
    return json.dumps({k: wire[k] for k in keys} | {"stream": wire["stream"]}, ensure_ascii=False)
