"""Train the shipped emotion heads (voice, Spanish text, English text) from a YAML recipe, with estimates.

    .venv/bin/python -m pipelines.train.heads --config configs/train/heads.yaml [--out streamer/models] [--limit N]
    .venv/bin/python -m pipelines.train.heads --calibrate-voice   # temperature of the voice --ship head
    .venv/bin/python -m pipelines.train.heads --heads text_ensemble   # the default Spanish words head
    .venv/bin/python -m pipelines.train.heads --words-cost [N]    # its run-time cost against the single e5 head

Voice: pooled Whisper-base encoder frames (the runtime's features) → standardise → logistic regression, scored
on UEM with speaker-grouped folds and on the authors' two held-out speakers. Text (`text`, Spanish):
multilingual-e5-small embeddings of the EmoSPeech transcripts → standardise → logistic regression, scored with
folds grouped by YouTube video. English text (`text_en`): the same recipe on GoEmotions and EmoEvent en with their
official splits: chosen on dev, scored once on test (`pipelines.train.heads_en`). Every (variant, C) in the
recipe is scored; the best by the recipe's `select_by` estimate is refitted and saved as a `LinearHead` (the
scaler is kept as the head's mean/scale).

The default Spanish words head (`text_ensemble`, `text_head_ens.npz`) is a soft vote of such logistic regressions
on sentence embeddings and one on TF-IDF n-grams, scored on the `text` folds against the single e5 head's recipe in
the same run (`train_text_ensemble`); the runtime reads it as arrays (`streamer.words.WordsEnsembleHead`).

Text heads get a softmax temperature fitted on held-out probabilities (out-of-fold for `text`, dev for
`text_en`), with the expected calibration error before and after in their meta; `--calibrate-voice` does the same
for the shipped voice head from its recipe's speaker-grouped out-of-fold probabilities.
The saved meta holds no dates or timings, so a rerun on the same data and environment gives the same head.
The model and its offsets are `pipelines.train.linear`; the grid of (variant, C) is `pipelines.train.selection`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from pipelines.data import corpora as D
from pipelines.evaluate.calibration import calibration
from pipelines.evaluate.metrics import estimate
from pipelines.train.heads_en import train_text_en
from pipelines.train.linear import classifier_meta, final_head, inner_bias, label_counts, oof_proba, shipped_head
from pipelines.train.selection import choose, score, short, table, text_head_meta, tried
from streamer.frames import LABELS
from streamer.heads import LinearHead
from streamer.voice_heads import load_voice_head

log = logging.getLogger("pipelines.train.heads")

VOICE_FILE, TEXT_FILE, TEXT_EN_FILE = "voice_head.npz", "text_head.npz", "text_head_en.npz"
TEXT_ENSEMBLE_FILE = "text_head_ens.npz"


# --------------------------------------------------------------------------- voice


def train_voice(cfg: dict, seed: int, root, limit, cache_dir) -> tuple[LinearHead, list[dict], dict]:
    from pipelines.data.features import VOICE_FEATURE_SPEC, VoiceFeaturizer
    from streamer.recogniser import RecogniserOptions

    opts = RecogniserOptions()
    if float(cfg["encoder_window_s"]) != opts.encoder_window_s:
        log.warning(
            "recipe encoder_window_s %s differs from the runtime default %s: features will not match the runtime",
            cfg["encoder_window_s"],
            opts.encoder_window_s,
        )
    opts.encoder_window_s = float(cfg["encoder_window_s"])
    readers = D.VOICE_READERS
    needed = sorted({name for names in cfg["variants"].values() for name in names} | {cfg["eval_dataset"]})
    unknown = [n for n in needed if n not in readers]
    if unknown:
        raise ValueError(f"voice: unknown datasets {unknown} (known: {sorted(readers)})")
    loaded = {name: readers[name](root) for name in needed}
    featurizer = VoiceFeaturizer(cache_dir, opts)
    feats, clips = {}, {}
    t0 = time.perf_counter()
    for name in needed:
        chosen = D.limit_records(loaded[name].records, limit, seed)
        feats[name], clips[name] = featurizer.many(chosen, f"voice features {name}")
    log.info(
        "voice features: %.1f s (%d cached, %d computed)", time.perf_counter() - t0, featurizer.hits, featurizer.misses
    )

    ev = cfg["eval_dataset"]
    X_ev = feats[ev]
    y_ev = np.array([c.label for c in clips[ev]])
    speakers = np.array([c.speaker for c in clips[ev]])
    cv_splits = D.grouped_folds(y_ev, speakers, int(cfg["cv_folds"]), seed)
    held = np.isin(speakers, cfg.get("heldout_speakers") or [])
    heldout_splits = [(np.flatnonzero(~held), np.flatnonzero(held))] if held.any() and (~held).any() else []

    results = []
    for variant, names in cfg["variants"].items():
        if ev not in names:
            raise ValueError(f"voice variant {variant}: must train on the evaluation dataset {ev}")
        others = [n for n in names if n != ev]
        X_extra = np.concatenate([feats[n] for n in others]) if others else np.zeros((0, X_ev.shape[1]), np.float32)
        y_extra = np.array([c.label for n in others for c in clips[n]])
        for C in cfg["C"]:
            est = {"cv": score(cv_splits, X_ev, y_ev, X_extra, y_extra, C, cfg, seed, "cv")}
            if heldout_splits:
                est["heldout"] = score(heldout_splits, X_ev, y_ev, X_extra, y_extra, C, cfg, seed, "heldout")
            results.append(
                {
                    "head": "voice",
                    "variant": variant,
                    "datasets": names,
                    "C": C,
                    "estimates": {k: v.summary() for k, v in est.items()},
                }
            )
            log.info("voice %-10s C=%-5g %s", variant, C, short(results[-1]))

    best = choose(results, cfg.get("select_by", "cv"))
    names = best["datasets"]
    X = np.concatenate([feats[n] for n in names])
    y = np.array([c.label for n in names for c in clips[n]])
    r = featurizer.recogniser
    meta = {
        "id": f"voice-{best['variant']}-whisperbase-w{opts.encoder_window_s:g}-meanstd-logreg-v{cfg['version']}",
        "head": "voice",
        "labels": list(LABELS),
        "feature": VOICE_FEATURE_SPEC,
        "input_dim": int(X.shape[1]),
        "encoder": r.model_id,
        "encoder_device": r.device,
        "encoder_compute_type": r.compute_type,
        "encoder_window_s": opts.encoder_window_s,
        "datasets": names,
        "n_train": len(y),
        "train_label_counts": label_counts(y),
        "classifier": classifier_meta(best["C"], cfg, seed),
        "cv": best["estimates"],
        "selected_by": f"{cfg.get('select_by', 'cv')} macro_f1_mean",
        "variants_tried": [tried(r_) for r_ in results],
        "limit": limit,
        "licence": "; ".join(D.VOICE_LICENCES[n] for n in names),
    }
    return final_head(X, y, best["C"], cfg, seed, meta), results, best


# --------------------------------------------------------------------------- text


def train_text(cfg: dict, seed: int, root, limit, cache_dir) -> tuple[LinearHead, list[dict], dict]:
    from pipelines.data.features import text_features

    loaded = D.read_emospeech(root, include_extra=True)
    rows = D.limit_records(loaded.records, limit, seed)
    feature_sets = cfg.get("features") or {"e5": ["e5"]}
    t0 = time.perf_counter()
    X_sets = {
        name: text_features([r.text for r in rows], encoders, cache_dir, "emospeech")
        for name, encoders in feature_sets.items()
    }
    log.info("text features: %.1f s", time.perf_counter() - t0)
    y_all = np.array([r.label for r in rows])
    source = np.array([r.source for r in rows])
    # one set of folds over all rows, grouped by video; each variant trains on its sources, all score the same rows
    splits_all = D.text_folds(rows, int(cfg["cv_folds"]), seed)

    results = []
    for feat_name, X_all in X_sets.items():
        for variant, sources in cfg["variants"].items():
            unknown = set(sources) - {"train", "extra"}
            if unknown:
                raise ValueError(f"text variant {variant}: unknown sources {sorted(unknown)}")
            use = np.isin(source, sources)
            splits = [(train[use[train]], test) for train, test in splits_all]
            for C in cfg["C"]:
                est = score(splits, X_all, y_all, np.zeros((0, X_all.shape[1])), np.array([]), C, cfg, seed, "cv")
                results.append(
                    {
                        "head": "text",
                        "variant": f"{variant} {feat_name}",
                        "sources_variant": variant,
                        "features": feat_name,
                        "datasets": [f"{D.EMOSPEECH}/{s}.csv" for s in sources],
                        "sources": list(sources),
                        "C": C,
                        "estimates": {"cv": est.summary()},
                    }
                )
                log.info("text  %-20s C=%-5g %s", results[-1]["variant"], C, short(results[-1]))

    select_by = cfg.get("select_by", "cv")
    best = choose(results, select_by)
    videos = np.array([r.youtube_key for r in rows])
    bias_groups = videos if cfg.get("bias_tuning") else None
    oof = {}  # id(result) → its out-of-fold probabilities and folds, for the temperature

    def held_out(r: dict) -> tuple[np.ndarray, np.ndarray]:
        use = np.isin(source, r["sources"])
        splits = [(train[use[train]], test) for train, test in splits_all]
        return oof_proba(splits, X_sets[r["features"]], y_all, r["C"], cfg, seed, bias_groups)

    if cfg.get("bias_tuning"):
        # per-class log-probability offsets for macro-F1, tuned on inner grouped folds of each training side only.
        # The best (variant, C) of every feature set gets a nested estimate on the same outer folds; the shipped
        # head is the best of those by that estimate.
        finalists = [choose([r for r in results if r["features"] == f], select_by) for f in X_sets]
        for r in finalists:
            oof[id(r)] = held_out(r)
            r["estimates"]["cv_bias"] = estimate("cv_bias", y_all, *oof[id(r)]).summary()
            log.info(
                "text  %-20s C=%-5g + bias (nested): %s",
                r["variant"],
                r["C"],
                short({"estimates": {"cv_bias": r["estimates"]["cv_bias"]}}),
            )
        select_by = "cv_bias"
        best = choose(finalists, select_by)
    p_oof, fold = oof[id(best)] if id(best) in oof else held_out(best)
    calib = calibration(p_oof, y_all, fold, f"out-of-fold probabilities of the {len(splits_all)} video-grouped folds")
    use = np.isin(source, best["sources"])
    X, y = X_sets[best["features"]][use], y_all[use]
    offsets = inner_bias(X, y, videos[use], best["C"], cfg, seed) if cfg.get("bias_tuning") else None
    encoders = list(feature_sets[best["features"]])
    meta = {
        **text_head_meta("text-emospeech", best, encoders, X, y, cfg, seed),
        "datasets": best["datasets"],
        "cv_grouping": "youtube_key, folds over train+extra; every variant scored on the same rows",
        "selected_by": f"{select_by} macro_f1_mean",
        "variants_tried": [tried(r_) for r_ in results],
        "limit": limit,
        "licence": "CC BY-NC 4.0 (inherited from the EmoSPeech 2024 / MEACorpus 2023 text): non-commercial use only",
        "languages": "es, and every language without a head of its own",
        "calibration": calib,
    }
    tuned_on = (
        "out-of-fold probabilities of 3 video-grouped folds of the training rows; estimate cv_bias is nested"
        " (offsets tuned inside each outer training side)"
    )
    return shipped_head(X, y, best["C"], cfg, seed, meta, offsets, tuned_on, calib), results, best


# --------------------------------------------------------------------------- the default Spanish words head: ensemble


class _Member:
    """One member recipe of the words ensemble: logistic regression on sentence embeddings (`encoders`) or on
    TF-IDF blocks (`tfidf`), fitted on row indices of the EmoSPeech rows."""

    def __init__(self, name: str, spec: dict, texts: np.ndarray, y: np.ndarray, cfg: dict, seed: int, cache_dir):
        from pipelines.data.features import text_features

        self.name, self.spec, self.texts, self.y, self.cfg, self.seed = name, spec, texts, y, cfg, seed
        self.tfidf = "tfidf" in spec
        self.X = None if self.tfidf else text_features(list(texts), spec["encoders"], cache_dir, "emospeech")

    def fit(self, C: float, idx: np.ndarray):
        from pipelines.train.linear import fit_quiet, make_model
        from pipelines.train.text import fit_tfidf

        if self.tfidf:
            return fit_tfidf(C, self.texts[idx], self.y[idx], None, self.seed, self.spec["tfidf"])
        return fit_quiet(make_model(C, self.cfg, self.seed), self.X[idx], self.y[idx])

    def proba(self, model, idx: np.ndarray) -> np.ndarray:
        from pipelines.train.linear import proba_in_label_order

        return proba_in_label_order(model, list(self.texts[idx]) if self.tfidf else self.X[idx])

    def oof(self, C: float, splits) -> np.ndarray:
        p = np.zeros((len(self.y), len(LABELS)))
        for train, test in splits:
            p[test] = self.proba(self.fit(C, train), test)
        return p


class _Votes:
    """Soft votes (equal weights) of fitted members on the outer folds: as they are, or with per-class offsets tuned
    on 3 inner video-grouped folds of each training side (nested: the test fold tunes nothing). Each member's inner
    out-of-fold probabilities are computed once and shared by every vote it is in."""

    def __init__(self, members: dict, C: dict, oof: dict, y: np.ndarray, videos: np.ndarray, splits, seed: int):
        self.members, self.C, self.oof, self.y, self.videos, self.splits, self.seed = (
            members, C, oof, y, videos, splits, seed
        )  # fmt: skip
        self._inner: dict = {}

    def plain(self, names) -> np.ndarray:
        return np.mean([self.oof[n] for n in names], axis=0)

    def _inner_vote(self, names, k: int, train: np.ndarray) -> np.ndarray:
        inner = D.grouped_folds(self.y[train], self.videos[train], 3, self.seed + 1)
        parts = []
        for n in names:
            if (n, k) not in self._inner:
                m, p = self.members[n], np.zeros((len(train), len(LABELS)))
                for itr, ite in inner:
                    p[ite] = m.proba(m.fit(self.C[n], train[itr]), train[ite])
                self._inner[n, k] = p
            parts.append(self._inner[n, k])
        return np.mean(parts, axis=0)

    def nested(self, names) -> np.ndarray:
        """Out-of-fold probabilities with nested offsets."""
        from pipelines.train.linear import apply_bias, tune_bias

        p_out, plain = np.zeros((len(self.y), len(LABELS))), self.plain(names)
        for k, (train, test) in enumerate(self.splits):
            p_out[test] = apply_bias(plain[test], tune_bias(self._inner_vote(names, k, train), self.y[train]))
        return p_out

    def final_offsets(self, names) -> np.ndarray:
        """The offsets of the final head: tuned on 3 inner grouped folds of all rows."""
        from pipelines.train.linear import tune_bias

        return tune_bias(self._inner_vote(names, -1, np.arange(len(self.y))), self.y)


def ensemble_oof(head, rows: list, splits, cache_dir) -> np.ndarray:
    """Out-of-fold probabilities (untempered) of a shipped words ensemble's recipe on other folds of `rows`: its
    members refitted at their C in each fold, voted, with nested offsets when the head has offsets."""
    recipe = head.meta["recipe"]
    seed = int(recipe["seed"])
    texts = np.array([r.text for r in rows], dtype=object)
    y = np.array([r.label for r in rows])
    names = list(head.meta["members"])
    members = {n: _Member(n, recipe["members"][n], texts, y, recipe, seed, cache_dir) for n in names}
    C = {n: float(head.meta["member_C"][n]) for n in names}
    oof = {n: members[n].oof(C[n], splits) for n in names}
    votes = _Votes(members, C, oof, y, np.array([r.youtube_key for r in rows]), splits, seed)
    return votes.nested(names) if head.meta["chosen"].endswith("+bias") else votes.plain(names)


def train_text_ensemble(cfg: dict, seed: int, root, limit, cache_dir, out: Path | None = None):
    """The default Spanish words head: the soft vote (equal weights) of member recipes (`members`: e5 LR, USE LR,
    e5 ⊕ USE LR, TF-IDF LR), each at the C its own out-of-fold macro-F1 prefers, on the video-grouped folds of the
    `text` head. Every average of `ensembles` is scored as is and with per-class offsets tuned on inner grouped folds
    of each training side (nested: the test fold tunes nothing); the best by mean macro-F1 without fear (ties: with
    fear) is shipped, with a temperature fitted on its out-of-fold probabilities. The shipped single-e5 head's
    recipe (its C, with and without its nested offsets) is scored on the same folds in the same run."""
    from pipelines.train.linear import final_head, oof_proba, proba_in_label_order
    from pipelines.train.selection import ENCODER_TAGS, TEXT_ENCODERS, TEXT_FEATURE_SPECS
    from pipelines.train.text import tfidf_head, words_scores
    from streamer.models import TEXT_HEAD
    from streamer.words import WordsEnsembleHead

    rows = D.limit_records(D.read_emospeech(root, include_extra=True).records, limit, seed)
    texts = np.array([r.text for r in rows], dtype=object)
    y = np.array([r.label for r in rows])
    videos = np.array([r.youtube_key for r in rows])
    splits = D.text_folds(rows, int(cfg["cv_folds"]), seed)
    fold = np.full(len(y), -1)
    for k, (_, test) in enumerate(splits):
        fold[test] = k
    n_boot = int(cfg.get("n_boot", 1000))
    t0 = time.perf_counter()
    members = {name: _Member(name, spec, texts, y, cfg, seed, cache_dir) for name, spec in cfg["members"].items()}
    log.info("words ensemble features: %.1f s", time.perf_counter() - t0)

    results, oof, chosen_C = [], {}, {}
    for name, m in members.items():
        best = None
        for C in m.spec["C"]:
            p = m.oof(float(C), splits)
            est = estimate("cv", y, p, fold).summary()
            results.append({"head": "words", "variant": f"member {name}", "C": float(C), "estimates": {"cv": est}})
            log.info("words member %-8s C=%-6g %s", name, C, short(results[-1]))
            if best is None or est["macro_f1_mean"] > best[0]:
                best = (est["macro_f1_mean"], float(C), p)
        chosen_C[name], oof[name] = best[1], best[2]

    votes = _Votes(members, chosen_C, oof, y, videos, splits, seed)

    def members_desc(ns) -> str:
        return " + ".join(f"{n} (C {chosen_C[n]:g})" for n in ns)

    candidates = {}  # name → (members, offsets?, out-of-fold probabilities)
    rows = {}  # name → its comparison row (`words_scores`), whose macro-F1 without fear chooses the shipped one
    for ens, names in cfg["ensembles"].items():
        candidates[ens] = (list(names), False, votes.plain(names))
        if cfg.get("bias_tuning"):
            candidates[f"{ens}+bias"] = (list(names), True, votes.nested(names))
        for cand in (ens, f"{ens}+bias") if cfg.get("bias_tuning") else (ens,):
            ns, off, p = candidates[cand]
            est = estimate("cv", y, p, fold).summary()
            C = "/".join(f"{chosen_C[n]:g}" for n in names)
            results.append({"head": "words", "variant": cand, "C": 0.0, "member_C": C, "estimates": {"cv": est}})
            log.info("words %-24s %s", cand, short(results[-1]))
            what = f"mean of {members_desc(ns)}" + (", nested offsets" if off else "")
            rows[cand] = words_scores(cand, what, p, y, fold, n_boot, seed)
    # fear has 31 rows: one more or less moves a fold's macro-F1 by up to 0.03, so the five other classes choose
    best_name = max(rows, key=lambda c: (rows[c]["macro_f1_no_fear_mean"], rows[c]["macro_f1_mean"]))
    rows[best_name]["what"] += " — **the new default head**"
    names, with_offsets, p_best = candidates[best_name]

    # the shipped single head's recipe on the same folds, with and without its nested offsets
    shipped = LinearHead.load(TEXT_HEAD)
    s_C, s_enc = float(shipped.meta["classifier"]["C"]), list(shipped.meta.get("encoders", ["e5"]))
    s_member = _Member("shipped", {"encoders": s_enc}, texts, y, cfg, seed, cache_dir)
    p_ship_plain = oof_proba(splits, s_member.X, y, s_C, cfg, seed)[0]
    p_ship = oof_proba(splits, s_member.X, y, s_C, cfg, seed, videos)[0] if cfg.get("bias_tuning") else p_ship_plain

    comparison = [
        words_scores(
            f"shipped {shipped.model_id}",
            f"the single head until now: {'+'.join(s_enc)} LR, C {s_C:g}, nested offsets",
            p_ship, y, fold, n_boot, seed,
        ),
        words_scores("shipped −offsets", "the same without offsets", p_ship_plain, y, fold, n_boot, seed),
    ]  # fmt: skip
    for n in members:
        comparison.append(words_scores(n, f"member: {members_desc([n])}", oof[n], y, fold, n_boot, seed))
    comparison += list(rows.values())
    new, old = next(r for r in comparison if r["recipe"] == best_name), comparison[0]
    if new["macro_f1_mean"] <= old["macro_f1_mean"]:
        log.warning("words ensemble %s (%.3f) does not beat the shipped head (%.3f)", best_name, new["macro_f1_mean"],
                    old["macro_f1_mean"])  # fmt: skip

    calib = calibration(
        p_best, y, fold, f"out-of-fold probabilities of {best_name} on the {len(splits)} video-grouped folds"
    )
    # final fits on all rows; offsets (when chosen) from 3 inner grouped folds of all rows
    everything = np.arange(len(y))
    offsets = votes.final_offsets(names) if with_offsets else np.zeros(len(LABELS))
    heads = []
    odd = ["", "   ", "🙂" * 20, "Ты меня бесишь!", "我很生气", "x" * 5000, "hola\t\tmundo  \n adiós"]
    check = list(texts[: min(len(texts), 200)]) + odd
    for n in names:
        m = members[n]
        meta_n = {"id": f"text-emospeech-member-{n}", "C": chosen_C[n], "seed": seed}
        if m.tfidf:
            model = m.fit(chosen_C[n], everything)
            head = tfidf_head(model, {**meta_n, "tfidf": {**m.spec["tfidf"]}})
            diff = float(np.abs(head.predict_proba(check) - proba_in_label_order(model, check)).max())
            if diff > 1e-6:
                raise AssertionError(f"TfidfHead differs from sklearn by {diff:.2e}")
            head = dataclasses.replace(head, meta={**head.meta, "sklearn_parity_max_abs_diff": float(f"{diff:.1e}")})
        else:
            enc = list(m.spec["encoders"])
            meta_n |= {
                "encoders": enc,
                "feature": " ⊕ ".join(TEXT_FEATURE_SPECS[e] for e in enc),
                "encoder": " + ".join(TEXT_ENCODERS[e].model_id for e in enc),
                "classifier": classifier_meta(chosen_C[n], cfg, seed),
            }
            head = final_head(m.X, y, chosen_C[n], cfg, seed, meta_n)
        heads.append(head)
    tags = "+".join(
        "tfidf" if members[n].tfidf else "-".join(ENCODER_TAGS[e] for e in members[n].spec["encoders"]) for n in names
    )
    meta = {
        "id": f"text-emospeech-train+extra-avg-{tags}-v{cfg['version']}",
        "head": "text",
        "labels": list(LABELS),
        "kind": "soft vote (equal weights) of the members' probabilities, then offsets, then temperature",
        "members": names,
        "member_C": {n: chosen_C[n] for n in names},
        "datasets": [f"{D.EMOSPEECH}/{s}.csv" for s in ("train", "extra")],
        "n_train": len(y),
        "train_label_counts": label_counts(y),
        "cv_grouping": "youtube_key, folds over train+extra (the folds of the `text` head)",
        "selected_by": "cv macro-F1 without fear (mean over the folds; ties: with fear) over the ensembles, with and"
        " without nested offsets: fear's 31 rows move a fold's macro-F1 by up to 0.03 a row",
        "chosen": best_name,
        "offsets": "tuned on 3 video-grouped folds of all rows (nested in CV)"
        if with_offsets
        else "none (CV prefers none)",
        "comparison": comparison,
        "calibration": calib,
        "limit": limit,
        "licence": "CC BY-NC 4.0 (inherited from the EmoSPeech 2024 / MEACorpus 2023 text): non-commercial use only",
        "languages": "es, and every language without a head of its own",
    }
    head = WordsEnsembleHead(tuple(heads), tuple([1.0 / len(heads)] * len(heads)), offsets, meta, calib["temperature"])
    chosen = next(r for r in results if r["variant"] == best_name)
    return head, results, chosen


def words_cost(n: int, seed: int, root) -> dict:
    """What the Spanish words heads cost at run time on one thread: loading each words model (fresh encoders) and
    the whole classifier with it, and milliseconds per transcript one at a time over `n` EmoSPeech transcripts,
    the single e5 head (`frozen`) and the ensemble interleaved (alternating which goes first); with the ensemble's
    parts (each encoder, the TF-IDF member) timed on the same transcripts."""
    from streamer.classifier import ClassifierOptions, EmotionClassifier
    from streamer.models import WORDS_HEADS
    from streamer.words import TfidfHead, load_words_model

    texts = [r.text for r in D.limit_records(D.read_emospeech(root, include_extra=True).records, n, seed)]
    names = ("frozen", "ensemble")
    load_s, models = {}, {}
    for name in names:
        t0 = time.perf_counter()
        models[name] = load_words_model(WORDS_HEADS[name], threads=1)
        load_s[name] = round(time.perf_counter() - t0, 3)
    classifier_s = {}
    for name in (*names, *names):  # twice each, interleaved: the second load finds the files in the page cache
        t0 = time.perf_counter()
        EmotionClassifier(ClassifierOptions(words_head=name, text_threads=1))
        classifier_s[name] = round(time.perf_counter() - t0, 3)
    ens = models["ensemble"]
    parts = {n_: e.encode for n_, e in zip(ens.encoder_names, ens.encoders, strict=True)}
    parts["tfidf"] = next(m for m in ens.members if isinstance(m, TfidfHead)).predict_proba
    for model in models.values():
        model.predict_proba(texts[:1])
    ms: dict[str, list[float]] = {k: [] for k in (*names, *parts)}
    for i, text in enumerate(texts):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            models[name].predict_proba([text])
            ms[name].append(1000 * (time.perf_counter() - t0))
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn([text])
            ms[name].append(1000 * (time.perf_counter() - t0))
    return {
        "n_texts": len(texts),
        "median_chars": int(np.median([len(t) for t in texts])),
        "words_model_load_s": load_s,
        "classifier_load_s": classifier_s,
        "median_ms": {k: round(float(np.median(v)), 2) for k, v in ms.items()},
        "p95_ms": {k: round(float(np.percentile(v, 95)), 2) for k, v in ms.items()},
    }


# --------------------------------------------------------------------------- the shipped voice head's temperature


def calibrate_voice(config: Path, path: Path, root, cache_dir) -> Path:
    """Fit the temperature of the voice head at `path` (the `ship` recipe of `config`) on that recipe's
    leave-one-corpus-out probabilities (`pipelines.evaluate.cross_corpus`, cold) when that run has stored them, else
    on its out-of-fold probabilities over the speaker-grouped UEM folds (cached by pipelines.train.voice when they
    have been computed before), and write it into the file; ECE before/after cross-fitted over the folds and on the
    held-out speakers test1 + test2 go into its meta. A stream-adapted head (`norm.*`, `prosody.norm.*` arrays) is
    calibrated on the causal-history predictions (order 0), also scored on the mostly-neutral histories, and keeps
    its normalisation and prosody arrays."""
    from pipelines.evaluate import cross_corpus
    from pipelines.train.voice.inputs import VoiceData
    from pipelines.train.voice.norm import SKEWED
    from pipelines.train.voice.recipes import evaluate
    from streamer.voice_heads import VoiceModel

    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    name, seed = cfg["ship"], int(cfg["seed"])
    model = VoiceModel.load(path)
    head = model.head
    shipped = head.meta.get("recipe", {}).get("name")
    if shipped != name:
        raise ValueError(f"{path} was shipped from recipe {shipped!r}, {config} ships {name!r}: ship it first")
    data = VoiceData(root, cache_dir, seed, head.meta.get("limit"))
    result = evaluate(name, cfg["recipes"][name], data, cfg, cache_dir)
    tests = {"heldout test1+test2": (result.heldout.proba, result.heldout.y_true)} if result.heldout else {}
    view = ""
    if model.adapts:
        view = " (causal stream histories, order 0)"
        for kind, label in (("cv", "cv"), ("heldout", "heldout test1+test2")):
            skewed = result.more.get(f"{kind}|{SKEWED} 0")
            if skewed is not None:
                tests[f"{label}, mostly-neutral history"] = (skewed.proba, skewed.y_true)
    loco = cross_corpus.proba_path(name, Path(cache_dir) / "cross_corpus" if cache_dir else None)
    if loco.is_file():  # fitted where the head meets corpora it never saw; the in-corpus folds become a test
        held = cross_corpus.Probabilities.load(loco)
        tests = {f"cv{view}": (result.cv.proba, result.cv.y_true), **tests}
        calib = calibration(
            held.cold,
            held.y,
            held.corpus,
            f"leave-one-corpus-out probabilities of recipe {name}, each clip alone (cold), on"
            f" {', '.join(dict.fromkeys(held.corpus))} ({D.repo_relative(loco)}); cross-fitted over the corpora",
            tests,
        )
    else:
        calib = calibration(
            result.cv.proba,
            result.cv.y_true,
            result.cv.fold,
            f"out-of-fold probabilities of recipe {name}{view} on the {len(np.unique(result.cv.fold))} speaker-grouped"
            " UEM folds; held-out: the same recipe trained without test1 + test2",
            tests,
        )
    head = dataclasses.replace(head, temperature=calib["temperature"], meta={**head.meta, "calibration": calib})
    dataclasses.replace(model, head=head).save(path)
    log.info("voice head %s: temperature %.4f → %s", head.model_id, calib["temperature"], path)
    return path


# --------------------------------------------------------------------------- main

HEADS = {
    "voice": (train_voice, VOICE_FILE),
    "text": (train_text, TEXT_FILE),
    "text_en": (train_text_en, TEXT_EN_FILE),
    "text_ensemble": (train_text_ensemble, TEXT_ENSEMBLE_FILE),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.train.heads", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=D.REPO_ROOT / "configs" / "train" / "heads.yaml")
    p.add_argument("--out", type=Path, default=D.REPO_ROOT / "streamer" / "models")
    p.add_argument("--limit", type=int, default=None, help="use at most N records per dataset (tiny runs)")
    p.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    p.add_argument("--data-dir", type=Path, default=None, help="default: $EMOTION_DATA_DIR or <repo>/../shared/data")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default <repo>/.cache/features)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--report", type=Path, default=None, help="also write every CV result as JSON here")
    p.add_argument(
        "--calibrate-voice",
        type=Path,
        nargs="?",
        const=D.REPO_ROOT / "configs" / "train" / "voice_recipes.yaml",
        default=None,
        metavar="VOICE_RECIPES_YAML",
        help="only fit the temperature of <out>/voice_head.npz (shipped by pipelines.train.voice --ship)",
    )
    p.add_argument(
        "--words-cost",
        type=int,
        nargs="?",
        const=200,
        default=None,
        metavar="N",
        help="only measure the Spanish words heads' run-time cost on N EmoSPeech transcripts (one thread)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.data.features import DEFAULT_CACHE

    cache_dir = None if args.no_cache else (args.cache_dir or DEFAULT_CACHE)
    if args.words_cost:
        print(json.dumps(words_cost(args.words_cost, 0, args.data_dir), indent=2))
        return 0
    if args.calibrate_voice:
        path = calibrate_voice(args.calibrate_voice, args.out / VOICE_FILE, args.data_dir, cache_dir)
        from streamer.models import sha256_of

        print(json.dumps(load_voice_head(path).meta["calibration"], indent=2))
        print(f"{path}: sha256 {sha256_of(path)}")
        return 0
    if args.limit is not None and args.limit < len(LABELS):
        p.error(f"--limit must be at least {len(LABELS)} (one example per label)")

    cfg = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    seed = int(cfg.get("seed", 0))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    all_results, chosen, saved = [], {}, []
    for name in args.heads:
        trainer, filename = HEADS[name]
        t0 = time.perf_counter()
        head, results, chosen[name] = trainer(cfg[name], seed, args.data_dir, args.limit, cache_dir)
        head.meta["recipe"] = {"config": D.repo_relative(args.config), **cfg[name], "seed": seed}
        path = _destination(args.out, filename)
        head.save(path)
        saved.append(path)
        all_results.extend(results)
        log.info("%s head %s → %s (%.1f s)", name, head.model_id, path, time.perf_counter() - t0)

    print()
    print(table(all_results, chosen))
    print()
    from pipelines.train.text import words_table
    from streamer.models import sha256_of
    from streamer.words import WordsEnsembleHead

    for path in saved:
        if path.name == TEXT_ENSEMBLE_FILE:
            head = WordsEnsembleHead.load(path)
            print(words_table(head.meta["comparison"]))
            print()
            what = f"members {'/'.join(head.meta['members'])}  T={head.temperature:g}"
        else:
            head = LinearHead.load(path)
            what = f"C={head.meta['classifier']['C']:g}"
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB  {head.model_id}  {what}  sha256 {sha256_of(path)}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(all_results, indent=2) + "\n", encoding="utf-8")
    return 0


def _destination(out: Path, filename: str) -> Path:
    """Where a head goes: `out/filename`, except that the package's voice head, when it is a non-linear head
    shipped by `pipelines.train.voice --ship`, is not overwritten by this LR recipe (it goes beside it)."""
    from streamer.models import VOICE_HEAD

    path = out / filename
    shipped = filename == VOICE_FILE and path.is_file() and path.resolve() == VOICE_HEAD.resolve()
    if shipped and not isinstance(load_voice_head(path), LinearHead):
        alt = out / "voice_head_logreg.npz"
        log.warning(
            "%s is shipped by pipelines.train.voice (configs/train/voice_recipes.yaml `ship`): not overwriting"
            " it; this LR voice head goes to %s",
            path,
            alt,
        )
        return alt
    return path


if __name__ == "__main__":
    sys.exit(main())
