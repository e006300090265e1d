"""Audio sources: microphone (PyAudio), files (real time or as fast as possible) and raw PCM on stdin.

Each source is an async iterator of `AudioChunk` (16 kHz mono float32). Blocking reads run in a thread so
the event loop, and the other streams, never wait on a device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from streamer.audio import AudioError, StreamConditioner, load_audio
from streamer.frames import SAMPLE_RATE, AudioChunk

log = logging.getLogger(__name__)

CHUNK_S = 0.032  # one VAD window, judged as soon as it arrives (64 ms chunks: p50 +14 ms in one run on UEM speech)


class SourceError(RuntimeError):
    """A source that cannot be opened or read, with what exists instead."""


class FileSource:
    """A decoded file, played in real time (like a live stream) or as fast as the pipeline takes it."""

    def __init__(self, path: str | Path, realtime: bool = True) -> None:
        self.path, self.realtime = Path(path), realtime
        self.name = f"file:{self.path}"
        self.started = 0.0  # monotonic time of the first sample, once playing

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        audio = await asyncio.to_thread(load_audio, self.path)
        if len(audio) == 0:
            raise AudioError(f"{self.path}: no samples")
        step = int(CHUNK_S * SAMPLE_RATE)
        t0 = self.started = time.monotonic()
        for i in range(0, len(audio), step):
            piece = audio[i : i + step]
            if self.realtime:
                due = t0 + (i + len(piece)) / SAMPLE_RATE
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            else:
                await asyncio.sleep(0)
            yield AudioChunk(piece, time.monotonic())


class StdinSource:
    """Signed 16-bit little-endian PCM on a byte stream (stdin by default), mono or interleaved channels."""

    def __init__(self, rate: int = SAMPLE_RATE, channels: int = 1, stream: BinaryIO | None = None) -> None:
        self._condition = StreamConditioner(rate, channels)
        self.rate, self.channels = rate, channels
        self._stream = stream
        self.name = "stdin"

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        stream = self._stream or sys.stdin.buffer
        frame_bytes = 2 * self.channels
        block = int(CHUNK_S * self.rate) * frame_bytes
        leftover = b""
        while True:
            data = await asyncio.to_thread(stream.read1 if hasattr(stream, "read1") else stream.read, block)
            if not data:
                break
            data = leftover + data
            usable = len(data) - len(data) % frame_bytes
            leftover = data[usable:]
            if usable:
                pcm = np.frombuffer(data[:usable], dtype="<i2")
                yield AudioChunk(self._condition(pcm), time.monotonic())
        if leftover:
            log.warning("stdin ended with %d stray bytes (not a whole sample frame); ignored", len(leftover))
        tail = self._condition(np.zeros(0, "<i2"), last=True)
        if len(tail):
            yield AudioChunk(tail, time.monotonic())


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    channels: int
    rate: int


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """PortAudio/ALSA print pages of probing noise to fd 2 while enumerating; hide it."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _pyaudio():
    try:
        import pyaudio
    except ImportError as e:
        raise SourceError(
            "microphone input needs PyAudio: install the system package portaudio19-dev, "
            "then `pip install 'emotion-monitor[mic]'`"
        ) from e
    with _quiet_stderr():
        return pyaudio, pyaudio.PyAudio()


def list_input_devices() -> list[InputDevice]:
    try:
        _, pa = _pyaudio()
    except SourceError:
        return []
    try:
        devices = []
        for i in range(pa.get_device_count()):
            info = pa.get_device_info_by_index(i)
            if int(info.get("maxInputChannels", 0)) > 0:
                devices.append(
                    InputDevice(i, str(info["name"]), int(info["maxInputChannels"]), int(info["defaultSampleRate"]))
                )
        return devices
    finally:
        pa.terminate()


def _describe(devices: list[InputDevice]) -> str:
    return ", ".join(f"{d.index}: {d.name}" for d in devices) or "none"


def find_input_device(spec: str | None, devices: list[InputDevice]) -> InputDevice:
    """The device named by index or by (part of) its name; the first input device when `spec` is empty."""
    if not devices:
        raise SourceError("no audio input device found (is a microphone connected and allowed?)")
    if not spec:
        return devices[0]
    if spec.isdigit():
        match = [d for d in devices if d.index == int(spec)]
    else:
        match = [d for d in devices if spec.lower() in d.name.lower()]
    if not match:
        raise SourceError(f"no input device matches {spec!r}; available: {_describe(devices)}")
    return match[0]


class MicSource:
    """A PyAudio input device, read at its native rate in a thread and conditioned to 16 kHz mono."""

    def __init__(self, device: str | None = None) -> None:
        self.spec = device
        self.device = find_input_device(device, list_input_devices())
        self.name = f"mic:{self.device.name}"

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        pyaudio, pa = _pyaudio()
        rate, channels = self.device.rate, min(self.device.channels, 2)
        frames = int(CHUNK_S * rate)
        conditioner = StreamConditioner(rate, channels)
        try:
            with _quiet_stderr():
                stream = pa.open(
                    format=pyaudio.paInt16,
                    channels=channels,
                    rate=rate,
                    input=True,
                    input_device_index=self.device.index,
                    frames_per_buffer=frames,
                )
        except OSError as e:
            pa.terminate()
            raise SourceError(
                f"cannot open input device {self.device.index} ({self.device.name}): {e}; "
                f"available: {_describe(list_input_devices())}"
            ) from e
        try:
            while True:
                try:
                    data = await asyncio.to_thread(stream.read, frames, False)
                except OSError as e:
                    raise SourceError(f"microphone {self.device.name} stopped delivering audio: {e}") from e
                yield AudioChunk(conditioner(np.frombuffer(data, dtype="<i2")), time.monotonic())
        finally:
            stream.stop_stream()
            stream.close()
            pa.terminate()


Source = FileSource | StdinSource | MicSource


def open_source(spec: str, *, realtime: bool = True, rate: int = SAMPLE_RATE, channels: int = 1) -> Source:
    """`mic[:DEVICE]`, `file:PATH` or `stdin` (see the CLI)."""
    kind, _, arg = spec.partition(":")
    if kind == "mic":
        return MicSource(arg or None)
    if kind == "file":
        if not arg:
            raise SourceError("file: needs a path, e.g. file:speech.wav")
        return FileSource(arg, realtime=realtime)
    if kind == "stdin":
        return StdinSource(rate=rate, channels=channels)
    raise SourceError(f"unknown source {spec!r}: use mic[:DEVICE], file:PATH or stdin")
