"""Score late-fusion rules: can an uninformative modality drag the fused label down?

    .venv/bin/python -m pipelines.fusion_eval [--out docs/models/fusion.md]

1. **UEM (words uninformative).** UEM actors say the same emotion-neutral sentences in every emotion. Voice:
   the shipped voice recipe (uem+emodb, its C) refitted inside each of the 8 speaker-grouped folds, scored on the
   held-out speakers. Words: the shipped text model (trained on EmoSPeech only, so it never saw UEM) applied to
   Whisper's transcript of each clip (`Recogniser.recognise`, runtime defaults; cached under `.cache/transcripts/`).
2. **Simulated pairs (both informative).** Each UEM clip is paired with a random EmoSPeech row of the same label
   (seeded; 5 pairings averaged); the text probabilities are out-of-fold (the shipped text recipe on the grouped
   `youtube_key` folds of `pipelines.train_heads`), the voice probabilities are those of part 1.
   This assumes the two modalities err independently given the label, and uses UEM's balanced labels: real paired
   speech has correlated errors, so treat it as a sanity check that a rule does not throw good text away.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from pipelines import data as D
from pipelines.train_heads import fit_quiet, make_model, proba_in_label_order, text_folds
from streamer.classifier import FUSION_RULES, fuse
from streamer.frames import LABELS

log = logging.getLogger("pipelines.fusion_eval")

DEFAULT_OUT = D.REPO_ROOT / "docs" / "models" / "fusion.md"
TEXT_WEIGHTS = (0.5,)
GATE_SENSITIVITY = (0.5, 0.7)  # the default gate is 0.6
MEAN_SENSITIVITY = (0.1, 0.2, 0.3)


def _proba(model, X) -> np.ndarray:
    return proba_in_label_order(model, X)


def voice_oof(cfg: dict, seed: int, cache) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Out-of-fold voice probabilities on UEM (speaker folds), the shipped voice recipe refitted per fold."""
    from pipelines.features import VoiceFeaturizer
    from streamer.classifier import load_voice_head
    from streamer.models import VOICE_HEAD

    shipped = load_voice_head(VOICE_HEAD).meta
    if shipped.get("kind") in ("AttentionHead", "EnsembleHead"):  # a pipelines.voice_recipes head
        return _voice_recipe_oof(shipped["recipe"]["name"], seed)
    C = float(shipped["classifier"]["C"])
    uem = D.read_uem().records
    feat = VoiceFeaturizer(cache)
    X, clips = feat.many(uem, "voice uem")
    extra_X = np.zeros((0, X.shape[1]), np.float32)
    extra_y = np.array([])
    if D.EMODB in shipped["datasets"]:
        extra_X, emodb = feat.many(D.read_emodb().records, "voice emodb")
        extra_y = np.array([c.label for c in emodb])
    y = np.array([c.label for c in clips])
    speakers = np.array([c.speaker for c in clips])
    splits = D.grouped_folds(y, speakers, int(cfg["cv_folds"]), seed)
    p = np.zeros((len(y), len(LABELS)))
    for train, test in splits:
        Xt, yt = np.concatenate([X[train], extra_X]), np.concatenate([y[train], extra_y])
        model = fit_quiet(make_model(C, cfg, seed), Xt, yt)
        p[test] = _proba(model, X[test])
    return p, y, splits, clips


