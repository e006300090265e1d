"""The daemon's configuration: each stage's options dataclass, filled from YAML, then env, then the CLI.

The dataclass defaults are the defaults; `configs/monitor.yaml` spells them out (a test keeps the two equal).
Secrets come from env or files only: EMOTION_MONITOR_BROKER, EMOTION_MONITOR_MQTT_USERNAME,
EMOTION_MONITOR_MQTT_PASSWORD, EMOTION_MONITOR_MQTT_PASSWORD_FILE, EMOTION_MONITOR_INGEST_TOKEN.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from streamer.classifier import ClassifierOptions
from streamer.distributed import DistributedOptions
from streamer.ingest.calls import IngestOptions
from streamer.models import WORDS_HEADS
from streamer.pipeline import PipelineOptions
from streamer.publisher import MqttOptions
from streamer.recogniser import RecogniserOptions, language_code
from streamer.segmenter import SegmenterOptions


@dataclass
class MonitorConfig:
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0] or "local")
    stream: str = "default"
    source: str = "auto"  # auto → the microphone if there is one, else the generated Spanish demo
    segmenter: SegmenterOptions = field(default_factory=SegmenterOptions)
    recogniser: RecogniserOptions = field(default_factory=RecogniserOptions)
    classifier: ClassifierOptions = field(default_factory=ClassifierOptions)
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    mqtt: MqttOptions = field(default_factory=MqttOptions)
    ingest: IngestOptions = field(default_factory=IngestOptions)  # `serve`: telephony listeners and call limits
    metrics: str | None = None  # host:port for /metrics (Prometheus) and /healthz, e.g. 127.0.0.1:9464
    distributed: DistributedOptions = field(default_factory=DistributedOptions)  # `ingest` and `worker`


class ConfigError(ValueError):
    pass


def _merge(target: Any, values: dict, where: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown option {key!r} (known: {', '.join(sorted(known))})")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value or {}, f"{where}.{key}")
        else:
            setattr(target, key, value)


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> MonitorConfig:
    config = MonitorConfig()
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        _merge(config, data, str(path))
    env = os.environ if env is None else env
    mqtt = config.mqtt
    mqtt.url = env.get("EMOTION_MONITOR_BROKER", mqtt.url)
    mqtt.username = env.get("EMOTION_MONITOR_MQTT_USERNAME", mqtt.username)
    mqtt.password = env.get("EMOTION_MONITOR_MQTT_PASSWORD", mqtt.password)
    mqtt.password_file = env.get("EMOTION_MONITOR_MQTT_PASSWORD_FILE", mqtt.password_file)
    ingest = config.ingest
    ingest.token = env.get("EMOTION_MONITOR_INGEST_TOKEN", ingest.token)
    if ingest.token_file:
        try:
            ingest.token = Path(ingest.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read ingest.token_file: {e}") from e
    return check(config)


def check(config: MonitorConfig) -> MonitorConfig:
    """Refuse at start-up what would otherwise fail later, on every utterance."""
    try:
        language_code(config.recogniser.language)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.classifier.words_head not in WORDS_HEADS:
        raise ConfigError(
            f"unknown classifier.words_head {config.classifier.words_head!r}: use {' or '.join(WORDS_HEADS)}"
        )
    return config


def as_dict(config: MonitorConfig) -> dict:
    return dataclasses.asdict(config)
