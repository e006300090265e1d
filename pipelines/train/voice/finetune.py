"""Fine-tuning Whisper's encoder for the voice: the upper layers of the voice branch's cut encoder trained (LoRA or
in full) with a pooled linear head, scored leave-one-corpus-out against the same head on the frozen layers.

The frozen lower layers' output (`prefix`) is computed once per clip and copy (clean, `augment_audio`'s copies, and
channel copies: telephone band, G.711 µ-law, loudness) and cached, so an epoch only runs the trained layers.

    .venv/bin/python -m pipelines.train.voice.finetune [--recipes NAME ...]

Recipes are in `configs/train/voice_finetune.yaml`; results go to `docs/models/voice_finetune.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from pipelines.data import corpora as D
from pipelines.data.features import AUGMENT_SPEC, DEFAULT_CACHE, augment_audio
from streamer.frames import LABELS

CONFIG = D.REPO_ROOT / "configs" / "train" / "voice_finetune.yaml"
DEFAULT_OUT = D.REPO_ROOT / "docs" / "models" / "voice_finetune.md"
CORPORA = (D.UEM, D.EMODB, D.URDU)
MAX_FRAMES = 1500  # Whisper's 30 s of positions
CHANNEL_SPEC = "channel-v1:tel8k-p0.5,mulaw-p0.5,gain-20..+6dB"


def channel_audio(audio: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """A copy as another channel would deliver it: telephone band (resampled through 8 kHz, 300–3400 Hz) and the
    G.711 µ-law codec, each with p = 0.5, then a random level from −20 to +6 dB (clipped at full scale)."""
    import soxr
    from scipy.signal import butter, sosfilt

    from streamer.frames import SAMPLE_RATE

    out, applied = np.asarray(audio, np.float64), []
    if rng.random() < 0.5:
        out = soxr.resample(soxr.resample(out, SAMPLE_RATE, 8000), 8000, SAMPLE_RATE)[: len(audio)]
        out = sosfilt(butter(4, [300, 3400], btype="band", fs=SAMPLE_RATE, output="sos"), out)
        applied.append("tel8k")
    if rng.random() < 0.5:
        mu = 255.0
        peak = np.max(np.abs(out)) + 1e-9
        x = out / peak
        q = np.round(np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu) * 127) / 127
        out = np.sign(q) * np.expm1(np.abs(q) * np.log1p(mu)) / mu * peak
        applied.append("mulaw")
    gain = float(rng.uniform(-20, 6))
    out = np.clip(out * 10 ** (gain / 20), -1.0, 1.0)
    applied.append(f"gain{gain:+.0f}dB")
    return out.astype(np.float32), applied


@dataclass
class Clip:
    corpus: str
    label: int
    speaker: str
    copies: list[np.ndarray] = field(default_factory=list)  # [clean, augmented copies...] prefix states, float16


def key_mask(lengths: list[int], t: int):
    """[B, 1, 1, t] True on each clip's own frames: attention never reads the padding of a batch."""
    import torch

    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


