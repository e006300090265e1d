"""MQTT conventions for dashboards and Home Assistant, checked on the real Mosquitto: retained last state,
discovery as HA documents it (kept across restarts, re-sent when HA comes online), v5 properties, requests."""

import asyncio
import json
import re
import socket

import aiomqtt
import jinja2
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamer.cli import _page_url
from streamer.event import SCHEMA_ID, state_topic, status_topic
from streamer.frames import LABELS
from streamer.homeassistant import Discovery, escalation_topic, slug, utterance_topic
from streamer.metrics import HEALTH
from streamer.publisher import MqttOptions, MqttSink
from tests.conftest import make_event, unique_node
from tests.test_publisher import clear_node, retained

V5 = aiomqtt.ProtocolVersion.V5


async def settle(sink: MqttSink) -> None:
    async with asyncio.timeout(10):
        while sink.spool.size() or sink._dirty:
            await asyncio.sleep(0.05)


def render(template: str, payload: bytes | str) -> str:
    """A value template as Home Assistant renders it: Jinja with the payload parsed as `value_json`."""
    return jinja2.Environment().from_string(template).render(value_json=json.loads(payload))


async def test_discovery_follows_ha_conventions_and_survives_a_restart(broker):
    """Before: one text sensor, deleted on every stop (HA dropped the user's rename and area), nothing to graph,
    no event for two angry utterances in a row, object ids HA ignores for `baño`, transcripts in the attributes."""
    node = unique_node("ha")
    opts = MqttOptions(spool="memory", health_interval_s=0, homeassistant_url="http://monitor.local:8765/")
    sink = MqttSink(opts, "mqtt://127.0.0.1:1883", node)
    await sink.start()
    try:
        sink.stream_started("baño", None, None)
        async with aiomqtt.Client("127.0.0.1", 1883) as client:
            await client.subscribe(utterance_topic(node, "baño"), qos=1)
            sink.send(make_event("baño", 0, node, label="anger", confidence=0.8, text="estoy harto"))
            sink.send(make_event("baño", 1, node, label="anger", confidence=0.9))
            fired = []
            async with asyncio.timeout(10):
                async for message in client.messages:
                    fired.append(json.loads(message.payload))
                    if len(fired) == 2:
                        break
        await settle(sink)
        config_topic = f"homeassistant/sensor/{node}/bano_emotion/config"
        async with aiomqtt.Client("127.0.0.1", 1883) as client:  # Home Assistant restarts
            await client.subscribe(config_topic, qos=1)
            await client.publish("homeassistant/status", "online", qos=1)
            async with asyncio.timeout(10):
                async for message in client.messages:
                    if not message.retain:  # the re-sent config, not the retained copy we got on subscribing
                        assert json.loads(message.payload)["name"] == "baño emotion"
                        break
        sink.stream_ended("baño", None, None)
    finally:
        await sink.close()
    try:
        configs = {t: json.loads(p) for t, p in (await retained(f"homeassistant/+/{node}/#")).items()}
        assert {t.split("/")[1] for t in configs} == {"sensor", "event"}  # still there after the stop
        for topic in configs:
            assert re.fullmatch(r"homeassistant/(sensor|event)/[a-zA-Z0-9_-]+/[a-zA-Z0-9_-]+/config", topic), topic
        assert len({c["unique_id"] for c in configs.values()}) == len(configs) == 5
        by_name = {c["name"]: c for c in configs.values()}
        assert set(by_name) == {f"baño {what}" for what in ("emotion", "confidence", "valence", "arousal", "utterance")}
        assert f"homeassistant/sensor/{node}/bano_emotion/config" in configs
        state = (await retained(state_topic(node, "baño")))[state_topic(node, "baño")]
        for config in configs.values():
            assert config["availability_topic"] == status_topic(node)
            assert config["device"]["configuration_url"] == "http://monitor.local:8765/"
        emotion = by_name["baño emotion"]
        assert emotion["device_class"] == "enum" and emotion["options"] == list(LABELS)
        assert render(emotion["value_template"], state) == "anger" and emotion["expire_after"] == 3600
        attributes = json.loads(render(emotion["json_attributes_template"], state))
        assert attributes["scores"]["anger"] == 0.9 and "transcript" not in attributes  # kept out of HA's recorder
        assert "state_class" not in emotion
        for what, value in (("confidence", 90.0), ("valence", -0.2), ("arousal", 0.28)):
            sensor = by_name[f"baño {what}"]
            assert sensor["state_class"] == "measurement" and sensor["state_topic"] == state_topic(node, "baño")
            assert float(render(sensor["value_template"], state)) == value
        assert by_name["baño confidence"]["unit_of_measurement"] == "%"
        event = by_name["baño utterance"]
        assert event["event_types"] == list(LABELS) and event["state_topic"] == utterance_topic(node, "baño")
        assert [f["event_type"] for f in fired] == ["anger", "anger"]  # the same label twice: two events
        assert fired[0]["confidence"] == 0.8 and "transcript" not in fired[0]
        assert sink.published == 2  # events; HA's copies are not counted
        assert (await retained(status_topic(node)))[status_topic(node)] == b"offline"  # availability does the job
    finally:
        await clear_node(node)