def _voice_recipe_oof(name: str, seed: int) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Out-of-fold probabilities of a `pipelines.voice_recipes` recipe (the shipped non-linear voice heads), on the
    same speaker folds, in clip order (cached by voice_recipes)."""
    import yaml

    from pipelines import voice_recipes as V

    vcfg = yaml.safe_load(V.DEFAULT_CONFIG.read_text(encoding="utf-8"))
    if int(vcfg["seed"]) != seed:
        log.warning("voice recipes use seed %s, fusion_eval %s: folds may differ", vcfg["seed"], seed)
    data = V.VoiceData(None, D.REPO_ROOT / ".cache" / "features", int(vcfg["seed"]), None)
    result = V.evaluate(name, vcfg["recipes"][name], data, vcfg, data.cache_dir)
    splits, _ = V.splits_for(data, vcfg)
    order = np.concatenate([test for _, test in splits])
    p = np.zeros((len(order), len(LABELS)))
    p[order] = result.cv.proba
    return p, data.labels(vcfg["eval_dataset"]), splits, data.clips[vcfg["eval_dataset"]]


def text_oof_emospeech(head_meta: dict, cfg: dict, seed: int, cache) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold probabilities of the shipped text recipe (its encoders and C) on EmoSPeech, grouped by video."""
    from pipelines.features import text_features

    rows = D.read_emospeech().records
    y = np.array([r.label for r in rows])
    X = text_features([r.text for r in rows], head_meta.get("encoders", ["e5"]), cache, "emospeech")
    C = float(head_meta["classifier"]["C"])
    p = np.zeros((len(y), len(LABELS)))
    for train, test in text_folds(rows, int(cfg["cv_folds"]), seed):
        p[test] = _proba(fit_quiet(make_model(C, cfg, seed), X[train], y[train]), X[test])
    return p, y


def score_rules(pv: np.ndarray, pt: np.ndarray, y: np.ndarray, splits) -> dict[str, tuple[list, list]]:
    from sklearn.metrics import accuracy_score, f1_score

    labels = np.array(LABELS)
    variants = {"voice alone": pv, "text alone": pt}
    for w in TEXT_WEIGHTS:
        for rule in FUSION_RULES:
            variants[f"{rule} (w={w:g})"] = fuse(pv, pt, rule, w)
    for gate in GATE_SENSITIVITY:
        variants[f"gated (w=0.5, gate {gate:g})"] = fuse(pv, pt, "gated", 0.5, gate)
    for w in MEAN_SENSITIVITY:
        variants[f"mean (w={w:g})"] = fuse(pv, pt, "mean", w)
    out = {}
    for name, p in variants.items():
        pred = labels[p.argmax(axis=1)]
        out[name] = (
            [float(f1_score(y[te], pred[te], average="macro")) for _, te in splits],
            [float(accuracy_score(y[te], pred[te])) for _, te in splits],
        )
    return out


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(prog="python -m pipelines.fusion_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--config", type=Path, default=D.REPO_ROOT / "configs" / "train" / "heads.yaml")
    p.add_argument("--pairings", type=int, default=5)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.features import DEFAULT_CACHE, Transcriber
    from streamer.classifier import TextModel

    started = time.perf_counter()
    cfg = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    seed = int(cfg.get("seed", 0))
    pv, y, splits, clips = voice_oof(cfg["voice"], seed, DEFAULT_CACHE)
    transcripts = Transcriber().many(clips, "uem transcripts")
    text_model = TextModel.load(threads=2)
    pt = np.full((len(y), len(LABELS)), 1 / len(LABELS))
    has_text = np.array([bool(t) for t in transcripts])
    pt[has_text] = text_model.predict_proba([t for t in transcripts if t])
    uem = score_rules(pv, pt, y, splits)

    pt_es, y_es = text_oof_emospeech(text_model.head.meta, cfg["text"], seed, DEFAULT_CACHE)
    rng = np.random.default_rng(seed)
    sims = []
    for _ in range(args.pairings):
        paired = np.zeros_like(pv)
        for label in LABELS:
            dst = np.flatnonzero(y == label)
            src = np.flatnonzero(y_es == label)
            paired[dst] = pt_es[rng.choice(src, size=len(dst), replace=len(src) < len(dst))]
        sims.append(score_rules(pv, paired, y, splits))
    sim = {
        k: (
            [np.mean([s[k][0][i] for s in sims]) for i in range(len(splits))],
            [np.mean([s[k][1][i] for s in sims]) for i in range(len(splits))],
        )
        for k in sims[0]
    }

    md = render(uem, sim, text_model, has_text, len(y), len(splits), args, time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md, encoding="utf-8")
    print(md)
    return 0


