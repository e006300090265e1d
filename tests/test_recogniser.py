import shutil

import numpy as np
import pytest

from streamer.frames import SAMPLE_RATE, Transcript, Utterance
from streamer.models import ModelFileError, whisper_base_dir
from streamer.recogniser import (
    Recogniser,
    RecogniserOptions,
    compression_ratio,
    for_one_stream,
    guard,
    language_code,
)
from tests.conftest import NEUTRAL_ES, silence


def utterance(audio: np.ndarray, speech_s: float | None = None) -> Utterance:
    return Utterance.whole(audio, "t", speech_s)


@pytest.fixture(scope="module")
def recogniser():
    return Recogniser(RecogniserOptions(language="es"))


def test_spanish_speech_is_transcribed_with_one_encoder_pass(recogniser, speak):
    audio = np.concatenate([silence(0.3), speak("Buenos días, quiero consultar el estado de mi pedido"), silence(0.3)])
    t = recogniser.recognise(utterance(audio))
    words = t.text.lower()
    assert t.rejected is None
    assert sum(w in words for w in ("buenos", "días", "consultar", "pedido")) >= 3, t.text
    assert t.language == "es"
    # the encoder frames kept for the voice head cover exactly the utterance (20 ms each)
    assert t.encoder_frames.shape == (int(np.ceil(len(audio) / 320)), 512)
    assert t.encode_ms > 0 and t.decode_ms > 0


def test_language_is_detected_by_default(speak):
    english = Recogniser()
    t = english.recognise(utterance(speak("Good morning, I would like to check the status of my order", "en")))
    assert t.language == "en"
    assert "order" in t.text.lower()


def test_silence_and_noise_give_no_text(recogniser, pink_noise):
    for audio, speech_s in ((silence(2.0), 0.0), (pink_noise, 0.0)):
        t = recogniser.recognise(utterance(audio, speech_s))
        assert t.text == ""
        assert t.rejected is not None


def test_long_audio_is_recognised_in_30_s_pieces(recogniser, speak):
    audio = np.concatenate([np.concatenate([speak(s), silence(0.8)]) for s in NEUTRAL_ES])
    assert len(audio) > 30 * SAMPLE_RATE
    t = recogniser.recognise(utterance(audio))
    assert t.encoder_frames.shape[0] == int(np.ceil(len(audio) / 320))
    text = t.text.lower()
    assert "tren" in text and "parque" in text, t.text  # words from the first and the second piece


def test_an_unknown_language_is_refused_with_the_valid_codes():
    assert language_code("auto") is None and language_code(None) is None and language_code("en") == "en"
    with pytest.raises(ValueError, match=r"unknown language 'english': use auto or a Whisper code: af, .*\ben\b"):
        language_code("english")


def test_guard_rules():
    opts = RecogniserOptions()
    assert guard("", 0.0, 0.0, 2.0, opts) == "empty"
    assert guard("hola", 0.0, -0.2, 0.0, opts) == "no_vad_speech"
    assert guard("hola", 0.9, -1.5, 2.0, opts) == "no_speech"
    assert guard("tú, " * 40, 0.1, -0.3, 10.0, opts) == "repetition"
    assert guard("una frase muy larga que no cabe en medio segundo de voz", 0.1, -0.3, 0.5, opts) == (
        "longer_than_speech"
    )
    assert guard("hola, buenos días", 0.1, -0.3, 1.5, opts) is None
    assert compression_ratio("abc") < compression_ratio("abc" * 50)


def test_model_files_are_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOTION_MONITOR_CACHE", str(tmp_path))
    target = whisper_base_dir()  # joined from the two PyPI parts
    assert (target / "model.bin").stat().st_size == 145_217_607
    with open(target / "model.bin", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ModelFileError, match="SHA-256"):
        whisper_base_dir()
    shutil.rmtree(target)