def test_transcripts_reach_home_assistant_only_on_request():
    state = json.dumps(
        {"label": "joy", "scores": {}, "incongruent": False, "time": "t", "event_id": "e", "transcript": "hola"}
    )
    for transcript in (False, True):
        configs = Discovery("homeassistant", "n", transcript=transcript).stream("desk")
        emotion = next(json.loads(c) for t, c in configs.items() if t.endswith("desk_emotion/config"))
        assert ("transcript" in json.loads(render(emotion["json_attributes_template"], state))) is transcript


def test_discovery_ids_are_transliterated_and_kept_apart():
    assert slug("baño") == "bano" and slug("Café bar #2") == "Cafe_bar__2" and slug("call-1_a") == "call-1_a"
    assert re.fullmatch(r"___[0-9a-f]{6}", slug("客服")) and slug("客服") != slug("通话")
    topics = Discovery("homeassistant", "nodo ñ").stream("客服")
    assert all(re.fullmatch(r"homeassistant/(sensor|event)/nodo_n/___[0-9a-f]{6}_[a-z]+/config", t) for t in topics)


async def test_calls_get_an_escalation_sensor_and_no_stream_sensors(broker):
    node = unique_node("ha")
    sink = MqttSink(MqttOptions(spool="memory", health_interval_s=0), "mqtt://127.0.0.1:1883", node)
    await sink.start()
    try:
        sink.stream_started("c1/customer", "c1", "customer")
        event = make_event("c1/customer", 0, node)
        event.call_id, event.role = "c1", "customer"
        sink.send(event)
        await settle(sink)
        topic = state_topic(node, "c1/customer", "c1", "customer")
        assert topic == f"emotion/v1/{node}/call/c1/customer/state" and topic in await retained(f"emotion/v1/{node}/#")
        config_topic = f"homeassistant/binary_sensor/{node}/call_escalation/config"
        config = json.loads((await retained(config_topic))[config_topic])
        assert config["device_class"] == "problem" and config["state_topic"] == escalation_topic(node)

        async def escalation() -> str:
            await settle(sink)
            return render(config["value_template"], (await retained(escalation_topic(node)))[escalation_topic(node)])

        assert await escalation() == config["payload_off"]
        alert = {"type": "escalation", "call_id": "c1", "rule": "anger", "time": "t"}
        sink.send_message(f"emotion/v1/{node}/call/c1/alert", alert)
        assert await escalation() == config["payload_on"]
        sink.send_message(f"emotion/v1/{node}/call/c1/lifecycle", {"type": "ended", "call_id": "c1"})
        assert await escalation() == config["payload_off"]
        sink.stream_ended("c1/customer", "c1", "customer")
        await settle(sink)
        assert set(await retained(f"emotion/v1/{node}/#")) == {status_topic(node), escalation_topic(node)}
        assert not await retained(f"homeassistant/sensor/{node}/#")
    finally:
        await sink.close()
        await clear_node(node)


async def test_v5_properties_and_the_request_topic(broker):
    node = unique_node("v5")
    sink = MqttSink(MqttOptions(spool="memory", health_interval_s=0), "mqtt://127.0.0.1:1883", node)
    HEALTH.queues["desk"] = lambda: 2
    try:
        async with aiomqtt.Client("127.0.0.1", 1883, protocol=V5) as client:
            await client.subscribe(f"emotion/v1/{node}/desk/event", qos=1)
            await client.subscribe(f"answers/{node}", qos=1)
            await client.subscribe(f"emotion/v1/{node}/response", qos=1)
            await sink.start()
            await sink.connected.wait()
            sink.send(make_event("desk", 0, node))
            asked = Properties(PacketTypes.PUBLISH)
            asked.ResponseTopic, asked.CorrelationData = f"answers/{node}", b"42"
            await asyncio.sleep(0.3)  # the sink subscribes to its request topic right after connecting
            await client.publish(f"emotion/v1/{node}/request", "{}", qos=1, properties=asked)
            await client.publish(f"emotion/v1/{node}/request", "{}", qos=1)  # no response topic: …/response
            got = {}
            async with asyncio.timeout(10):
                async for message in client.messages:
                    got[str(message.topic)] = message
                    if len(got) == 3:
                        break
        event = got[f"emotion/v1/{node}/desk/event"].properties
        assert event.ContentType == "application/json" and 0 < event.MessageExpiryInterval <= 3600
        assert ("schema", SCHEMA_ID) in event.UserProperty and ("asr", "a") in event.UserProperty
        answer = got[f"answers/{node}"]
        assert answer.properties.CorrelationData == b"42"
        body = json.loads(answer.payload)
        assert body["streams"]["desk"] == {"queued": 2} and body["health"]["streams"] >= 1
        assert json.loads(got[f"emotion/v1/{node}/response"].payload)["node"] == node
    finally:
        HEALTH.queues.pop("desk", None)
        await sink.close()
        await clear_node(node)


def test_the_device_links_to_the_dashboard_of_run():
    assert _page_url("127.0.0.1:8765") == "http://127.0.0.1:8765/"
    assert _page_url("0.0.0.0:8765") == f"http://{socket.getfqdn()}:8765/"  # reachable from Home Assistant
