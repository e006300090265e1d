import dataclasses

import pytest

from streamer.config import ConfigError, MonitorConfig, load_config
from tests.conftest import REPO


def test_documented_config_equals_the_defaults():
    assert dataclasses.asdict(load_config(REPO / "configs" / "monitor.yaml", env={})) == dataclasses.asdict(
        MonitorConfig()
    )


def test_yaml_env_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stream: desk\nrecogniser:\n  language: null\nmqtt:\n  url: mqtt://h:1\n")
    config = load_config(path, env={"EMOTION_MONITOR_MQTT_PASSWORD": "s3cret", "EMOTION_MONITOR_BROKER": "mqtt://e"})
    assert (config.stream, config.recogniser.language, config.mqtt.url, config.mqtt.password) == (
        "desk",
        None,
        "mqtt://e",
        "s3cret",
    )
    path.write_text("segmenter:\n  hangover: 3\n")
    with pytest.raises(ConfigError, match="unknown option 'hangover'"):
        load_config(path, env={})
    path.write_text("mqtt: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(path, env={})
