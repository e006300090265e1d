"""Call-center ingest: telephony protocols in, one call per connection, one stream per speaker.

- `calls.py`: what all protocols share (the hub, calls and their tracks, limits, summary, escalation).
- `audiosocket.py` (Asterisk, TCP); `twilio.py`, `freeswitch.py` and `audiohook.py` (Genesys), over WebSocket
  with the helpers in `websocket.py`.
"""

from __future__ import annotations

import logging
import socket

from streamer.ingest import audiohook, audiosocket, freeswitch, twilio
from streamer.ingest.calls import CallHub, IngestOptions
from streamer.ingest.websocket import listen

log = logging.getLogger(__name__)

PROTOCOLS = ("audiosocket", "twilio", "freeswitch", "audiohook")


def parse_listen(spec: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `PORT` (then 127.0.0.1: nothing is exposed unless asked)."""
    host, _, port = spec.rpartition(":")
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise ValueError(f"listen address {spec!r} must be HOST:PORT or PORT") from None


def check_listeners(opts: IngestOptions) -> None:
    """Bind each listener's address once and let it go, so that a port in use fails `serve` before it connects
    to the broker and publishes anything."""
    for protocol in PROTOCOLS:
        if spec := getattr(opts, protocol):
            host, port = parse_listen(spec)
            try:
                socket.create_server((host, port)).close()
            except OSError as e:
                raise OSError(f"{protocol} listener {host}:{port}: {e.strerror or e}") from None


async def start_listeners(hub: CallHub) -> list:
    """Start the servers named in `hub.opts` (audiosocket, twilio, freeswitch, audiohook); returns them for closing."""
    servers = []
    for protocol in PROTOCOLS:
        spec = getattr(hub.opts, protocol)
        if not spec:
            continue
        host, port = parse_listen(spec)
        if protocol == "audiosocket":
            server = await audiosocket.serve(hub, host, port)
        elif protocol == "freeswitch":
            server = await listen(hub, host, port, freeswitch.handle, [freeswitch.SUBPROTOCOL])
        else:
            server = await listen(hub, host, port, twilio.handle if protocol == "twilio" else audiohook.handle)
        servers.append(server)
        log.info("%s ingest listening on %s:%d", protocol, host, port)
    return servers