def render(uem, sim, text_model, has_text, n, folds, args, total) -> str:
    def cell(v):
        f1, acc = v
        return f"{np.mean(f1):.3f} ± {np.std(f1):.3f} | {np.mean(acc):.3f}"

    best_single_uem = max(np.mean(uem["voice alone"][0]), np.mean(uem["text alone"][0]))
    best_single_sim = max(np.mean(sim["voice alone"][0]), np.mean(sim["text alone"][0]))
    lines = [
        "# Late fusion of voice and words: which rule is safe?",
        "",
        "Reproduce: `.venv/bin/python -m pipelines.fusion_eval` (needs the voice feature and transcript caches, or"
        " about 10 min of Whisper on 2 cores to fill them).",
        "",
        f"Text model: `{text_model.model_id}`. UEM: {n} clips, {folds} speaker-grouped folds, {int(has_text.sum())}"
        " clips with a kept transcript (a clip without one gets a uniform text distribution, which every rule but"
        " `mean` and `product` ignores; at run time an empty transcript skips the text head).",
        "",
        "| rule | UEM (words uninformative) macro-F1 mean ± sd | acc | Δ vs best single |"
        " simulated pairs (both informative) macro-F1 | acc | Δ vs best single |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in uem:
        lines.append(
            f"| {k} | {cell(uem[k])} | {np.mean(uem[k][0]) - best_single_uem:+.3f} | {cell(sim[k])} |"
            f" {np.mean(sim[k][0]) - best_single_sim:+.3f} |"
        )
    lines += [
        "",
        "Rules (`streamer.classifier.fuse`, w = text weight): `gated` (the default) weights voice by (1 − w)·c_v and"
        " words by w·c_t·g_t, c = 1 − H(p)/log 6, g_t = clip((max non-neutral p_t − 0.6)/0.4, 0, 1): the words only"
        " count when they clearly name an emotion; `mean` (1 − w)·p_v + w·p_t; `entropy` / `maxprob`"
        " weight each modality by its prior weight × its certainty (1 − H(p)/log 6, or (max p − 1/6)/(5/6)) and take"
        " the weighted mean; `product` the normalised weighted geometric mean.",
        "",
        "**How the default was chosen, and what that means.** The gate threshold 0.6 was picked by looking at this"
        " very UEM check (0.5 and 0.7 are shown for sensitivity), so `gated` matching voice alone on UEM is an"
        " in-sample result, not an independent test. No certainty-only rule passes: on UEM transcripts the text"
        " head is often fairly sure (neutral, and sadness for some sentences), so weighting by certainty alone still"
        " drags the voice down; even `mean` with w = 0.1 loses a little. The gate encodes a prior rather than a fit:"
        ' words that say "neutral" are absence of evidence, which is also the failure seen on the Spanish film'
        " corpus (GUIDE §4: the words head said neutral to film dialogue and mean fusion lost to voice alone). The"
        " price is visible in the simulation: when both modalities are informative and independent, `gated` gains"
        " less over the better single modality than `mean` (+0.045 vs +0.094 here), because it ignores the words'"
        " neutral and hesitant votes. Only a paired held-out set can settle the trade-off.",
        "",
        "Simulated pairs: every UEM clip gets the out-of-fold text probabilities of a random EmoSPeech row with the"
        f" same label ({args.pairings} seeded pairings, averaged). Limits: the two modalities are independent given"
        " the label here (real speech is not), labels are UEM-balanced while EmoSPeech is mostly neutral/disgust,"
        " and fear has only 31 text rows, reused many times.",
        "",
        f"Run time: {total:.0f} s (with caches).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
