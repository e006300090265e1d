"""What the WebSocket protocols (Twilio, FreeSWITCH) share: the listener, the token, reading with limits."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from streamer.ingest.calls import Call, CallEnded, CallHub, CallRejected, ProtocolError

log = logging.getLogger(__name__)


def query(ws: ServerConnection) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(ws.request.path if ws.request else "").query).items()}


def request_token(ws: ServerConnection) -> str | None:
    """The token from `Authorization: Bearer …` or `?token=…`; None when the request carries none."""
    auth = ws.request.headers.get("Authorization", "") if ws.request else ""
    if auth.startswith("Bearer "):
        return auth.removeprefix("Bearer ").strip()
    return query(ws).get("token")


async def receive(ws: ServerConnection, call: Call | None, timeout: float) -> str | bytes:
    """The next message; before a call exists, within `timeout`; after, within the call's idle/duration limits."""
    try:
        return await (call.read(ws.recv()) if call else asyncio.wait_for(ws.recv(), timeout))
    except ConnectionClosed as e:
        if e.sent is not None and e.sent.code == CloseCode.MESSAGE_TOO_BIG:
            raise ProtocolError("message larger than max_frame_bytes") from e
        normal = e.rcvd is not None and e.rcvd.code == CloseCode.NORMAL_CLOSURE  # FreeSWITCH's way to hang up
        raise CallEnded("hangup" if normal else "disconnected") from e


def json_object(message: str | bytes, what: str) -> dict:
    if isinstance(message, bytes):
        raise ProtocolError(f"{what}: expected a JSON text message, got {len(message)} binary bytes")
    try:
        value = json.loads(message)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"{what}: not JSON ({e})") from e
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


async def refuse(ws: ServerConnection, code: CloseCode, reason: str) -> None:
    log.warning("%s connection from %s refused: %s", ws.request.path if ws.request else "?", ws.remote_address, reason)
    await ws.close(code, reason[:120])


async def run_call(hub: CallHub, ws: ServerConnection, opener: Callable[[], Awaitable[tuple[Call, Awaitable[str]]]]):
    """Open a call with `opener` (the protocol's handshake: returns the call and its message loop), follow it
    to its end and close the socket with the outcome; a refused handshake opens no call."""
    try:
        call, messages = await opener()
    except CallRejected as e:
        return await refuse(ws, CloseCode.TRY_AGAIN_LATER, str(e))
    except (ProtocolError, CallEnded, TimeoutError) as e:
        return await refuse(ws, CloseCode.POLICY_VIOLATION, str(e) or "no handshake in time")
    _, error = await call.follow(messages)
    await ws.close(CloseCode.PROTOCOL_ERROR if error else CloseCode.NORMAL_CLOSURE, (error or "")[:120])


def authorise(hub: CallHub, ws: ServerConnection, in_band: object) -> None:
    offered = request_token(ws) or (in_band if isinstance(in_band, str) else None)
    if not hub.opts.token_ok(offered):
        raise ProtocolError("missing token" if offered is None else "wrong token")


async def listen(hub: CallHub, host: str, port: int, handler, subprotocols: list[str] | None = None) -> Server:
    return await serve(
        lambda ws: handler(hub, ws),
        host,
        port,
        max_size=hub.opts.max_frame_bytes,
        # offer the protocol's subprotocol, but also take clients that ask for none
        select_subprotocol=lambda _, offered: next((p for p in offered if p in (subprotocols or [])), None),
        ping_interval=20,
    )
