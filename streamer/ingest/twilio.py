"""Twilio Media Streams: JSON text messages over WebSocket, base64 μ-law 8 kHz audio per track.

`connected`, then `start` (callSid, tracks, mediaFormat, customParameters), then `media` messages for the
`inbound` (caller → role customer) and `outbound` (→ agent) tracks, `dtmf`/`mark`, and `stop`. The token may
come as a `<Parameter name="token">` (Twilio drops query strings from stream URLs), a Bearer header or `?token=`.
Unknown event types are logged and skipped (Twilio adds events over time); malformed ones end the call.
"""

from __future__ import annotations

import base64
import binascii
import logging

from websockets.asyncio.server import ServerConnection

from streamer.audio import ulaw_to_pcm16
from streamer.ingest.calls import Call, CallHub, ProtocolError
from streamer.ingest.websocket import authorise, json_object, receive, run_call

log = logging.getLogger(__name__)

TRACKS = ("inbound", "outbound")


def _field(message: dict, key: str, kind: type, what: str):
    value = message.get(key)
    if not isinstance(value, kind):
        raise ProtocolError(f"{what}: missing or invalid {key!r}")
    return value


async def _open(hub: CallHub, ws: ServerConnection) -> tuple[Call, object]:
    while True:  # `connected` (and anything before `start`) carries no audio
        message = json_object(await receive(ws, None, hub.opts.idle_s), "Twilio handshake")
        if message.get("event") == "start":
            break
        if message.get("event") != "connected":
            raise ProtocolError(f"expected connected/start, got event {message.get('event')!r}")
    start = _field(message, "start", dict, "start")
    parameters = start.get("customParameters") or {}
    authorise(hub, ws, parameters.get("token") if isinstance(parameters, dict) else None)
    media_format = start.get("mediaFormat") or {}
    encoding = media_format.get("encoding", "audio/x-mulaw")
    if encoding != "audio/x-mulaw" or media_format.get("channels", 1) != 1:
        raise ProtocolError(f"unsupported mediaFormat {media_format} (Twilio sends mono audio/x-mulaw)")
    rate = media_format.get("sampleRate", 8000)
    if not isinstance(rate, int) or not 1000 <= rate <= 48_000:
        raise ProtocolError(f"unsupported sampleRate {rate!r}")
    tracks = start.get("tracks") or ["inbound"]
    if not isinstance(tracks, list) or not tracks or any(t not in TRACKS for t in tracks):
        raise ProtocolError(f"tracks must be a list of {', '.join(TRACKS)}, got {tracks!r}")
    stream_sid = message.get("streamSid") or start.get("streamSid")
    metadata = {"streamSid": stream_sid, "accountSid": start.get("accountSid")}
    if isinstance(parameters, dict):
        metadata["customParameters"] = {k: v for k, v in parameters.items() if k != "token"}
    call = hub.open(start.get("callSid") or stream_sid, "twilio", tracks, metadata)
    return call, _feed(call, ws, rate)


async def _feed(call: Call, ws: ServerConnection, rate: int) -> str:
    while True:
        message = json_object(await receive(ws, call, call.hub.opts.idle_s), "Twilio message")
        event = message.get("event")
        if event == "media":
            media = _field(message, "media", dict, "media")
            try:
                payload = base64.b64decode(_field(media, "payload", str, "media"), validate=True)
            except binascii.Error as e:
                raise ProtocolError(f"media payload is not valid base64 ({e})") from e
            call.push(media.get("track", "inbound"), ulaw_to_pcm16(payload), rate)
        elif event == "stop":
            return "hangup"
        elif event in ("dtmf", "mark", "connected"):
            continue
        elif event == "start":
            raise ProtocolError("a second start message within the stream")
        else:
            log.warning("call %s: skipped unknown Twilio event %r", call.call_id, event)


async def handle(hub: CallHub, ws: ServerConnection) -> None:
    await run_call(hub, ws, lambda: _open(hub, ws))