class PrefixCache:
    """The torch encoder's hidden state after its first `frozen` layers, per clip and copy, cached on disk; clips
    are encoded in padded batches with the padding masked, which gives each clip's own unpadded pass."""

    def __init__(self, frozen: int, cache_dir: Path | None = DEFAULT_CACHE, batch: int = 16) -> None:
        import torch
        from faster_whisper.feature_extractor import FeatureExtractor

        from pipelines.encoders.whisper import load_encoder

        self.torch = torch
        self.frozen, self.batch = frozen, batch
        self.net = load_encoder()
        self.mel = FeatureExtractor()
        self.dir = Path(cache_dir or DEFAULT_CACHE) / f"whisper-torch-prefix{frozen}"

    def _path(self, path: Path, copy: str, seed: int) -> Path:
        digest = hashlib.sha256(path.read_bytes())
        spec = CHANNEL_SPEC if copy.startswith("chan") else AUGMENT_SPEC if copy.startswith("aug") else ""
        digest.update(f"|prefix{self.frozen}|{copy}|{spec}|seed={seed}".encode())
        return self.dir / f"{digest.hexdigest()}.npy"

    def _mel(self, path: Path, copy: str, seed: int) -> np.ndarray:
        """The log-mel of the clip (its first 30 s) or of its copy `copy` (`clean`, `aug<k>`, `chan<k>`)."""
        from streamer.audio import AudioError, load_audio
        from streamer.recogniser import SAMPLES_PER_FRAME, log_mel

        audio = load_audio(path)[: MAX_FRAMES * SAMPLES_PER_FRAME]
        if len(audio) == 0:
            raise AudioError(f"{path}: no samples")
        if copy != "clean":
            kind = copy.rstrip("0123456789")
            key = int.from_bytes(hashlib.sha256(path.read_bytes()).digest()[:8], "little")
            rng = np.random.default_rng([seed, int(copy[len(kind) :]), key])
            audio, _ = (augment_audio if kind == "aug" else channel_audio)(audio, rng)
        n = max(1, math.ceil(len(audio) / SAMPLES_PER_FRAME))
        return log_mel(self.mel, audio, n * SAMPLES_PER_FRAME)

    def _encode(self, mels: list[np.ndarray]) -> list[np.ndarray]:
        torch, net = self.torch, self.net
        lengths = [m.shape[1] // 2 for m in mels]
        x = torch.zeros(len(mels), mels[0].shape[0], 2 * max(lengths))
        for i, m in enumerate(mels):
            x[i, :, : m.shape[1]] = torch.from_numpy(m)
        with torch.inference_mode():
            h = torch.nn.functional.gelu(net.conv1(x))
            h = h * (torch.arange(h.shape[2])[None, :] < torch.tensor([m.shape[1] for m in mels])[:, None])[:, None]
            h = torch.nn.functional.gelu(net.conv2(h)).transpose(1, 2)
            h = h + net.positions[: h.shape[1]]
            mask = key_mask(lengths, h.shape[1])
            for layer in net.layers[: self.frozen]:
                h = layer(h, mask)
        return [h[i, :n].numpy().astype(np.float16) for i, n in enumerate(lengths)]

    def fill(self, paths: list[Path], copy: str, seed: int, desc: str) -> None:
        """Encode and cache what is missing; unreadable clips are left out (`states` raises for them)."""
        from tqdm import tqdm

        from streamer.audio import AudioError

        todo = [p for p in paths if not self._path(p, copy, seed).is_file()]
        mels = {}
        for p in tqdm(todo, desc=f"mel {desc}", disable=None):
            try:
                mels[p] = self._mel(p, copy, seed)
            except (AudioError, OSError):
                continue
        order = sorted(mels, key=lambda p: mels[p].shape[1])
        self.dir.mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(0, len(order), self.batch), desc=f"prefix {desc}", disable=None):
            group = order[i : i + self.batch]
            for p, states in zip(group, self._encode([mels[p] for p in group]), strict=True):
                out = self._path(p, copy, seed)
                tmp = out.with_suffix(".tmp.npy")
                np.save(tmp, states)
                tmp.replace(out)

    def states(self, path: Path, copy: str, seed: int) -> np.ndarray:
        """[T, 512] float16 (after `fill`); OSError for a clip that could not be read."""
        return np.load(self._path(path, copy, seed))


def load_corpora(
    frozen: int, copies: list[str], seed: int, limit: int | None, names: tuple[str, ...] = CORPORA
) -> dict[str, list[Clip]]:
    cache = PrefixCache(frozen)
    out: dict[str, list[Clip]] = {}
    for name in names:
        records = D.limit_records(D.VOICE_READERS[name](None).records, limit, seed)
        paths = [c.path for c in records]
        for copy in ["clean", *copies]:
            cache.fill(paths, copy, seed, f"{name} {copy}")
        clips, skipped = [], 0
        for c in records:
            try:
                states = [cache.states(c.path, copy, seed) for copy in ["clean", *copies]]
            except OSError:
                skipped += 1
                continue
            clips.append(Clip(name, LABELS.index(c.label), c.speaker, states))
        print(f"{name}: {len(clips)} clips, {skipped} unreadable skipped")
        out[name] = clips
    return out


