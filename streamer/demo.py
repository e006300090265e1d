"""The embedded demo: Spanish sentences of different emotions spoken by espeak-ng, separated by pauses.

It lets the first README command show the whole chain on a machine with no microphone.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from streamer.audio import AudioError, load_audio
from streamer.frames import SAMPLE_RATE
from streamer.models import cache_dir

DEMO_SENTENCES = (
    "Buenos días, le llamo para consultar el estado de mi pedido.",
    "¡Estoy harto! Es la tercera vez que llamo y nadie me soluciona nada. ¡Es inaceptable!",
    "Qué alegría, por fin ha llegado el paquete. ¡Muchísimas gracias, estoy encantado!",
    "Me da mucho miedo que vuelva a pasar, tengo terror de perder todo mi dinero.",
    "Lo siento mucho, mi madre murió la semana pasada y estoy muy triste.",
    "Qué asco, la comida estaba podrida y olía fatal.",
)


def speak(text: str, voice: str = "es", speed: int = 150) -> np.ndarray:
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
    path = cache_dir() / "demo-es.wav"
    if not path.is_file():
        pause = np.zeros(int(pause_s * SAMPLE_RATE), np.float32)
        parts = [pause]
        for sentence in sentences:
            parts += [speak(sentence), pause]
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.concatenate(parts), SAMPLE_RATE, subtype="PCM_16")
    return path
