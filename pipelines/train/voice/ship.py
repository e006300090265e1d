"""Ship a voice recipe: refit it on all its data and save the runtime's `VoiceModel` (head, stream normalisation,
prosody reader) as the package's voice head, with its estimates and recipe in the meta.

The temperature is fitted afterwards by `python -m pipelines.train.heads --calibrate-voice`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipelines.data import corpora as D
from pipelines.evaluate.report import RecipeResult, summarise
from pipelines.train.linear import final_head, label_counts
from pipelines.train.voice.inputs import FrameSource, VoiceData, cat_rows, prosody_columns, recipe_inputs
from pipelines.train.voice.models import torch_single_thread, train_attention
from pipelines.train.voice.norm import STREAM_COLUMNS, SpeakerNormalised, side_by_side, stream_columns, stream_sides
from streamer.adaptation import StreamNorm
from streamer.frames import LABELS
from streamer.prosody import ProsodyReader
from streamer.voice_heads import EnsembleHead, VoiceModel

log = logging.getLogger(__name__)
DELTA_FILE = "voice_encoder_delta.npz"  # a fine-tuned head's encoder delta, beside it in the package
DATASET_TAGS = {D.UEM: "uem", D.EMODB: "emodb", D.URDU: "urdu"}  # in the head's id


def fit_final(name: str, cfg: dict, data: VoiceData) -> tuple[VoiceModel, dict]:
    """Recipe `name` refitted on all its data (all 16 UEM speakers + extras): the runtime's `VoiceModel` (the head,
    its frames' `StreamNorm`, its `ProsodyReader`) and the meta entries.

    A `stream_norm` recipe trains on every speaker's frames (and prosody vectors) normalised by that speaker's own
    moments, as the CV training sides do; the model's `norm` (and its prosody's `norm`) is what the runtime applies
    before the head: the prior is the global mean / variance of the raw clean training frames (prosody vectors), n0
    and std from the config's `stream_norm`. A recipe with `prosody` gets a `ProsodyReader` of its columns. An
    ensemble's members must agree on each block they read (the runtime normalises the frames once and the prosody
    once, before every member)."""
    rc = cfg["recipes"][name]
    seed = int(cfg["seed"])
    if rc["model"] == "ensemble":
        return _fit_ensemble(name, rc, cfg, data)
    if rc["model"] not in ("logreg", "attention"):
        raise ValueError(f"{name}: a {rc['model']} recipe cannot be shipped (the runtime has frames and prosody only)")
    inp = recipe_inputs(rc, data, cfg)
    y = np.concatenate([data.labels(cfg["eval_dataset"]), inp.y_extra])
    source = FrameSource.of(rc)
    inputs = "+".join(b for b, on in (("frames", rc.get("frames", True)), ("prosody", rc.get("prosody"))) if on)
    info = {
        "recipe_name": name,
        "inputs": inputs,
        "datasets": list(rc["datasets"]),
        "encoder_window_s": source.window,
        **({"encoder_layers": source.layers} if source.layers else {}),
        **({"encoder_tuned": source.tuned} if source.tuned else {}),
        "n_train": len(y),
        "train_label_counts": label_counts(y),
        "augment_copies": int(rc.get("augment") or 0),
    }
    norms: dict[str, StreamNorm] = {}
    if rc.get("stream_norm"):
        sn = cfg["stream_norm"]
        sides = stream_sides(inp, rc, data, cfg)
        trained = {block: side.training(np.arange(len(inp.ev))) for block, side in sides.items()}
        rows, aug = side_by_side([r for r, _, _ in trained.values()]), next(iter(trained.values()))[1]
        for block, (_, _, prior) in trained.items():
            norms[block] = StreamNorm(prior[0], prior[1], float(sn["n0"]), bool(sn.get("std", True)))
            info["stream_norm" if block == "frames" else "prosody_norm"] = _norm_meta(block, sides[block], norms[block])
    else:
        rows, aug = cat_rows(inp.ev, inp.extra), inp.train_aug()
    prosody = None
    if rc.get("prosody"):
        from streamer.prosody import PROSODY_NAMES, PROSODY_SPEC

        prosody = ProsodyReader(tuple(PROSODY_NAMES[i] for i in prosody_columns(rc)), norms.get("prosody"))
        info["prosody"] = {
            "names": list(prosody.names),
            "spec": PROSODY_SPEC,
            "computed_on": "training: the whole clip; run time: the segmenter's cut (Utterance.audio), once per"
            " utterance in the engine's worker thread (streamer.prosody.ProsodyReader, arrays prosody.* in this file)",
        }
    t0 = time.perf_counter()
    if rc["model"] == "logreg":
        X, yy = (np.concatenate([rows, *aug]), np.tile(y, 1 + len(aug))) if aug else (rows, y)
        pooled = {"frames": "meanstd", "frames+prosody": "meanstd+prosody", "prosody": "prosody"}[inputs]
        head = final_head(X, yy, float(rc["C"]), cfg["logreg"], seed, {"id": f"{name}-{pooled}-logreg"})
        head = dataclasses.replace(head, inputs=inputs)
        info["classifier"] = {"type": "standardise + multinomial logistic regression (lbfgs)", "C": rc["C"]}
    else:
        acfg = {**cfg["attention"], **rc.get("attention", {})}
        train_seed = int(rc.get("train_seed", seed))
        head = train_attention(rows, y, acfg, bool(rc.get("stats")), train_seed, aug, {"id": f"{name}-attention"})
        info["classifier"] = {
            "type": "attention pooling (BSC-UPC) → Linear+Dropout+LayerNorm+GELU(tanh) → Linear; weighted CE, AdamW",
            **acfg,
            "stats": bool(rc.get("stats")),
            "train_seed": train_seed,
            "torch": torch_single_thread().__version__,
        }
    log.info("refitted %s on %d clips in %.0f s", name, len(y), time.perf_counter() - t0)
    return VoiceModel(head, norms.get("frames"), prosody), info


def _fit_ensemble(name: str, rc: dict, cfg: dict, data: VoiceData) -> tuple[VoiceModel, dict]:
    """The members refitted and flattened into one `EnsembleHead`: a member that is itself an ensemble contributes
    its members at its share of the weight."""
    parts = [fit_final(m, cfg, data) for m in rc["members"]]
    heads, weights = [], []
    for model, _ in parts:
        head = model.head
        inner = head.members if isinstance(head, EnsembleHead) else (head,)
        inner_w = head.weights or [1 / len(inner)] * len(inner) if isinstance(head, EnsembleHead) else [1.0]
        heads += inner
        weights += [w / len(parts) for w in inner_w]
    infos = [i for _, i in parts]
    sources = {FrameSource.of_info(i) for i in infos if "frames" in i["inputs"]}
    if len(sources) > 1:
        raise ValueError(f"{name}: members read frames of different encoder passes {sorted(s.name for s in sources)}")
    source = next(iter(sources), FrameSource(infos[0]["encoder_window_s"]))
    norm = _shared(name, "stream normalisation", [m.norm for m, i in parts if "frames" in i["inputs"]], _same_norm)
    prosody = _shared(name, "prosody", [m.prosody for m, i in parts if "prosody" in i["inputs"]], _same_prosody)
    info = {
        "members": infos,
        "inputs": "+".join(b for b in ("frames", "prosody") if any(b in i["inputs"] for i in infos)),
        "datasets": list(dict.fromkeys(d for i in infos for d in i["datasets"])),
        "encoder_window_s": source.window,
        **({"encoder_layers": source.layers} if source.layers else {}),
        **({"encoder_tuned": source.tuned} if source.tuned else {}),
    }
    for key in ("stream_norm", "prosody", "prosody_norm"):  # the members that have one agree (checked above)
        info |= next(({key: i[key]} for i in infos if key in i), {})
    return VoiceModel(EnsembleHead(tuple(heads), {"id": name}, tuple(weights)), norm, prosody), info


def _norm_meta(block: str, side: SpeakerNormalised, norm: StreamNorm) -> dict:
    """How a block (the encoder frames, or the prosody vectors) was normalised, for the head's meta."""
    what = {"frames": "frame", "prosody": "prosody vector"}[block]
    prior_rows = int(side.ev_sums.n.sum() + side.extra_sums.n.sum())
    return {
        "training": f"each speaker's {what}s (UEM, EmoDB"
        + ("; augmented copies by their clean clip's statistics" if block == "frames" else "")
        + f") minus that speaker's {what} mean"
        + (f", over its {what} std" if norm.std else ""),
        "runtime": f"a stream's utterance k is normalised by the {what} moments of its utterances 0..k-1, shrunk"
        " toward the prior with weight k/(k+n0) (streamer.adaptation.StreamNorm, arrays "
        + ("norm.*" if block == "frames" else "prosody.norm.*")
        + " in this file)",
        "prior": f"global {what} mean / variance of the raw clean training {what}s, every {what} weighted alike",
        f"prior_{'frames' if block == 'frames' else 'rows'}": prior_rows,
        "n0": norm.n0,
        "std": norm.std,
    }