def build_model(frozen: int, layers: int, rank: int, train_layers: bool):
    """Whisper's layers `frozen`..`layers`-1 and final LayerNorm (LoRA of `rank` on every Linear when rank > 0,
    else trained in full when `train_layers`), and a linear head on the mean ⊕ std of the normed frames."""
    import torch
    from torch import nn

    from pipelines.encoders.whisper import load_encoder

    base = load_encoder()

    class LoRA(nn.Module):
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.linear = linear
            self.a = nn.Parameter(torch.randn(rank, linear.in_features) / math.sqrt(linear.in_features))
            self.b = nn.Parameter(torch.zeros(linear.out_features, rank))

        def forward(self, x):
            return self.linear(x) + (x @ self.a.T) @ self.b.T

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(base.layers[frozen:layers])
            self.norm = base.norm
            for p in self.parameters():
                p.requires_grad = train_layers and rank == 0
            if rank:
                for layer in self.layers:
                    for name in ("qkv", "out", "fc1", "fc2"):
                        setattr(layer, name, LoRA(getattr(layer, name)))
            self.head = nn.Linear(2 * base.norm.normalized_shape[0], len(LABELS))
            self.drop = nn.Dropout(0.2)

        def pooled(self, x, lengths: list[int] | None = None):
            """mean ⊕ std over each clip's frames ([B, T, 512] → [B, 1024]); `lengths` for a padded batch."""
            mask = None if lengths is None else key_mask(lengths, x.shape[1])
            for layer in self.layers:
                x = layer(x, mask)
            x = self.norm(x)
            if lengths is None:
                return torch.cat([x.mean(1), x.std(1, unbiased=False)], dim=1)
            w = mask[:, 0, 0, :, None].float()
            n = w.sum(1)
            mean = (x * w).sum(1) / n
            var = ((x - mean[:, None]) ** 2 * w).sum(1) / n
            return torch.cat([mean, var.sqrt()], dim=1)

    return Model()


def batches(clips: list[Clip], batch: int, crop: int, aug_p: float, rng: np.random.Generator):
    """Length-bucketed batches of random crops (each clip's clean copy, or an augmented one with p = `aug_p`),
    cut to the shortest clip of the batch so no padding is needed."""
    order = np.argsort([len(c.copies[0]) + rng.uniform(0, 20) for c in clips])
    groups = [order[i : i + batch] for i in range(0, len(order), batch)]
    rng.shuffle(groups)
    for g in groups:
        chosen = []
        for i in g:
            c = clips[i]
            k = int(rng.integers(1, len(c.copies))) if len(c.copies) > 1 and rng.random() < aug_p else 0
            chosen.append(c.copies[k])
        n = min(crop, *(len(s) for s in chosen))
        rows = []
        for s in chosen:
            o = int(rng.integers(0, len(s) - n + 1))
            rows.append(s[o : o + n])
        yield np.stack(rows).astype(np.float32), np.array([clips[i].label for i in g])


