"""Compare voice-head recipes on the speaker-grouped UEM folds of the shipped head; write docs/models/voice_recipes.md.

The command line of `python -m pipelines.train.voice`: the table, `--ship` of the config's recipe, or
`--runtime-cost` of the shipped head (the recipes themselves: `pipelines.train.voice.recipes`).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import yaml

from pipelines.data import corpora as D
from pipelines.evaluate.report import read_table, summarise, write_report
from pipelines.train.voice.costs import PROSODY_COST, cut_shift, encoder_cost, prosody_cost, runtime_cost, uses_prosody
from pipelines.train.voice.inputs import FrameSource, VoiceData
from pipelines.train.voice.norm import stream_columns
from pipelines.train.voice.recipes import DEFAULT_CONFIG, DEFAULT_OUT, evaluate
from pipelines.train.voice.report import intro, notes
from pipelines.train.voice.ship import ship
from streamer.voice_heads import VoiceModel

log = logging.getLogger("pipelines.train.voice")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.train.voice", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--recipes", nargs="+", default=None, help="only these recipes (default: all in the config)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown table (PNGs etc. go beside it)")
    p.add_argument("--limit", type=int, default=None, help="at most N clips per dataset (tiny runs)")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default <repo>/.cache/features)")
    p.add_argument("--no-cost", action="store_true", help="skip timing the encoder windows")
    p.add_argument("--refit", action="store_true", help="ignore cached recipe results")
    p.add_argument(
        "--replace-table",
        action="store_true",
        help="with --recipes: write only these rows (default: keep the other recipes' rows of --out as they are)",
    )
    p.add_argument("--ship", action="store_true", help="refit the config's `ship` recipe on all data and save it")
    p.add_argument("--models-dir", type=Path, default=D.REPO_ROOT / "streamer" / "models")
    p.add_argument(
        "--runtime-cost",
        type=int,
        nargs="?",
        const=120,
        default=None,
        metavar="CLIPS",
        help="only measure the run-time cost per utterance (prosody + normalisation + heads) of <models-dir>'s voice"
        " head on CLIPS UEM clips (default 120) and print it",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.data.features import DEFAULT_CACHE

    cfg = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    seed = int(cfg["seed"])
    data = VoiceData(args.data_dir, args.cache_dir or DEFAULT_CACHE, seed, args.limit)
    if args.runtime_cost is not None:
        model = VoiceModel.load(args.models_dir / "voice_head.npz")
        data.load([D.UEM])
        cost = runtime_cost(data, model, args.runtime_cost, seed)
        print(
            f"{model.model_id}: prosody + normalisation + heads + history update per utterance, one thread, over"
            f" {cost['clips']} UEM clips (median {cost['clip_s_median']:.1f} s, longest {cost['clip_s_max']:.1f} s):"
            f" wall median {cost['wall_ms_median']:.2f} ms, p90 {cost['wall_ms_p90']:.2f} ms, max"
            f" {cost['wall_ms_max']:.2f} ms ({cost['wall_ms_per_audio_s']:.2f} ms per audio second); thread CPU median"
            f" {cost['cpu_ms_median']:.2f} ms, p90 {cost['cpu_ms_p90']:.2f} ms"
        )
        shift = cut_shift(data, model, int(cfg.get("encoder_cost_clips", 24)), seed)
        if shift:
            print(
                f"prosody of the segmenter's cut against the whole clip ({shift['clips']:.0f} of {shift['of']:.0f}"
                " clips cut into one utterance), |difference| in prior std, median / p90: "
                + ", ".join(f"{n} {shift[n]:.2f} / {shift[n + ' p90']:.2f}" for n in model.prosody.names)
            )
        return 0
    started = time.perf_counter()
    names = args.recipes or list(cfg["recipes"])
    if args.ship:
        if not cfg.get("ship"):
            p.error(f"{args.config} names no `ship` recipe")
        names = [cfg["ship"]]
    unknown = [n for n in names if n not in cfg["recipes"]]
    if unknown:
        p.error(f"unknown recipes {unknown} (known: {list(cfg['recipes'])})")

    results = []
    for name in names:
        result = evaluate(name, cfg["recipes"][name], data, cfg, None if args.refit else data.cache_dir)
        s = summarise(result.cv, 200, seed)
        log.info("%-16s CV F1 %.3f ± %.3f  pooled %.3f", name, s["f1_mean"], s["f1_sd"], s["pooled_f1"])
        results.append(result)
    if args.ship:
        path = ship(names[0], cfg, data, args.models_dir, results[0], args.config)
        from streamer.models import sha256_of

        print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB, sha256 {sha256_of(path)})")
        return 0

    used = [cfg["recipes"][n] for n in names if cfg["recipes"][n]["model"] in ("logreg", "attention")]
    sources = {FrameSource(float(w)) for w in cfg.get("cost_windows", [])} | {FrameSource.of(r) for r in used}
    sources = sorted(sources, key=FrameSource.sort_key)
    costs = {} if args.no_cost else encoder_cost(data, sources, int(cfg.get("encoder_cost_clips", 24)), seed)
    with_prosody = [n for n in names if uses_prosody(n, cfg)]
    prosody_ms = None
    if with_prosody and not args.no_cost:
        prosody_ms = prosody_cost(data, int(cfg.get("encoder_cost_clips", 24)), seed)
    for name, r in zip(names, results, strict=True):
        stream_columns(r)
        rc = cfg["recipes"][name]
        if rc["model"] == "ensemble":
            rc = cfg["recipes"][rc["members"][0]]
        source = FrameSource.of(rc)
        frames = rc["model"] != "mfcc_mlp" and rc.get("frames", True)
        r.extras = {
            "encoder ms/utt": f"{costs[source]:.0f}" if source in costs and frames else "–",
            PROSODY_COST: f"{prosody_ms:.2f}" if prosody_ms is not None and name in with_prosody else "–",
            **r.extras,
        }
    total = time.perf_counter() - started
    kept = {}
    if args.recipes and not args.replace_table and args.out.is_file():
        # a run of some recipes updates their rows and keeps the others' (same config, same folds) as they were
        kept = {k: v for k, v in read_table(args.out).items() if k in cfg["recipes"] and k not in names}
        if kept:
            log.info("kept %d rows of %s that this run did not refit: %s", len(kept), args.out, ", ".join(kept))
    md = write_report(
        results,
        args.out,
        "Voice-head recipes on speaker-grouped folds",
        intro=intro(cfg, data, args),
        notes=notes(cfg, data, total, costs, tuple(kept)),
        n_boot=int(cfg.get("n_boot", 1000)),
        seed=seed,
        cv_name="CV",
        heldout_name="held-out test1+test2",
        kept=kept,
        order=[n for n in cfg["recipes"] if n in kept or n in names],
    )
    print(md.read_text(encoding="utf-8"))
    return 0