def test_any_local_model_directory_can_be_configured(speak):
    custom = Recogniser(RecogniserOptions(model=str(whisper_base_dir())))
    assert custom.model_id == str(whisper_base_dir())
    assert "gracias" in custom.recognise(utterance(speak("Muchas gracias por todo."))).text.lower()
    for missing in ("large-v3", "/no/such/model"):
        with pytest.raises(ModelFileError, match="nothing is downloaded"):
            Recogniser(RecogniserOptions(model=missing))


def test_a_batch_of_streams_gives_what_each_utterance_gives_alone(recogniser, speak, pink_noise):
    """Batched recognition (one encoder and one decoder call for several streams) changes no result."""
    long = np.concatenate(
        [
            speak("El tren de las ocho llega siempre con retraso."),
            silence(29.0),
            speak("Hoy hace mucho calor en la ciudad."),
        ]
    )
    items = [
        (utterance(speak("Buenos días, quiero consultar el estado de mi pedido")), True),
        (utterance(speak("Estoy harto de esperar")), False),  # voice only: encoded, not decoded
        (utterance(pink_noise, 0.0), True),
        (utterance(long), True),
    ]  # two pieces, one in the 30 s group and one in the 10 s group
    batched = recogniser.recognise_batch(items)
    for (u, decode), together in zip(items, batched, strict=True):
        alone = recogniser.recognise(u, decode)
        assert (together.text, together.rejected) == (alone.text, alone.rejected)
        assert together.encoder_frames.shape == alone.encoder_frames.shape
        assert np.allclose(together.encoder_frames, alone.encoder_frames, atol=0.05)
    assert batched[1].rejected == "overload" and batched[1].decode_ms == 0
    assert "consultar" in batched[0].text and "calor" in batched[3].text


def test_padding_extends_the_frames_and_a_guess_no_longer_wanted_is_not_decoded(recogniser, speak):
    """`pad_s` adds frames of the silence padding (same encoder input, same transcript); an item that is not
    `wanted` once encoded keeps its frames but is not decoded."""
    audio = speak("Buenos días, quiero consultar el estado de mi pedido")
    plain = utterance(audio)
    padded = Utterance(**{**plain.__dict__, "pad_s": 0.068})
    a, b = recogniser.recognise_batch([(plain, True), (padded, True)])
    assert b.encoder_frames.shape[0] == int(np.ceil((len(audio) + 0.068 * SAMPLE_RATE) / 320))
    assert np.allclose(a.encoder_frames, b.encoder_frames[: len(a.encoder_frames)], atol=0.05)
    assert a.text == b.text and "consultar" in a.text
    kept, dropped = recogniser.recognise_batch([(plain, True), (padded, True)], wanted=lambda i: i == 0)
    assert kept.text == a.text and kept.rejected is None
    assert (dropped.text, dropped.rejected, dropped.decode_ms) == ("", "superseded", 0)
    assert dropped.encoder_frames.shape == b.encoder_frames.shape


def test_one_stream_takes_one_replica_with_every_thread_unless_told():
    assert for_one_stream(RecogniserOptions(cpu_threads=4)).workers == 1
    assert for_one_stream(RecogniserOptions(workers=2)).workers == 2


def test_a_sentence_mark_ends_a_kept_transcript():
    """Only a kept text closed by . ? ! (or another script's mark) ends a sentence; "..." means it broke off."""
    frames = np.zeros((1, 512), np.float32)

    def ends(text: str, rejected: str | None = None) -> bool:
        return Transcript(text, "es", 1.0, 0.0, -0.2, 1.2, rejected, frames, 0.0, 0.0).ends_sentence

    assert ends("Muchas gracias.") and ends("¿Puede repetirlo? ") and ends("¡Qué bien!") and ends("谢谢。")
    assert not ends("Muchas gracias,") and not ends("La deuda que tenía con...") and not ends("Estoy muy…")
    assert not ends("la gata gris") and not ends("") and not ends("Hola.", rejected="repetition")
