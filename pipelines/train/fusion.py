"""Fusion recipes beyond the fixed rules of `streamer.classifier.fuse` (issue #3, part 4), scored by
`pipelines.evaluate.fusion` on the same folds and pairings as those rules:

- `max_rule`: ITST's late fusion by the element-wise maximum of the two distributions, renormalised;
- `EarlyFusionMLP`: CogniCIC's early fusion, voice → Linear 256 and words → Linear 256, concatenated → Linear 256 →
  ReLU → Dropout 0.5 → Linear 6 (Adam, cross-entropy);
- `ConcatAttention`: BSC-UPC attention pooling over the concatenated sequences, the voice encoder frames and the
  words' embedding as one more element, each projected to the same width, then the voice recipes' attention head
  (`pipelines.train.voice.models.make_attention_net`: one query u, Linear + Dropout + LayerNorm + GELU → Linear);
- `StackedGate`: logistic regression on the two heads' log-probabilities (a learned weighted product);
- `MixtureGate`: a learned gate, a small MLP that weighs the two heads' distributions per utterance;
- `hard_vote`: majority vote of a few models' labels, a tie going to the first (best) one.

The learned recipes train on *paired* rows: each training clip with its real transcript (UEM: words that carry no
emotion) and each training clip with a random text row of the same label drawn afresh every epoch (simulated pairs:
both modalities informative); the words are an embedding (MLP, attention) or the words head's log-probabilities
(stacking, gate). `modality_dropout` p zeroes one modality's standardised input
(voice or words, with p/2 each) for a share p of the training rows: a learned gate, so that the model also predicts
from either modality alone rather than leaning on both. A zero input is the training mean (for the gate, whose
inputs are not standardised, a uniform distribution), which is also what a missing modality (an empty transcript,
NaN) becomes at prediction time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.train.voice.models import class_weights, crop, make_attention_net, torch_single_thread
from streamer.frames import LABELS


def max_rule(audio_p: np.ndarray, text_p: np.ndarray) -> np.ndarray:
    """ITST max fusion: the element-wise max of the two distributions ([n, K]), renormalised to sum to 1."""
    m = np.maximum(np.asarray(audio_p, dtype=np.float64), np.asarray(text_p, dtype=np.float64))
    return m / m.sum(axis=-1, keepdims=True)


def hard_vote(preds: Sequence[np.ndarray]) -> np.ndarray:
    """Majority vote of label indices (one array per model, best model first) as a distribution [n, K]: the label
    most models chose gets the share of models that chose it (its confidence), the other labels split the rest
    evenly, so the argmax is the winner (fewer models than labels). A tie goes to the best-ranked model among
    those that chose one of the tied labels (with three voters, a three-way split goes to the best model)."""
    if not 0 < len(preds) < len(LABELS):
        raise ValueError(f"a hard vote needs 1 to {len(LABELS) - 1} models, got {len(preds)}")
    votes = np.stack([np.asarray(p, dtype=int) for p in preds])  # [models, n]
    counts = np.stack([(votes == k).sum(axis=0) for k in range(len(LABELS))], axis=1)  # [n, K]
    top = counts.max(axis=1)
    # per clip, the models in rank order: the first whose label has the top count wins
    winner = np.array([next(v for v in votes[:, i] if counts[i, v] == top[i]) for i in range(votes.shape[1])])
    share = top / len(preds)
    out = np.repeat(((1 - share) / (len(LABELS) - 1))[:, None], len(LABELS), axis=1)
    out[np.arange(len(winner)), winner] = share
    return out


def draw_pairs(y: np.ndarray, pool_y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each label in y, the index of a random row of the pool with the same label (with replacement)."""
    y, pool_y = np.asarray(y), np.asarray(pool_y)
    out = np.empty(len(y), dtype=int)
    for label in np.unique(y):
        src = np.flatnonzero(pool_y == label)
        if not len(src):
            raise ValueError(f"no text rows labelled {label} to pair with")
        dst = np.flatnonzero(y == label)
        out[dst] = rng.choice(src, size=len(dst))
    return out