def train(clips: list[Clip], rc: dict, frozen: int, layers: int, seed: int):
    """The model of `build_model` trained on `clips` by recipe `rc` (class-weighted cross-entropy over the labels the
    clips have, AdamW with a one-cycle schedule, the head at `head_lr`, the encoder's trained weights at `lr`, mixup
    of the pooled frames with `mixup` = alpha); deterministic for a seed and a thread count."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(frozen, layers, int(rc.get("rank", 0)), bool(rc.get("train_layers", False)))
    y = np.array([c.label for c in clips])
    counts = np.bincount(y, minlength=len(LABELS)).astype(np.float64)
    present = counts > 0
    weights = np.zeros(len(LABELS))
    weights[present] = len(y) / (present.sum() * counts[present])
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))
    head = [p for n, p in model.named_parameters() if n.startswith("head")]
    enc = [p for n, p in model.named_parameters() if not n.startswith("head") and p.requires_grad]
    groups = [{"params": head, "lr": float(rc.get("head_lr", 1e-3))}]
    if enc:
        groups.append({"params": enc, "lr": float(rc["lr"])})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    epochs, batch = int(rc.get("epochs", 4)), int(rc.get("batch", 16))
    steps = epochs * math.ceil(len(clips) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.1, anneal_strategy="linear"
    )
    mixup = float(rc.get("mixup", 0.0))
    model.train()
    for _ in range(epochs):
        for x, t in batches(clips, batch, int(rc.get("crop", 100)), float(rc.get("aug_p", 0.5)), rng):
            pooled = model.pooled(torch.from_numpy(x))
            target = torch.from_numpy(t)
            if mixup:
                lam = float(rng.beta(mixup, mixup))
                perm = torch.from_numpy(rng.permutation(len(t)))
                logits = model.head(model.drop(lam * pooled + (1 - lam) * pooled[perm]))
                loss = lam * loss_fn(logits, target) + (1 - lam) * loss_fn(logits, target[perm])
            else:
                loss = loss_fn(model.head(model.drop(pooled)), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def predict(model, clips: list[Clip], batch: int = 16) -> np.ndarray:
    """Probabilities of each clip (its clean copy, whole), in padded batches of similar lengths."""
    import torch

    out = np.zeros((len(clips), len(LABELS)), np.float32)
    order = np.argsort([len(c.copies[0]) for c in clips])
    with torch.inference_mode():
        for i in range(0, len(order), batch):
            group = order[i : i + batch]
            lengths = [len(clips[j].copies[0]) for j in group]
            x = torch.zeros(len(group), max(lengths), clips[group[0]].copies[0].shape[1])
            for row, j in enumerate(group):
                x[row, : lengths[row]] = torch.from_numpy(clips[j].copies[0].astype(np.float32))
            out[group] = torch.softmax(model.head(model.pooled(x, lengths)), 1).numpy()
    return out


DELTA_CACHE = DEFAULT_CACHE / "voice_finetune" / "deltas"
DELTA_SPEC = "lora-delta-v1"


def lora_arrays(model, frozen: int) -> dict[str, np.ndarray]:
    """The trained LoRA factors under the CTranslate2 names of the weights they update (`streamer.ct2file.
    lora_merged` merges them): `lora:<variable>:a` [rank, in] and `lora:<variable>:b` [out, rank]."""
    from pipelines.encoders.whisper import LAYER_PARTS

    out = {}
    for j, layer in enumerate(model.layers):
        for part, scope in LAYER_PARTS.items():
            module = getattr(layer, part)
            if hasattr(module, "a"):
                name = f"encoder/layer_{frozen + j}/{scope}/weight"
                out[f"lora:{name}:a"] = module.a.detach().numpy().astype(np.float32)
                out[f"lora:{name}:b"] = module.b.detach().numpy().astype(np.float32)
    return out


def delta_for(tuned: str, seed: int, limit: int | None = None, config: Path = CONFIG) -> Path:
    """The delta of `tuned` (`<recipe>@<corpus>+<corpus>…[-<speaker>…]`, `FrameSource.tuned`): that recipe's LoRA
    trained on those corpora only (without those speakers' clips), saved once under
    `.cache/features/voice_finetune/deltas/` (named by everything it depends on), so that a leave-one-corpus-out
    fold never sees its held-out corpus."""
    import torch

    recipe, _, trained_on = tuned.partition("@")
    corpora, *without = trained_on.split("-")
    cfg = yaml.safe_load(config.read_text())
    if recipe not in cfg["recipes"] or not corpora:
        raise ValueError(f"unknown fine-tuned encoder {tuned!r}: <recipe of {config.name}>@<corpora>")
    rc = {**cfg.get("defaults", {}), **cfg["recipes"][recipe]}
    if not rc.get("rank"):
        raise ValueError(f"{tuned}: only a LoRA recipe (`rank`) ships as a delta")
    names = tuple(corpora.split("+"))
    frozen, layers = int(cfg["frozen_layers"]), int(cfg["layers"])
    key = [DELTA_SPEC, rc, names, seed, limit, frozen, layers, cfg["copies"], cfg.get("threads")]
    key += [without] if without else []  # deltas trained on whole corpora keep their names
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    path = DELTA_CACHE / f"{tuned}-{digest}.npz"
    if path.is_file():
        return path
    torch.set_num_threads(int(cfg.get("threads", 2)))
    data = load_corpora(frozen, drawn_copies(rc, cfg["copies"]), seed, limit, names)
    clips = [c for n in names for c in data[n] if c.speaker not in without]
    model = train(clips, rc, frozen, layers, seed)
    meta = {**rc, "recipe": recipe, "trained_on": list(names), "without_speakers": without, "clips": len(clips)}
    meta |= {"seed": seed, "frozen_layers": frozen, "layers": layers}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **lora_arrays(model, frozen))
    tmp.replace(path)
    return path


def drawn_copies(rc: dict, copies: list[str]) -> list[str]:
    """The cached copies a recipe draws from (its `augment` kinds)."""
    return [c for c in copies if c.startswith(tuple(rc.get("augment", [])))]


def loco(rc: dict, data: dict[str, list[Clip]], frozen: int, layers: int, seed: int) -> dict:
    """Each corpus held out in turn (trained on the others): its macro-F1 over the labels both sides have, per-class
    F1 and the seconds it took; and the mean over the corpora."""
    from pipelines.evaluate.metrics import shared_label_f1

    out: dict = {}
    for held in CORPORA:
        t0 = time.perf_counter()
        train_clips = [c for name in CORPORA if name != held for c in data[name]]
        model = train(train_clips, rc, frozen, layers, seed)
        test = data[held]
        y = np.array([LABELS[c.label] for c in test])
        trained = {LABELS[c.label] for c in train_clips}
        shared = [label for label in LABELS if label in set(y) and label in trained]
        keep = np.isin(y, shared)
        f1, per = shared_label_f1(y[keep], predict(model, test)[keep], shared)
        seconds = round(time.perf_counter() - t0, 1)
        out[held] = {"f1": f1, "per_class": dict(zip(shared, per.round(3).tolist(), strict=True)), "seconds": seconds}
        print(f"  {held}: {f1:.3f} ({seconds} s)", flush=True)
    out["mean"] = float(np.mean([out[c]["f1"] for c in CORPORA]))
    return out


def write_report(results: dict, cfg: dict, out: Path) -> None:
    base = results.get("frozen", {}).get("mean")
    rows = []
    for name, r in results.items():
        cells = " | ".join(f"{r[c]['f1']:.3f}" for c in CORPORA)
        delta = "–" if base is None else f"{r['mean'] - base:+.3f}"
        seconds = sum(r[c]["seconds"] for c in CORPORA)
        rows.append(
            f"| `{name}` | {r['recipe'].get('about', '')} | {cells} | **{r['mean']:.3f}** | {delta} | {seconds:.0f} |"
        )
    per = [
        f"| `{name}` | "
        + " | ".join(", ".join(f"{k} {v:.2f}" for k, v in r[c]["per_class"].items()) for c in CORPORA)
        + " |"
        for name, r in results.items()
    ]
    out.write_text(
        "# Fine-tuning the voice branch's Whisper layer (leave one corpus out)\n\n"
        "Reproduce (2 CPU cores; the frozen layers' output is cached under `.cache/features/`):\n\n"
        "```sh\n.venv/bin/python -m pipelines.train.voice.finetune [--recipes NAME ...]\n```\n\n"
        f"Whisper base cut after {cfg['layers']} encoder layers (the voice branch's encoder), layers below "
        f"{cfg['frozen_layers'] + 1} frozen; a linear head on the mean ⊕ std of the normed frames, class-weighted "
        "cross-entropy, AdamW with a one-cycle schedule, random crops; each corpus held out in turn and scored on "
        "the labels it shares with the training side (Urdu: anger, joy, neutral, sadness), every clip alone, by the "
        "torch model in float32. `frozen` is the control: the same head and training with the encoder frozen. "
        "Recipes: `configs/train/voice_finetune.yaml`; the copies a recipe draws (p = "
        f"{cfg['defaults'].get('aug_p')} per clip and epoch): `aug` = `augment_audio` (speed, noise, reverberation), "
        f"`chan` = `channel_audio` (telephone band through 8 kHz, G.711 µ-law, level −20…+6 dB; `{CHANNEL_SPEC}`).\n\n"
        "| recipe | what | UEM held out | EmoDB held out | Urdu held out | mean | Δ vs `frozen` | train + predict s |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\nPer-class F1:\n\n"
        "| recipe | UEM | EmoDB | Urdu |\n|---|---|---|---|\n" + "\n".join(per) + "\n\n"
        "How to read it: these rows compare training schemes under one small head, not voice heads. The head's own "
        "training matters as much as the layer's (compare `frozen` with `frozen-x3`), so whether a fine-tuned layer "
        "is worth shipping is decided where the shipped heads are refitted on it: the `L3ft-*` rows of "
        "[cross_corpus.md](cross_corpus.md), where the LoRA of `lora8-chan`, trained per split on the training "
        "corpora only and merged into the voice branch's CTranslate2 encoder (int8, as at run time), is read by "
        "the same heads as the frozen layer's `L3-*` rows. Timings are of a 2-core VM shared with other jobs.\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--recipes", nargs="*")
    ap.add_argument("--limit", type=int, default=None, help="clips per corpus (smoke runs)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--results", type=Path, default=DEFAULT_OUT.with_suffix(".json"), help="scores kept between runs")
    args = ap.parse_args(argv)
    cfg = yaml.safe_load(args.config.read_text())
    import torch

    torch.set_num_threads(int(cfg.get("threads", 2)))
    seed, frozen, layers = int(cfg["seed"]), int(cfg["frozen_layers"]), int(cfg["layers"])
    data = load_corpora(frozen, list(cfg["copies"]), seed, args.limit)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    for name in args.recipes or list(cfg["recipes"]):
        rc = {**cfg.get("defaults", {}), **cfg["recipes"][name]}
        names = ["clean", *cfg["copies"]]
        keep = ["clean", *drawn_copies(rc, cfg["copies"])]
        view = {
            k: [
                Clip(c.corpus, c.label, c.speaker, [s for s, n in zip(c.copies, names, strict=True) if n in keep])
                for c in v
            ]
            for k, v in data.items()
        }
        print(f"{name}: {rc}", flush=True)
        res = loco(rc, view, frozen, layers, seed)
        print(f"{name}: mean {res['mean']:.3f}", flush=True)
        results[name] = {"recipe": rc, **res}
        args.results.write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, cfg, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
