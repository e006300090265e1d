"""The embedded demo: Spanish sentences of different emotions spoken by espeak-ng, separated by pauses.

It lets the first README command show the whole chain on a machine with no microphone.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from streamer.audio import AudioError, load_audio
from streamer.frames import SAMPLE_RATE
from streamer.models import cache_dir

DEMO_SENTENCES = (  # chosen so that Whisper base still understands espeak-ng's voice
    "Buenos días, quiero consultar el estado de mi pedido.",
    "Estoy muy enfadado, nadie me ayuda y quiero una solución ahora mismo.",
    "Muchas gracias, estoy muy contento con el servicio.",
    "Tengo mucho miedo de perder todo mi dinero.",
    "Estoy muy triste, hoy es un día muy malo para mí.",
    "Es horrible, me da mucho asco.",
)


def speak(text: str, voice: str = "es", speed: int = 130) -> np.ndarray:
    """Synthesise `text` with espeak-ng; 16 kHz mono float32."""
    if not shutil.which("espeak-ng"):
        raise AudioError("espeak-ng is not installed (apt-get install espeak-ng); use --source file:PATH instead")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True, capture_output=True
        )
        return load_audio(wav)


def demo_audio_path(sentences: tuple[str, ...] = DEMO_SENTENCES, pause_s: float = 1.2) -> Path:
    """Write (once) and return the demo WAV in the cache dir."""
    key = hashlib.sha256(repr((sentences, pause_s)).encode()).hexdigest()[:12]
    path = cache_dir() / f"demo-es-{key}.wav"
    if not path.is_file():
        pause = np.zeros(int(pause_s * SAMPLE_RATE), np.float32)
        parts = [pause]
        for sentence in sentences:
            parts += [speak(sentence), pause]
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.concatenate(parts), SAMPLE_RATE, subtype="PCM_16")
    return path
