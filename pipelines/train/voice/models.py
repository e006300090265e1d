"""The torch models of the voice recipes: BSC-UPC's attention pooling (exported to the runtime's numpy
`AttentionHead`) and CogniCIC's MFCC MLP, and `fitter`, which turns a recipe into fit → predict.

Torch is imported only when a model trains, so reading a recipe's table needs no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from pipelines.train.linear import fit_quiet, make_model, proba_in_label_order
from streamer.frames import LABELS
from streamer.voice_heads import AttentionHead


def torch_single_thread():
    """torch, imported on first use (reading a table needs none) and set to one thread."""
    import torch

    torch.set_num_threads(1)  # the machine's cores are shared; one thread keeps runs deterministic too
    return torch


def class_weights(y: np.ndarray) -> np.ndarray:
    """`balanced` weights n / (K · n_k) in LABELS order (0 for a class absent from y)."""
    counts = np.array([np.sum(y == label) for label in LABELS], dtype=np.float64)
    return np.where(counts > 0, len(y) / (len(LABELS) * np.maximum(counts, 1)), 0.0)


def crop(seq: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random `length`-frame window of seq; a shorter seq is repeated until it fills the window."""
    if len(seq) >= length:
        start = int(rng.integers(0, len(seq) - length + 1))
        return seq[start : start + length]
    return np.concatenate([seq] * math.ceil(length / len(seq)))[:length]


def make_attention_net(dim: int, hidden: int, dropout: float, stats: bool):
    torch = torch_single_thread()
    nn = torch.nn

    class AttentionNet(nn.Module):
        """The torch twin of `streamer.voice_heads.AttentionHead` (same layers, same GELU)."""

        def __init__(self) -> None:
            super().__init__()
            self.u = nn.Parameter(torch.empty(dim, 1))
            nn.init.xavier_uniform_(self.u)
            self.fc1 = nn.Linear(dim * (2 if stats else 1), hidden)
            self.drop = nn.Dropout(dropout)
            self.ln = nn.LayerNorm(hidden, eps=AttentionHead.LN_EPS)
            self.act = nn.GELU(approximate="tanh")
            self.fc2 = nn.Linear(hidden, len(LABELS))

        def pool(self, h):  # h: [B, T, E] standardised frames
            w = torch.softmax((h @ self.u).squeeze(-1) / math.sqrt(dim), dim=1).unsqueeze(1)  # [B, 1, T]
            c = torch.bmm(w, h).squeeze(1)
            if not stats:
                return c
            # Σ w (h − c)² = Σ w h² − c²: two matrix products instead of several [B, T, E] element-wise passes
            var = torch.clamp(torch.bmm(w, h * h).squeeze(1) - c * c, min=0.0)
            return torch.cat([c, torch.sqrt(var + AttentionHead.STD_EPS)], dim=1)

        def forward(self, h):
            return self.fc2(self.act(self.ln(self.drop(self.fc1(self.pool(h))))))

    return AttentionNet()


def to_head(net, mean: np.ndarray, scale: np.ndarray, stats: bool, meta: dict) -> AttentionHead:
    def arr(t) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float32)

    return AttentionHead(
        labels=LABELS,
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        u=arr(net.u)[:, 0],
        w1=arr(net.fc1.weight),
        b1=arr(net.fc1.bias),
        ln_gain=arr(net.ln.weight),
        ln_bias=arr(net.ln.bias),
        w2=arr(net.fc2.weight),
        b2=arr(net.fc2.bias),
        stats=stats,
        meta=meta,
    )