def _shared(name: str, what: str, values: list, same: Callable) -> object | None:
    """The one value of a block that the members reading it share (None when none reads it, or none normalises)."""
    if any(not same(values[0], v) for v in values[1:]):
        raise ValueError(f"{name}: members differ in {what} (all or none, on the same data)")
    return values[0] if values else None


def _same_norm(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return (a.n0, a.std) == (b.n0, b.std) and np.array_equal(a.mean, b.mean) and np.array_equal(a.var, b.var)


def _same_prosody(a: ProsodyReader, b: ProsodyReader) -> bool:
    return a.names == b.names and _same_norm(a.norm, b.norm)


def ship(name: str, cfg: dict, data: VoiceData, out: Path, result: RecipeResult | None, config: Path) -> Path:
    """Refit `name` on all its data and save it as the package's voice head (with its stream normalisation for a
    `stream_norm` recipe and its prosody block for a `prosody` one), estimates and recipe in its meta. The
    temperature is 1: fit it with `python -m pipelines.train.heads --calibrate-voice` afterwards."""
    seed = int(cfg["seed"])
    model, info = fit_final(name, cfg, data)
    estimates = {}
    if result is not None:
        for kind, pred in (("cv", result.cv), ("heldout", result.heldout)):
            if pred is not None:
                s = summarise(pred, int(cfg.get("n_boot", 1000)), seed)
                estimates[kind] = {
                    "folds": s["folds"],
                    "n_test": s["n"],
                    "macro_f1_mean": round(s["f1_mean"], 4),
                    "macro_f1_sd": round(s["f1_sd"], 4),
                    "accuracy_mean": round(s["acc_mean"], 4),
                    "pooled_macro_f1": round(s["pooled_f1"], 4),
                    "pooled_macro_f1_ci95": [round(v, 4) for v in s["ci"]],
                }
        if model.adapts:  # the main CV / held-out rows are the causal history, order 0
            estimates["view"] = "causal stream history (each test speaker's clips in a random order), order 0"
            columns = stream_columns(dataclasses.replace(result, more=dict(result.more))).extras
            estimates["stream_norm"] = {how: columns[c] for how, c in STREAM_COLUMNS.items() if c in columns}
    layers = info.get("encoder_layers")
    featurizer = data.featurizer(FrameSource.of_info(info))
    datasets = info["datasets"]
    tuned = info.get("encoder_tuned")
    # v6: fine-tuned layers; v5: the voice branch's own encoder pass; v4: prosody; v3: stream norm
    version = 6 if tuned else 5 if layers else 4 if model.prosody is not None else 3 if model.norm is not None else 2
    frames = (f"layer{layers}" + ("ft" if tuned else "")) if layers else f"w{info['encoder_window_s']:g}"
    delta = {}
    if tuned:  # the fine-tuned layers' delta ships beside the head
        from pipelines.train.voice.finetune import delta_for
        from streamer.models import sha256_of

        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(delta_for(tuned, seed, data.limit), out / DELTA_FILE)
        delta = {"encoder_delta": DELTA_FILE, "encoder_delta_sha256": sha256_of(out / DELTA_FILE)}
    meta = {
        "id": f"voice-{'+'.join(DATASET_TAGS[n] for n in datasets)}-whisperbase-{frames}-{name}-v{version}",
        "head": "voice",
        "kind": type(model.head).__name__,
        "labels": list(LABELS),
        "feature": (
            f"whisper-encoder-layer{layers}-unpadded-frames (streamer.voice_encoder)"
            + (f", the layers fine-tuned ({DELTA_FILE})" if tuned else "")
            if layers
            else "whisper-encoder-last-layer-covered-frames"
        )
        + " (float32 at run time, float16 cache in training)"
        + ("; streamer.prosody features of the utterance (meta prosody)" if model.prosody is not None else ""),
        "encoder": featurizer.encoder_id,
        "encoder_device": featurizer.device,
        "encoder_compute_type": featurizer.compute_type,
        **delta,
        **info,
        "cv": estimates,
        "selected_by": cfg.get("selected_by")
        or "cv macro_f1_mean above the previous head's, held-out not worse, among the recipes of"
        " docs/models/voice_recipes.md (chosen after seeing them: mildly optimistic)"
        + ("; stream-normalised: scored with causal stream histories" if model.adapts else ""),
        "limit": data.limit,
        "seed": seed,
        "licence": "; ".join(D.VOICE_LICENCES[n] for n in datasets),
        "recipe": {
            "config": D.repo_relative(config),
            "name": name,
            "recipes": recipe_closure(name, cfg),
            "seed": seed,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "voice_head.npz"
    dataclasses.replace(model, head=dataclasses.replace(model.head, meta=meta)).save(path)
    return path


def recipe_closure(name: str, cfg: dict) -> dict:
    """The recipe and, for an ensemble, every member recipe under it, by name."""
    rc = cfg["recipes"][name]
    out = {name: rc}
    for m in rc.get("members", []):
        out |= recipe_closure(m, cfg)
    return out
