"""Stream-adaptive (speaker) normalisation of the voice recipes (`stream_norm: true`), as the runtime does it.

In live use a stream (a microphone, one side of a call) is one speaker, so the runtime can keep running sums of the
frames of that stream's past utterances and normalise the next one by them: per-speaker CMVN, made causal. Here the
training side is normalised per speaker and the test side by simulated stream histories (causal, mostly neutral,
transductive), with the runtime's own `streamer.adaptation.StreamNorm`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipelines.data.corpora import take_rows
from pipelines.evaluate.metrics import macro_f1
from pipelines.evaluate.report import Predictions, RecipeResult
from pipelines.train.voice.inputs import MAIN, Inputs, Split, Splitter, VoiceData, cat_rows
from streamer.adaptation import FrameMoments, StreamNorm
from streamer.heads import voice_features

CAUSAL, SKEWED, TRANSDUCTIVE = "causal", "skewed", "transductive"


@dataclass(frozen=True)
class FrameSums:
    """Per clip: frame count, sum and sum of squares (float64) — all a stream has to keep of its past clips."""

    n: np.ndarray  # [clips]
    s: np.ndarray  # [clips, E]
    q: np.ndarray  # [clips, E]

    @classmethod
    def of(cls, seqs: list[np.ndarray]) -> FrameSums:
        wide = [np.asarray(x, dtype=np.float64) for x in seqs]
        return cls(
            np.array([len(x) for x in wide], dtype=np.float64),
            np.stack([x.sum(axis=0) for x in wide]),
            np.stack([np.square(x).sum(axis=0) for x in wide]),
        )

    def take(self, idx: np.ndarray) -> FrameSums:
        return FrameSums(self.n[idx], self.s[idx], self.q[idx])

    def join(self, other: FrameSums) -> FrameSums:
        return FrameSums(*(np.concatenate([a, b]) for a, b in zip(self.fields(), other.fields(), strict=True)))

    def fields(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.n, self.s, self.q

    def history(self, idx: np.ndarray) -> FrameMoments | None:
        """Clips `idx` as the runtime keeps a stream's past (`streamer.adaptation.FrameMoments`); None when empty."""
        if len(idx) == 0:
            return None
        n, s, q = self.take(idx).fields()
        return FrameMoments(len(idx), int(n.sum()), s.sum(axis=0), q.sum(axis=0))

    def moments(self, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Frame mean and variance over clips `idx` (all when None), every frame weighted alike."""
        return self.history(np.arange(len(self.n)) if idx is None else idx).moments()


def shrunk_stats(
    sums: FrameSums, history: np.ndarray, prior: tuple[np.ndarray, np.ndarray], n0: float
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, var) to normalise a clip by: the moments of its stream's `history` clips, shrunk toward the `prior`
    (the training side's global moments) with weight k / (k + n0) for k clips seen, so a stream's first clip gets the
    prior and a long stream its own statistics; n0 = 0 uses the history alone (training speakers, transductive).
    The runtime's own rule (`streamer.adaptation.StreamNorm`)."""
    return StreamNorm(prior[0], prior[1], n0).stats(sums.history(history))


def stream_histories(
    groups: np.ndarray, y: np.ndarray, view: str, rng: np.random.Generator | None, neutral_share: float = 0.65
) -> list[np.ndarray]:
    """For each clip, the indices of the clips its stream (group = speaker) has heard before it.

    `causal`: each group's clips in a random order, clip k has heard clips 0..k-1 — acted corpora give every speaker
    each emotion alike, which flatters the statistics; `skewed`: clip k has heard min(k, cap) other clips of its
    group, `neutral_share` of them neutral, as a real, mostly neutral stream (cap: what the group's clips allow);
    `transductive`: every clip of the group, itself included (an upper bound; the training side's own stats)."""
    out: list[np.ndarray] = [np.zeros(0, int)] * len(groups)
    for g in sorted(set(groups.tolist())):  # sorted: the draws depend only on the groups and the generator's seed
        members = np.flatnonzero(groups == g)
        if view == TRANSDUCTIVE:
            for i in members:
                out[i] = members
            continue
        order = rng.permutation(members)
        for k, i in enumerate(order):
            if view == CAUSAL:
                out[i] = order[:k]
                continue
            others = order[order != i]
            neutral, other = others[y[others] == "neutral"], others[y[others] != "neutral"]
            m = min(k, int(len(neutral) / neutral_share), int(len(other) / (1 - neutral_share)))
            n_neutral = round(neutral_share * m)
            picked = [rng.choice(neutral, n_neutral, replace=False), rng.choice(other, m - n_neutral, replace=False)]
            out[i] = np.concatenate(picked)
    return out


def normalise_clips(
    seqs: list[np.ndarray],
    sums: FrameSums,
    histories: list[np.ndarray],
    prior: tuple[np.ndarray, np.ndarray],
    n0: float,
    std: bool,
) -> list[np.ndarray]:
    """Each clip's frames normalised as the runtime does (`StreamNorm.apply`) by its history, float16 like the cache."""
    norm = StreamNorm(prior[0], prior[1], n0, std)
    return [norm.apply(x, sums.history(h), np.float16) for x, h in zip(seqs, histories, strict=True)]


def _pooled(seqs: list[np.ndarray]) -> np.ndarray:
    return np.stack([voice_features(s) for s in seqs])


def _rows(seqs: list[np.ndarray]) -> np.ndarray:
    """One-row sequences (an utterance's prosody vector) back to a [clips, P] matrix."""
    return np.stack([np.asarray(s, np.float32)[0] for s in seqs])


@dataclass
class SpeakerNormalised:
    """The training side of a `stream_norm` recipe: every speaker's clips (UEM and the extra datasets, and their
    augmented copies by the clean clips' statistics) normalised by that speaker's own frame moments, and the prior,
    the global moments of the raw clean training frames (every frame weighted alike). LR recipes are pooled
    (mean+std) after normalising."""

    inp: Inputs
    ev_sums: FrameSums
    extra_sums: FrameSums
    ev_groups: np.ndarray
    extra_groups: np.ndarray
    y_ev: np.ndarray
    std: bool
    pool: Callable

    @classmethod
    def of(cls, inp: Inputs, rc: dict, data: VoiceData, cfg: dict, pool: Callable | None = None) -> SpeakerNormalised:
        ev = cfg["eval_dataset"]
        others = [n for n in rc["datasets"] if n != ev]
        ev_groups = np.array([f"{ev}/{c.speaker}" for c in data.clips[ev]])
        extra_groups = np.array([f"{n}/{c.speaker}" for n in others for c in data.clips[n]], dtype=ev_groups.dtype)
        return cls(
            inp,
            FrameSums.of(inp.ev),
            FrameSums.of(list(inp.extra)),
            ev_groups,
            extra_groups,
            data.labels(ev),
            bool(cfg["stream_norm"].get("std", True)),
            pool or (_pooled if rc["model"] == "logreg" else list),
        )

    def training(self, train: np.ndarray) -> tuple[list | np.ndarray, list | None, tuple[np.ndarray, np.ndarray]]:
        """(rows, their augmented copies or None, prior (mean, var)) for the evaluation clips `train` + extras."""
        inp = self.inp
        sums = self.ev_sums.take(train).join(self.extra_sums)
        y_train = np.concatenate([self.y_ev[train], inp.y_extra])
        groups = np.concatenate([self.ev_groups[train], self.extra_groups])
        own = stream_histories(groups, y_train, TRANSDUCTIVE, None)
        prior = sums.moments()
        rows = self.pool(normalise_clips(cat_rows(take_rows(inp.ev, train), inp.extra), sums, own, prior, 0, self.std))
        aug = inp.train_aug(train)
        aug = [self.pool(normalise_clips(copy, sums, own, prior, 0, self.std)) for copy in aug] if aug else None
        return rows, aug, prior

    def testing(
        self, test: np.ndarray, histories: list[np.ndarray], prior: tuple[np.ndarray, np.ndarray], n0: float
    ) -> list[np.ndarray]:
        """The evaluation clips `test`, each normalised by its `histories` entry (indices into `test`)."""
        return normalise_clips(take_rows(self.inp.ev, test), self.ev_sums.take(test), histories, prior, n0, self.std)


def stream_norm_splits(inp: Inputs, rc: dict, data: VoiceData, cfg: dict) -> Splitter:
    """`split` (as `plain_splits`) for a `stream_norm` recipe. Training side: `SpeakerNormalised`. Test side, views:
    `causal j` (the main view is order 0), `skewed j` for `orders` random orders per speaker, and `transductive`;
    the prior is the training side's global frame moments."""
    sn = cfg["stream_norm"]
    n0, orders, share = float(sn["n0"]), int(sn["orders"]), float(sn["neutral_share"])
    sides = list(stream_sides(inp, rc, data, cfg).values())
    seed = int(cfg["seed"])

    def split(kind: str, train: np.ndarray, test: np.ndarray) -> Split:
        trained = [(side, *side.training(train)) for side in sides]
        rows = side_by_side([r for _, r, _, _ in trained])
        aug = trained[0][2]  # only a frames-only recipe has augmented copies (`prosody_inputs` refuses them)
        groups, y = sides[0].ev_groups[test], sides[0].y_ev[test]

        def view(how: str, j: int, shrink: float) -> np.ndarray | list:
            rng = np.random.default_rng([seed, j, (CAUSAL, SKEWED, TRANSDUCTIVE).index(how)])
            histories = stream_histories(groups, y, how, rng, share)  # the same histories for every side
            return side_by_side(
                [side.pool(side.testing(test, histories, prior, shrink)) for side, _, _, prior in trained]
            )

        views = {MAIN if j == 0 else f"{CAUSAL} {j}": view(CAUSAL, j, n0) for j in range(orders)}
        views |= {f"{SKEWED} {j}": view(SKEWED, j, n0) for j in range(orders)}
        views[TRANSDUCTIVE] = view(TRANSDUCTIVE, 0, 0)
        return rows, aug, views

    return split


def stream_sides(inp: Inputs, rc: dict, data: VoiceData, cfg: dict) -> dict[str, SpeakerNormalised]:
    """The blocks of a `stream_norm` recipe in column order, each normalised per speaker by its own moments: `frames`
    (the encoder frames, pooled for an LR), then `prosody` (the prosody vectors, when the recipe has them)."""
    if rc.get("prosody") and not rc.get("frames", True):
        return {"prosody": SpeakerNormalised.of(inp, rc, data, cfg, _rows)}
    sides = {"frames": SpeakerNormalised.of(inp, rc, data, cfg)}
    if inp.prosody is not None:
        sides["prosody"] = SpeakerNormalised.of(inp.prosody, rc, data, cfg, _rows)
    return sides


def side_by_side(blocks: list) -> np.ndarray | list:
    """Side by side: one block as it is (a list of sequences for attention), several as columns of one matrix."""
    return blocks[0] if len(blocks) == 1 else np.hstack(blocks)


def stream_columns(result: RecipeResult) -> RecipeResult:
    """Fold the hidden stream-normalisation views of a result into three table columns (mean over the random orders
    ± their sd, of the CV fold-mean macro-F1 / the held-out pooled macro-F1); the main columns are order 0."""
    hidden = {k: v for k, v in result.more.items() if "|" in k}
    if not hidden:
        return result

    def score(kind: str, pred: Predictions) -> float:
        return float(np.mean(pred.fold_f1())) if kind == "cv" else macro_f1(pred.y_true, pred.y_pred)

    def cell(how: str) -> str:
        parts = []
        for kind in ("cv", "heldout"):
            main = getattr(result, kind) if how == CAUSAL else None
            got = [score(kind, p) for k, p in hidden.items() if k.startswith(f"{kind}|{how}")]
            got = ([score(kind, main)] if main is not None else []) + got
            parts.append(f"{np.mean(got):.3f}" + (f" ± {np.std(got):.3f}" if len(got) > 1 else ""))
        return " / ".join(parts)

    result.more = {k: v for k, v in result.more.items() if k not in hidden}
    result.extras = {**result.extras, **{column: cell(how) for how, column in STREAM_COLUMNS.items()}}
    return result


STREAM_COLUMNS = {
    CAUSAL: "stream norm, causal history: CV / held-out macro-F1 (mean ± sd over orders)",
    SKEWED: "stream norm, mostly-neutral history: CV / held-out",
    TRANSDUCTIVE: "stream norm, transductive (upper bound): CV / held-out",
}
