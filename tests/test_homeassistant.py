"""MQTT conventions for dashboards and Home Assistant, checked on the real Mosquitto: retained last state,
discovery (announced, re-sent when HA comes online, removed when the stream ends), v5 properties, requests."""

import asyncio
import json
import uuid

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamer.event import SCHEMA_ID, state_topic, status_topic
from streamer.homeassistant import discovery_topic
from streamer.metrics import HEALTH
from streamer.publisher import MqttOptions, MqttSink
from tests.conftest import make_event
from tests.test_publisher import clear_retained

V5 = aiomqtt.ProtocolVersion.V5


async def retained(topic: str, wait: float = 1.0) -> dict[str, bytes]:
    """What a newly connecting subscriber gets at once: the retained messages under `topic`."""
    got = {}
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"late-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(wait):
                async for message in client.messages:
                    if message.retain:
                        got[str(message.topic)] = message.payload
        except TimeoutError:
            pass
    return got


async def settle(sink: MqttSink) -> None:
    async with asyncio.timeout(10):
        while sink.spool.size() or sink._dirty:
            await asyncio.sleep(0.05)


async def test_discovery_and_last_state_follow_the_stream(broker):
    node = f"ha{uuid.uuid4().hex[:6]}"
    sink = MqttSink(MqttOptions(spool="memory", health_interval_s=0), "mqtt://127.0.0.1:1883", node)
    await sink.start()
    config_topic = discovery_topic("homeassistant", node, "desk")
    try:
        sink.stream_started("desk", None, None)
        event = make_event("desk", 0, node)
        sink.send(event)
        await settle(sink)
        got = await retained(f"emotion/v1/{node}/#") | await retained(config_topic)
        state = json.loads(got[state_topic(node, "desk")])
        assert state["label"] == "anger" and state["stream"] == "desk"
        assert set(state["scores"]) == set(event.emotion.scores)
        config = json.loads(got[config_topic])
        assert config["state_topic"] == state_topic(node, "desk") and config["availability_topic"] == status_topic(node)
        assert config["value_template"] == "{{ value_json.label }}" and config["device"]["identifiers"]
        assert config["unique_id"] == f"emotion_monitor_{node}_desk"

        async with aiomqtt.Client("127.0.0.1", 1883) as client:  # Home Assistant restarts
            await client.subscribe(config_topic, qos=1)
            await client.publish("homeassistant/status", "online", qos=1)
            async with asyncio.timeout(10):
                async for message in client.messages:
                    if not message.retain:  # the re-sent config, not the retained copy we got on subscribing
                        assert json.loads(message.payload)["unique_id"] == config["unique_id"]
                        break

        sink.stream_ended("desk", None, None)
        await settle(sink)
        assert config_topic not in await retained(config_topic)  # sensor removed
        assert state_topic(node, "desk") in await retained(f"emotion/v1/{node}/#")  # its last state stays
    finally:
        await sink.close()
        for topic in (state_topic(node, "desk"), status_topic(node), config_topic):
            await clear_retained("127.0.0.1", 1883, topic)


async def test_call_tracks_get_no_sensor_and_leave_no_state(broker):
    node = f"ha{uuid.uuid4().hex[:6]}"
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
        sink.stream_ended("c1/customer", "c1", "customer")
        await settle(sink)
        assert set(await retained(f"emotion/v1/{node}/#")) == {status_topic(node)}
        assert not await retained(f"homeassistant/sensor/{node}/#")
    finally:
        await sink.close()
        await clear_retained("127.0.0.1", 1883, status_topic(node))


async def test_v5_properties_and_the_request_topic(broker):
    node = f"v5{uuid.uuid4().hex[:6]}"
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
        await clear_retained("127.0.0.1", 1883, status_topic(node))
        await clear_retained("127.0.0.1", 1883, state_topic(node, "desk"))