@dataclass
class PairedTrain:
    """A learned recipe's training side: per clip its voice (pooled rows [n, D], frame sequences, or the voice head's
    log-probabilities) and label; `text` the words input of its real transcript (None: train on simulated pairs
    only); `pool_*` the text rows simulated pairs are drawn from."""

    voice: np.ndarray | list[np.ndarray]
    text: np.ndarray | None
    y: np.ndarray
    pool_text: np.ndarray
    pool_y: np.ndarray


def _standardiser(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(rows, dtype=np.float64)
    return np.nanmean(rows, axis=0), np.maximum(np.nanstd(rows, axis=0), 1e-5)


class _LearnedFusion(ABC):
    """The training loop and standardisation the learned recipes share; subclasses build the net and the voice
    batches (pooled rows, frame crops or log-probabilities)."""

    weighted = False  # class-weighted cross-entropy (BSC-UPC) or plain (CogniCIC)
    standardise = True  # inputs standardised on the training side (else taken as they are, NaN → 0)

    def __init__(self, cfg: dict, modality_dropout: float, seed: int) -> None:
        self.cfg, self.p_drop, self.seed = cfg, float(modality_dropout), seed

    @abstractmethod
    def _fit_voice(self, voice) -> None:
        """Fit the voice standardisation on the training clips and keep them standardised."""

    @abstractmethod
    def _voice_batch(self, idx: np.ndarray, rng: np.random.Generator):
        """The voice input tensor of training clips `idx`."""

    @abstractmethod
    def _optimiser(self, params):
        """The recipe's optimiser."""

    @abstractmethod
    def _build(self, text_dim: int):
        """The torch module: net(voice, words) → logits."""

    @abstractmethod
    def predict(self, voice, texts: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Probabilities [n, 6] of the clips' voice with each of several text pairings (each [n, dim])."""

    def _text(self, text: np.ndarray) -> np.ndarray:
        """Standardised embeddings; a NaN row (no transcript) becomes 0, the training mean, as a dropped modality."""
        return np.nan_to_num((np.asarray(text, dtype=np.float64) - self.t_mean) / self.t_scale).astype(np.float32)

    def fit(self, train: PairedTrain) -> _LearnedFusion:
        """Train on the clips with their own transcripts and with fresh same-label pool rows each epoch
        (deterministic for the seed: one torch thread)."""
        torch = torch_single_thread()
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        y = np.array([LABELS.index(v) for v in train.y])
        pool_y = np.array([LABELS.index(v) for v in train.pool_y])
        texts = [train.pool_text] if train.text is None else [train.text, train.pool_text]
        self.t_mean, self.t_scale = _standardiser(np.concatenate(texts)) if self.standardise else (0.0, 1.0)
        real = None if train.text is None else self._text(train.text)
        pool = self._text(train.pool_text)
        self._fit_voice(train.voice)
        self.net = self._build(pool.shape[1])
        opt = self._optimiser(self.net.parameters())
        weight = torch.tensor(class_weights(np.asarray(train.y)), dtype=torch.float32) if self.weighted else None
        loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
        n, batch = len(y), int(self.cfg["batch"])
        self.net.train()
        for _ in range(int(self.cfg["epochs"])):
            # this epoch's rows: every clip with a fresh same-label text row, and (if given) with its own transcript
            clip = np.arange(n) if real is None else np.concatenate([np.arange(n), np.arange(n)])
            text = pool[draw_pairs(y, pool_y, rng)]
            if real is not None:
                text = np.concatenate([text, real])
            order = rng.permutation(len(clip))
            for start in range(0, len(order), batch):
                rows = order[start : start + batch]
                v = self._voice_batch(clip[rows], rng)
                t = torch.from_numpy(text[rows])
                if self.p_drop > 0:
                    r = torch.from_numpy(rng.random(len(rows)).astype(np.float32))
                    keep_v = (r >= self.p_drop / 2).float()
                    keep_t = ((r < self.p_drop / 2) | (r >= self.p_drop)).float()
                    v = v * keep_v.view(-1, *([1] * (v.dim() - 1)))
                    t = t * keep_t[:, None]
                loss = loss_fn(self.net(v, t), torch.from_numpy(y[clip[rows]]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net.eval()
        return self


class EarlyFusionMLP(_LearnedFusion):
    """CogniCIC early fusion on the pooled voice features (mean+std of the encoder frames) and the words' embedding."""

    def _fit_voice(self, voice: np.ndarray) -> None:
        self.v_mean, self.v_scale = _standardiser(voice) if self.standardise else (0.0, 1.0)
        self.voice = self._voice(voice)

    def _voice(self, voice: np.ndarray) -> np.ndarray:
        return ((np.asarray(voice, dtype=np.float64) - self.v_mean) / self.v_scale).astype(np.float32)

    def _voice_batch(self, idx: np.ndarray, rng: np.random.Generator):
        return torch_single_thread().from_numpy(self.voice[idx])

    def _optimiser(self, params):
        return torch_single_thread().optim.Adam(params, lr=float(self.cfg["lr"]))

    def _build(self, text_dim: int):
        torch = torch_single_thread()
        nn = torch.nn
        width, hidden, dropout = int(self.cfg["width"]), int(self.cfg["hidden"]), float(self.cfg["dropout"])
        voice_dim = self.voice.shape[1]

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.voice, self.text = nn.Linear(voice_dim, width), nn.Linear(text_dim, width)
                self.head = nn.Sequential(
                    nn.Linear(2 * width, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, len(LABELS))
                )

            def forward(self, v, t):
                return self.head(torch.cat([self.voice(v), self.text(t)], dim=1))

        return Net()

    def predict(self, voice: np.ndarray, texts: Sequence[np.ndarray]) -> list[np.ndarray]:
        torch = torch_single_thread()
        v = torch.from_numpy(self._voice(voice))
        with torch.no_grad():
            return [torch.softmax(self.net(v, torch.from_numpy(self._text(t))), dim=1).double().numpy() for t in texts]


class StackedGate(EarlyFusionMLP):
    """Stacking: multinomial logistic regression on the two heads' (standardised) log-probabilities, 78 weights.
    It learns per class how far to trust each head, from rows where the words are uninformative (UEM transcripts)
    and rows where they are informative (simulated pairs); linear in log-probabilities, it is a learned and
    calibrated weighted product of the heads, the same weights for every utterance."""

    def _build(self, text_dim: int):
        torch = torch_single_thread()
        voice_dim = self.voice.shape[1]

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear = torch.nn.Linear(voice_dim + text_dim, len(LABELS))

            def forward(self, v, t):
                return self.linear(torch.cat([v, t], dim=1))

        return Net()


class MixtureGate(EarlyFusionMLP):
    """A learned gate over the two heads: p = α_v·p_voice + α_t·p_words with (α_v, α_t) = softmax(MLP(p_voice,
    p_words)), fitted by the likelihood of the mixture. Inputs are the heads' log-probabilities as they are (a
    missing modality, 0, is a uniform distribution). Like the `gated` rule it weighs the heads per utterance, but
    the weights are learned from rows where the words are uninformative and rows where they are informative."""

    standardise = False

    def _build(self, text_dim: int):
        torch = torch_single_thread()
        nn = torch.nn
        hidden = int(self.cfg["hidden"])

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.gate = nn.Sequential(nn.Linear(2 * len(LABELS), hidden), nn.ReLU(), nn.Linear(hidden, 2))

            def weights(self, pv, pt):
                return torch.softmax(self.gate(torch.cat([pv, pt], dim=1)), dim=1)

            def forward(self, v, t):  # log-probabilities of the mixture, which cross-entropy takes as logits
                pv, pt = torch.softmax(v, dim=1), torch.softmax(t, dim=1)
                a = self.weights(pv, pt)
                return torch.log(a[:, :1] * pv + a[:, 1:] * pt + 1e-12)

        return Net()

    def words_weight(self, voice: np.ndarray, texts: Sequence[np.ndarray]) -> list[np.ndarray]:
        """α_t, the weight the gate gives the words, per clip and text pairing."""
        torch = torch_single_thread()
        v = torch.softmax(torch.from_numpy(self._voice(voice)), dim=1)
        with torch.no_grad():
            return [
                self.net.weights(v, torch.softmax(torch.from_numpy(self._text(t)), dim=1))[:, 1].double().numpy()
                for t in texts
            ]


class ConcatAttention(_LearnedFusion):
    """BSC-UPC attention pooling over [projected voice frames; projected words embedding], random frame crops in
    training (whole utterances in prediction), class-weighted cross-entropy, AdamW."""

    weighted = True

    def _fit_voice(self, seqs: list[np.ndarray]) -> None:
        frames = np.concatenate(seqs).astype(np.float32)
        self.v_mean, self.v_scale = frames.mean(axis=0), np.maximum(frames.std(axis=0), 1e-5)
        del frames
        self.voice = [self._voice(s) for s in seqs]

    def _voice(self, seq: np.ndarray) -> np.ndarray:
        return (np.asarray(seq, dtype=np.float32) - self.v_mean) / self.v_scale

    def _voice_batch(self, idx: np.ndarray, rng: np.random.Generator):
        length = int(self.cfg["crop_frames"])
        return torch_single_thread().from_numpy(np.stack([crop(self.voice[i], length, rng) for i in idx]))

    def _optimiser(self, params):
        lr, wd = float(self.cfg["lr"]), float(self.cfg["weight_decay"])
        return torch_single_thread().optim.AdamW(params, lr=lr, weight_decay=wd)

    def _build(self, text_dim: int):
        torch = torch_single_thread()
        nn = torch.nn
        width = int(self.cfg["width"])
        voice_dim = self.voice[0].shape[1]
        head = make_attention_net(width, int(self.cfg["hidden"]), float(self.cfg["dropout"]), stats=False)

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.voice, self.text, self.head = nn.Linear(voice_dim, width), nn.Linear(text_dim, width), head

            def sequence(self, v, t):  # [B, T, Dv], [B, Dt] → [B, T + 1, E]: the words are the last element
                return torch.cat([self.voice(v), self.text(t).unsqueeze(1)], dim=1)

            def forward(self, v, t):
                return self.head(self.sequence(v, t))

        return Net()

    def _each_clip(self, seqs: list[np.ndarray], texts: Sequence[np.ndarray], fn) -> np.ndarray:
        """fn(voice [m, T, D], words [m, Dt]) for each clip, its m text pairings as one batch → [m, n, ...]."""
        torch = torch_single_thread()
        t_all = np.stack([self._text(t) for t in texts], axis=1)  # [n, m, Dt]
        out = []
        with torch.no_grad():
            for seq, t in zip(seqs, t_all, strict=True):
                v = torch.from_numpy(self._voice(seq)).unsqueeze(0).expand(len(texts), -1, -1)
                out.append(fn(v, torch.from_numpy(t)).double().numpy())
        return np.stack(out, axis=1)

    def predict(self, seqs: list[np.ndarray], texts: Sequence[np.ndarray]) -> list[np.ndarray]:
        torch = torch_single_thread()
        return list(self._each_clip(seqs, texts, lambda v, t: torch.softmax(self.net(v, t), dim=1)))

    def words_weight(self, seqs: list[np.ndarray], texts: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The pooling weight w of the words element, per clip and text pairing: how much the learned query
        listens to the words (the gate this recipe learns)."""
        torch = torch_single_thread()
        u, width = self.net.head.u, int(self.cfg["width"])

        def words_weight(v, t):
            h = self.net.sequence(v, t)
            return torch.softmax((h @ u).squeeze(-1) / width**0.5, dim=1)[:, -1]

        return list(self._each_clip(seqs, texts, words_weight))


LEARNED = {"mlp": EarlyFusionMLP, "attention": ConcatAttention, "stack": StackedGate, "gate": MixtureGate}


def make_learned(rc: dict, cfg: dict, seed: int) -> _LearnedFusion:
    """The learned recipe `rc` (`model`: mlp | attention | stack | gate, `modality_dropout`) with its settings."""
    if rc["model"] not in LEARNED:
        raise ValueError(f"unknown fusion model {rc['model']!r} (known: {', '.join(LEARNED)})")
    return LEARNED[rc["model"]](cfg[rc["model"]], float(rc.get("modality_dropout", 0.0)), seed)
