"""Deleting what made-up nodes left retained on a broker.

Benchmarks and tests name their own nodes; the statuses, health, last states and Home Assistant discovery configs
those nodes retain would otherwise stay on the broker and show up as offline nodes on every dashboard (and as
devices in Home Assistant) connected to it. Only topics with one of the given names in them are touched, never the
whole broker. Synchronous (paho, its own network thread): a `finally` can run it even while Ctrl-C is cancelling
an event loop, where an `await` would be cancelled too.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Collection, Iterator

import paho.mqtt.client as mqtt

from streamer.publisher import MqttOptions, parse_broker_url, tls_context

LOCAL = "mqtt://127.0.0.1:1883"
_SWEEP_TOPIC = "emotion-monitor/sweep"  # a non-retained sentinel: the broker has sent every retained message


def retained_under(names: Collection[str], url: str = LOCAL, timeout: float = 10.0) -> dict[str, bytes]:
    """The retained messages whose topic has one of `names` in it (none if the broker is down). Subscribing to `#`
    finds them wherever the code put them (`worker-<node>`, a Home Assistant prefix); a sentinel published after
    the subscription says when the broker has sent them all, instead of a fixed wait."""
    if not names:
        return {}
    found: dict[str, bytes] = {}
    subscribed, done = threading.Event(), threading.Event()
    sentinel = f"{_SWEEP_TOPIC}/{uuid.uuid4().hex}"

    def on_message(_client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == sentinel:
            done.set()
        elif message.retain and message.payload and any(name in message.topic for name in names):
            found[message.topic] = message.payload

    try:
        client = _connect(url)
    except OSError:
        return {}
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.loop_start()
    try:
        client.subscribe("#", qos=0)  # QoS 0: delivered in order, so the sentinel comes after the retained ones
        if not subscribed.wait(timeout):
            raise TimeoutError(f"{url} did not acknowledge the subscription to #")
        client.publish(sentinel, b"end", qos=0)
        if not done.wait(timeout):
            raise TimeoutError(f"the sentinel did not come back from {url}")
    finally:
        client.disconnect()
        client.loop_stop()
    return found


def clear_retained_under(names: Collection[str], url: str = LOCAL, timeout: float = 10.0) -> list[str]:
    """Delete (an empty retained message) everything retained under `names`; the topics deleted."""
    topics = sorted(retained_under(names, url, timeout))
    if topics:
        client = _connect(url)
        client.loop_start()
        try:
            for topic in topics:
                client.publish(topic, b"", qos=1, retain=True).wait_for_publish(timeout)
        finally:
            client.disconnect()
            client.loop_stop()
    return topics


@contextlib.contextmanager
def cleared_after(names: Collection[str], url: str = LOCAL) -> Iterator[None]:
    """Whatever `names` retain is deleted when the block ends, however it ends (an error, Ctrl-C). Stop the
    processes and sinks of those nodes inside the block: what they publish after the sweep stays."""
    try:
        yield
    finally:
        clear_retained_under(names, url)


def _connect(url: str) -> mqtt.Client:
    """A client of its own (a node's client id would disconnect the node), with the URL's credentials and TLS."""
    address = parse_broker_url(url, MqttOptions())
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"emotion-monitor-sweep-{uuid.uuid4().hex[:8]}")
    if address.username:
        client.username_pw_set(address.username, address.password)
    if context := tls_context(address, MqttOptions()):
        client.tls_set_context(context)
    client.connect(address.host, address.port)
    return client
