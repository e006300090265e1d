"""Asterisk AudioSocket over TCP: `[type u8][length u16 BE][payload]` frames, the call UUID first.

Dialplan `AudioSocket(<uuid>,<host>:<port>)` streams the channel's audio (8 kHz slin, type 0x10; other rates
use 0x11–0x16) until hangup. One connection is one call with one track: the caller (channel `inbound`, role
`customer` by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import uuid

import numpy as np

from streamer.ingest.calls import Call, CallEnded, CallHub, CallRejected, ProtocolError

log = logging.getLogger(__name__)

HANGUP, UUID, DTMF, ERROR = 0x00, 0x01, 0x03, 0xFF
AUDIO_RATES = {0x10: 8_000, 0x11: 12_000, 0x12: 16_000, 0x13: 24_000, 0x14: 32_000, 0x15: 44_100, 0x16: 48_000}
ERROR_CODES = {0x01: "caller hung up", 0x02: "forwarding error", 0x04: "memory error"}
CHANNEL = "inbound"


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BH", kind, len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> tuple[int, bytes]:
    header = await _read(reader, 3, between_frames=True)
    kind, length = struct.unpack(">BH", header)
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds max_frame_bytes {max_bytes}")
    return kind, await _read(reader, length, between_frames=False) if length else b""


async def _read(reader: asyncio.StreamReader, n: int, between_frames: bool) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        if between_frames and not e.partial:
            raise CallEnded("disconnected") from e  # closed cleanly between frames, but without a hangup frame
        raise ProtocolError(f"connection closed inside a frame ({len(e.partial)} of {n} bytes)") from e
    except ConnectionError as e:
        raise CallEnded("disconnected") from e


def _pcm(payload: bytes) -> np.ndarray:
    if len(payload) % 2:
        raise ProtocolError(f"audio frame has an odd number of bytes ({len(payload)}); slin is 16-bit")
    return np.frombuffer(payload, dtype="<i2")


async def _feed(call: Call, reader: asyncio.StreamReader) -> str:
    while True:
        kind, payload = await call.read(read_frame(reader, call.hub.opts.max_frame_bytes))
        if kind in AUDIO_RATES:
            call.push(CHANNEL, _pcm(payload), AUDIO_RATES[kind])
        elif kind == HANGUP:
            return "hangup"
        elif kind == DTMF:
            log.debug("call %s: DTMF %r", call.call_id, payload.decode("ascii", "replace"))
        elif kind == ERROR:
            code = payload[0] if payload else 0
            if code == 0x01:
                return "hangup"
            raise ProtocolError(f"Asterisk reported error 0x{code:02x} ({ERROR_CODES.get(code, 'unknown')})")
        elif kind == UUID:
            raise ProtocolError("a second UUID frame within the call")
        else:
            raise ProtocolError(f"unknown frame type 0x{kind:02x}")


async def _handle(hub: CallHub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = "{}:{}".format(*writer.get_extra_info("peername")[:2])
    try:
        try:
            kind, payload = await asyncio.wait_for(read_frame(reader, hub.opts.max_frame_bytes), hub.opts.idle_s)
            if kind != UUID or len(payload) != 16:
                raise ProtocolError(f"first frame must be the 16-byte call UUID (type 0x01), got type 0x{kind:02x}")
            call = hub.open(str(uuid.UUID(bytes=payload)), "audiosocket", [CHANNEL], {"peer": peer})
        except (ProtocolError, CallEnded, CallRejected, TimeoutError) as e:
            log.warning("AudioSocket connection from %s refused: %s", peer, e or "no UUID frame in time")
            return
        reason, _ = await call.follow(_feed(call, reader))
        if reason not in ("hangup", "disconnected"):  # we end it: tell Asterisk to hang up the AudioSocket leg
            with contextlib.suppress(ConnectionError):
                writer.write(frame(HANGUP))
                await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve(hub: CallHub, host: str, port: int) -> asyncio.Server:
    return await asyncio.start_server(lambda r, w: _handle(hub, r, w), host, port)
