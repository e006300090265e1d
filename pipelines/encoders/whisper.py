"""Whisper base's encoder rebuilt in torch from the bundled CTranslate2 `model.bin`, every layer exposed.

CTranslate2 returns only the last layer (after the final LayerNorm). Choosing a layer for emotion, and fine-tuning,
need every layer and gradients, so this module reads the CTranslate2 file (`streamer.ct2file`) and maps the spec's
variable names back onto a plain pre-LN transformer (`ctranslate2.converters.transformers.WhisperLoader`, read
backwards: `self_attention/linear_0` is q, k and v fused, k without bias).

`python -m pipelines.encoders.whisper` checks parity with CTranslate2's own encoder on UEM clips and writes
docs/models/whisper_torch_parity.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from streamer.ct2file import Ct2File
from streamer.recogniser import SAMPLES_PER_FRAME, log_mel

# torch module → CTranslate2 spec scope, in each encoder layer; parameter → variable for LayerNorms and Linears
LAYER_PARTS = {
    "attn_norm": "self_attention/layer_norm",
    "qkv": "self_attention/linear_0",
    "out": "self_attention/linear_1",
    "ffn_norm": "ffn/layer_norm",
    "fc1": "ffn/linear_0",
    "fc2": "ffn/linear_1",
}
NORM_PARAMS = {"weight": "gamma", "bias": "beta"}
LINEAR_PARAMS = {"weight": "weight", "bias": "bias"}
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "models" / "whisper_torch_parity.md"


def _torch():
    import torch

    return torch


def build_encoder(model: Ct2File):
    """A torch `WhisperEncoder` holding the spec's encoder weights as float32 parameters."""
    torch = _torch()
    nn = torch.nn
    enc = {k[len("encoder/") :]: v for k, v in model.arrays("encoder/").items()}
    n_layers = model.encoder_layers()
    heads = int(enc["num_heads"])
    dim = enc["conv1/bias"].shape[0]

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_norm = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.out = nn.Linear(dim, dim)
            self.ffn_norm = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, 4 * dim)
            self.fc2 = nn.Linear(4 * dim, dim)

        def forward(self, x, mask=None):
            """`mask` [B, 1, 1, T], True where a key is a frame of the clip (batches of clips of unequal length)."""
            b, t, _ = x.shape
            q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + self.out(att.transpose(1, 2).reshape(b, t, dim))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ffn_norm(x))))

    class WhisperEncoder(nn.Module):
        """mel [B, 80, 2T] → hidden states: the embedding's output and each layer's ([B, T, 512] each); `final`
        applies the last LayerNorm, which is what CTranslate2's `encode` returns."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv1d(enc["conv1/weight"].shape[1], dim, 3, padding=1)
            self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)
            self.register_buffer("positions", torch.zeros(enc["position_encodings/encodings"].shape))
            self.layers = nn.ModuleList(Layer() for _ in range(n_layers))
            self.norm = nn.LayerNorm(dim)

        def forward(self, mel, upto: int | None = None) -> list:
            x = torch.nn.functional.gelu(self.conv1(mel))
            x = torch.nn.functional.gelu(self.conv2(x)).transpose(1, 2)
            x = x + self.positions[: x.shape[1]]
            states = [x]
            for layer in self.layers[:upto]:
                x = layer(x)
                states.append(x)
            return states

        def final(self, state):
            return self.norm(state)

    net = WhisperEncoder()
    names = {
        "conv1.weight": "conv1/weight",
        "conv1.bias": "conv1/bias",
        "conv2.weight": "conv2/weight",
        "conv2.bias": "conv2/bias",
        "positions": "position_encodings/encodings",
        "norm.weight": "layer_norm/gamma",
        "norm.bias": "layer_norm/beta",
    }
    for i in range(n_layers):
        for ours, theirs in LAYER_PARTS.items():
            for param, var in (NORM_PARAMS if ours.endswith("norm") else LINEAR_PARAMS).items():
                names[f"layers.{i}.{ours}.{param}"] = f"layer_{i}/{theirs}/{var}"
    state = {k: torch.from_numpy(np.asarray(enc[v], np.float32).copy()) for k, v in names.items()}
    net.load_state_dict(state, strict=True)
    return net.eval()


def load_encoder(model_dir: Path | None = None):
    """The bundled Whisper base encoder in torch (the cache's joined `model.bin`, checked by SHA-256)."""
    from streamer.models import whisper_base_dir

    return build_encoder(Ct2File.read(Path(model_dir or whisper_base_dir()) / "model.bin"))


def mel_window(audio: np.ndarray, window_s: float) -> np.ndarray:
    """The log-mel input the runtime gives CTranslate2: the audio zero-padded to `window_s` (faster-whisper's
    feature extractor), [80, 100 · window_s]."""
    from faster_whisper.feature_extractor import FeatureExtractor

    return log_mel(FeatureExtractor(), audio, int(window_s * 16000))


def covered(n_samples: int) -> int:
    """The number of encoder frames that cover `n_samples` of audio (at least one), as the runtime keeps."""
    return max(1, math.ceil(n_samples / SAMPLES_PER_FRAME))


def parity(n: int, seed: int, window_s: float) -> dict:
    """Max and mean absolute difference of the torch encoder's last layer vs CTranslate2 (float32 and the
    runtime's int8) over the frames covering `n` UEM clips."""
    import ctranslate2

    from pipelines.data import corpora as D
    from streamer.audio import load_audio
    from streamer.models import whisper_base_dir

    torch = _torch()
    clips = D.limit_records(D.read_uem().records, n, seed)
    net = load_encoder()
    ref = {ct: ctranslate2.models.Whisper(str(whisper_base_dir()), compute_type=ct) for ct in ("float32", "int8")}
    diffs: dict[str, list[np.ndarray]] = {ct: [] for ct in ref}
    cos: dict[str, list[float]] = {ct: [] for ct in ref}
    for clip in clips:
        audio = load_audio(clip.path)
        mel = mel_window(audio, window_s)
        with torch.inference_mode():
            ours = net.final(net(torch.from_numpy(mel[None]))[-1])[0].numpy()[: covered(len(audio))]
        for ct, model in ref.items():
            theirs = np.array(model.encode(ctranslate2.StorageView.from_array(mel[None]), to_cpu=True))[0]
            theirs = theirs[: len(ours)]
            diffs[ct].append(np.abs(ours - theirs).ravel())
            a, b = ours.mean(0), theirs.mean(0)
            cos[ct].append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    out = {}
    for ct in ref:
        d = np.concatenate(diffs[ct])
        out[ct] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "min_pooled_cos": min(cos[ct])}
    return {"clips": len(clips), "window_s": window_s, **out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=float, default=10.0, help="the encoder's input window in seconds (runtime: 10)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    res = parity(args.clips, args.seed, args.window)
    rows = [
        f"| {ct} | {res[ct]['max_abs']:.4f} | {res[ct]['mean_abs']:.5f} | {res[ct]['min_pooled_cos']:.5f} |"
        for ct in ("float32", "int8")
    ]
    args.out.write_text(
        "# Whisper base encoder in torch vs CTranslate2\n\n"
        f"Reproduce: `.venv/bin/python -m pipelines.encoders.whisper --clips {args.clips}`\n\n"
        f"{res['clips']} UEM clips (seed {args.seed}), input padded to a {res['window_s']:g} s window as at run time;"
        " the frames covering each clip, last layer after the final LayerNorm (what `encode` returns). Torch runs"
        " float32 weights read from the bundled float16 `model.bin`.\n\n"
        "| CTranslate2 compute type | max abs diff | mean abs diff | min cosine of the clip's mean frame |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
