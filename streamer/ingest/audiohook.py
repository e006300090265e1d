"""Genesys Cloud AudioHook (protocol version 2): JSON control messages and binary audio over one WebSocket.

The client sends `open` (conversationId, participant, the media formats it offers); we answer `opened` with the
one we take (PCMU or L16, 8 kHz or more, the customer on the left `external` channel and the agent on the
right `internal` one), then audio arrives as binary frames. `ping` → `pong`, `pause` → `paused`, `resume` →
`resumed`, `close` → `closed`; every message we send carries our `seq` and the last `clientseq` we saw.
The token may come as `X-API-KEY` (what Genesys sends), a Bearer header or `?token=`.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from websockets.asyncio.server import ServerConnection

from streamer.audio import ulaw_to_pcm16
from streamer.ingest.calls import Call, CallHub, ProtocolError
from streamer.ingest.websocket import authorise, json_object, receive, run_call

log = logging.getLogger(__name__)

CHANNELS = ("external", "internal")
FORMATS = ("PCMU", "L16")
REPLIES = {"ping": "pong", "pause": "paused", "resume": "resumed"}


class Session:
    """Our side of the message sequence numbers."""

    def __init__(self, ws: ServerConnection, session_id: str) -> None:
        self.ws, self.id = ws, session_id
        self.seq = 0
        self.clientseq = 0

    def saw(self, message: dict) -> None:
        if isinstance(message.get("seq"), int):
            self.clientseq = message["seq"]

    async def send(self, kind: str, parameters: dict | None = None) -> None:
        self.seq += 1
        reply = {"version": "2", "type": kind, "seq": self.seq, "clientseq": self.clientseq, "id": self.id}
        await self.ws.send(json.dumps(reply | {"parameters": parameters or {}}))


def _choose(media: object) -> dict:
    """The first offered audio format we can take."""
    for offer in media if isinstance(media, list) else []:
        if (
            isinstance(offer, dict)
            and offer.get("type", "audio") == "audio"
            and offer.get("format") in FORMATS
            and isinstance(offer.get("rate"), int)
            and 8000 <= offer["rate"] <= 48_000
            and isinstance(offer.get("channels"), list)
            and offer["channels"]
            and all(c in CHANNELS for c in offer["channels"])
        ):
            return offer
    raise ProtocolError(f"no usable media offered (we take {'/'.join(FORMATS)}, external/internal): {media!r}")


async def _open(hub: CallHub, ws: ServerConnection) -> tuple[Call, object]:
    message = json_object(await receive(ws, None, hub.opts.idle_s), "AudioHook open")
    if message.get("type") != "open" or str(message.get("version")) != "2":
        raise ProtocolError(f"expected an AudioHook version 2 `open`, got {message.get('type')!r}")
    authorise(hub, ws, ws.request.headers.get("X-API-KEY") if ws.request else None)
    parameters = message.get("parameters")
    if not isinstance(parameters, dict):
        raise ProtocolError("open: missing parameters")
    media = _choose(parameters.get("media"))
    session = Session(ws, str(message.get("id", "")))
    session.saw(message)
    metadata = {k: parameters[k] for k in ("organizationId", "participant", "language") if k in parameters}
    call = hub.open(parameters.get("conversationId") or session.id or None, "audiohook", media["channels"], metadata)
    await session.send("opened", {"startPaused": False, "media": [media]})
    return call, _feed(call, session, media)


def _decode(frame: bytes, media: dict) -> np.ndarray:
    channels = len(media["channels"])
    width = channels * (1 if media["format"] == "PCMU" else 2)
    if len(frame) % width:
        raise ProtocolError(f"audio frame of {len(frame)} bytes is not whole {channels}-channel {media['format']}")
    pcm = ulaw_to_pcm16(frame) if media["format"] == "PCMU" else np.frombuffer(frame, dtype="<i2")
    return pcm.reshape(-1, channels)


async def _feed(call: Call, session: Session, media: dict) -> str:
    while True:
        message = await receive(session.ws, call, call.hub.opts.idle_s)
        if isinstance(message, bytes):
            pcm = _decode(message, media)
            for index, channel in enumerate(media["channels"]):
                call.push(channel, pcm[:, index], media["rate"])
            continue
        control = json_object(message, "AudioHook message")
        session.saw(control)
        kind = control.get("type")
        if kind in REPLIES:
            call.keep_alive()  # a paused or quiet call that still pings is not idle
            await session.send(REPLIES[kind])
        elif kind == "close":
            await session.send("closed")
            return "hangup"
        elif kind == "error":
            raise ProtocolError(f"the client reported an error: {control.get('parameters')!r}")
        elif kind not in ("update", "discarded", "event"):
            log.warning("call %s: skipped unknown AudioHook message type %r", call.call_id, kind)


async def handle(hub: CallHub, ws: ServerConnection) -> None:
    await run_call(hub, ws, lambda: _open(hub, ws))
