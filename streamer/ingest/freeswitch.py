"""FreeSWITCH mod_audio_fork: a WebSocket (subprotocol `audio.drachtio.org`), the metadata JSON as the first
text message, then binary L16 frames (signed 16-bit little-endian).

mod_audio_fork does not put the rate or the mix in the stream, so we read them from the metadata the dialplan
passes (`uuid_audio_fork <uuid> start ws://host:port <mix> <rate> '{"callId":"<uuid>","mixType":"stereo",
"sampleRate":16000}'`) or from the URL query (`?mix=stereo&rate=16000&call_id=…`); default mono 8 kHz.
Mono carries the caller (role customer), `mixed` both voices in one channel (role mixed), `stereo` the caller
on the left and the callee (agent) on the right.
"""

from __future__ import annotations

import logging

import numpy as np
from websockets.asyncio.server import ServerConnection

from streamer.ingest.calls import Call, CallHub, ProtocolError
from streamer.ingest.websocket import authorise, json_object, query, receive, run_call

log = logging.getLogger(__name__)

SUBPROTOCOL = "audio.drachtio.org"
MIXES = {"mono": ["caller"], "mixed": ["mixed"], "stereo": ["caller", "callee"]}


def _setting(metadata: dict, url: dict[str, str], names: tuple[str, ...], default: object) -> object:
    for name in names:
        if metadata.get(name) is not None:
            return metadata[name]
    return next((url[name] for name in names if name in url), default)


async def _open(hub: CallHub, ws: ServerConnection) -> tuple[Call, object]:
    metadata = json_object(await receive(ws, None, hub.opts.idle_s), "metadata (first message)")
    authorise(hub, ws, metadata.get("token"))
    url = query(ws)
    mix = str(_setting(metadata, url, ("mixType", "mix_type", "mix"), "mono")).lower()
    if mix not in MIXES:
        raise ProtocolError(f"mix {mix!r} is not one of {', '.join(MIXES)}")
    try:
        rate = int(_setting(metadata, url, ("sampleRate", "sample_rate", "rate"), 8000))
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"sample rate is not a number ({e})") from e
    if not 8000 <= rate <= 48_000:
        raise ProtocolError(f"sample rate {rate} Hz is outside 8000..48000")
    call_id = _setting(metadata, url, ("callId", "call_id", "uuid"), None)
    shown = {k: v for k, v in metadata.items() if k != "token"}
    call = hub.open(str(call_id) if call_id else None, "freeswitch", MIXES[mix], shown)
    return call, _feed(call, ws, MIXES[mix], rate)


async def _feed(call: Call, ws: ServerConnection, channels: list[str], rate: int) -> str:
    width = 2 * len(channels)
    while True:
        message = await receive(ws, call, call.hub.opts.idle_s)
        if isinstance(message, str):
            log.debug("call %s: text message ignored: %.200s", call.call_id, message)
            continue
        if len(message) % width:
            raise ProtocolError(f"audio frame of {len(message)} bytes is not whole {len(channels)}-channel L16 samples")
        pcm = np.frombuffer(message, dtype="<i2").reshape(-1, len(channels))
        for index, channel in enumerate(channels):
            call.push(channel, pcm[:, index], rate)


async def handle(hub: CallHub, ws: ServerConnection) -> None:
    await run_call(hub, ws, lambda: _open(hub, ws))