def train_attention(
    seqs: list[np.ndarray],
    y: np.ndarray,
    acfg: dict,
    stats: bool,
    seed: int,
    aug: list[list[np.ndarray]] | None = None,
    meta: dict | None = None,
) -> AttentionHead:
    """Train the attention head on frame sequences (aug[k][i] is seqs[i]'s augmented copy k); numpy weights out."""
    torch = torch_single_thread()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    frames = np.concatenate(seqs).astype(np.float32)
    mean, scale = frames.mean(axis=0), np.maximum(frames.std(axis=0), 1e-5)  # training-set normalisation
    del frames
    seqs = [(s.astype(np.float32) - mean) / scale for s in seqs]  # once, not per batch
    aug = None if not aug else [[(s.astype(np.float32) - mean) / scale for s in copy] for copy in aug]
    net = make_attention_net(seqs[0].shape[1], int(acfg["hidden"]), float(acfg["dropout"]), stats)
    opt = torch.optim.AdamW(net.parameters(), lr=float(acfg["lr"]), weight_decay=float(acfg["weight_decay"]))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=float(acfg["plateau_factor"]), patience=int(acfg["plateau_patience"])
    )
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(class_weights(y), dtype=torch.float32))
    target = torch.tensor([LABELS.index(v) for v in y])
    length, batch, p_aug = int(acfg["crop_frames"]), int(acfg["batch"]), float(acfg.get("augment_p", 0.3))
    net.train()
    for _ in range(int(acfg["epochs"])):
        order = rng.permutation(len(seqs))
        total = 0.0
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            swap = rng.random(len(idx)) < p_aug if aug is not None else np.zeros(len(idx), bool)
            xb = np.stack([crop(_pick(seqs, aug, i, s, rng), length, rng) for i, s in zip(idx, swap, strict=True)])
            h = torch.from_numpy(xb)
            loss = loss_fn(net(h), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step(total / len(order))
    net.eval()
    return to_head(net, mean, scale, stats, meta or {})


def _pick(seqs: list, aug: list[list] | None, i: int, swap: bool, rng: np.random.Generator) -> np.ndarray:
    """Clip i, or one of its augmented copies when `swap` (a copy is drawn only when there are several)."""
    if not swap or aug is None:
        return seqs[i]
    return aug[0][i] if len(aug) == 1 else aug[int(rng.integers(len(aug)))][i]


class MlpHead:
    """CogniCIC's voice branch on standardised MFCC means (torch; used in the comparison only, never shipped)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, mcfg: dict, seed: int) -> None:
        torch = torch_single_thread()
        nn = torch.nn
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        self.mean, self.scale = X.mean(axis=0), np.maximum(X.std(axis=0), 1e-5)
        hidden = int(mcfg["hidden"])
        self.net = nn.Sequential(
            nn.Linear(X.shape[1], hidden), nn.ReLU(), nn.Dropout(float(mcfg["dropout"])), nn.Linear(hidden, len(LABELS))
        )
        opt = torch.optim.Adam(self.net.parameters(), lr=float(mcfg["lr"]))
        loss_fn = nn.CrossEntropyLoss()
        Xt = torch.from_numpy(((X - self.mean) / self.scale).astype(np.float32))
        target = torch.tensor([LABELS.index(v) for v in y])
        batch = int(mcfg["batch"])
        self.net.train()
        for _ in range(int(mcfg["epochs"])):
            order = rng.permutation(len(y))
            for start in range(0, len(order), batch):
                idx = torch.from_numpy(order[start : start + batch])
                loss = loss_fn(self.net(Xt[idx]), target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net.eval()

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        torch = torch_single_thread()
        with torch.no_grad():
            z = self.net(torch.from_numpy(((X - self.mean) / self.scale).astype(np.float32)))
            return torch.softmax(z, dim=1).numpy().astype(np.float64)


def fitter(rc: dict, cfg: dict, seed: int) -> Callable:
    """`fit(train_rows, y, aug_rows | None) → predict(test_rows) → probabilities [n, 6]` for a recipe.
    `train_seed` in the recipe reseeds the training only (the folds stay those of the config's seed)."""
    model = rc["model"]
    seed = int(rc.get("train_seed", seed))
    if model == "logreg":

        def fit_lr(rows, y, aug):
            X, yy = (np.concatenate([rows, *aug]), np.tile(y, 1 + len(aug))) if aug else (rows, y)
            m = fit_quiet(make_model(float(rc["C"]), cfg["logreg"], seed), X, yy)
            return lambda test: proba_in_label_order(m, test)

        return fit_lr
    if model == "mfcc_mlp":
        return lambda rows, y, aug: MlpHead(rows, y, cfg["mlp"], seed).predict_proba
    acfg = {**cfg["attention"], **rc.get("attention", {})}

    def fit_attn(rows, y, aug):
        return train_attention(rows, y, acfg, bool(rc.get("stats")), seed, aug).predict_many

    return fit_attn
