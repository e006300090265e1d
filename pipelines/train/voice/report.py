"""The prose around the voice recipes' table in docs/models/voice_recipes.md: how to reproduce it, what the
columns mean, the settings of each kind of recipe and the caveats.

Apart from the runner so that the table's code and its explanation can be read (and changed) separately.
"""

from __future__ import annotations

from pipelines.train.voice.inputs import VoiceData


def intro(cfg: dict, data: VoiceData, args) -> str:
    ev = cfg["eval_dataset"]
    counts = ", ".join(f"{n} {len(c)} clips" for n, c in data.clips.items())
    return (
        "Reproduce (2 CPU cores; features cached under `.cache/features/`):\n\n```sh\n"
        ".venv/bin/python -m pipelines.train.voice" + (f" --limit {args.limit}" if args.limit else "") + "\n```\n\n"
        f"Data: {counts}. Every recipe is scored on the same {cfg['cv_folds']} folds over {ev}, grouped by speaker"
        f" (2 unseen speakers per fold; the folds and clips of `pipelines.train.heads`, seed {cfg['seed']}), and on"
        f" the authors' held-out speakers {' + '.join(cfg['heldout_speakers'])} after training on the other 14."
        " EmoDB (and Urdu, for the `L*` recipes) is only ever on the training side. Macro-F1 mean ± sd is over folds;"
        " the pooled macro-F1 is over all out-of-fold predictions together, with a"
        f" {cfg.get('n_boot', 1000)}-resample bootstrap 95 % CI over clips. Encoder cost: median wall ms of one"
        " encoder pass per UEM clip (int8; recognition's `Recogniser._encode` on 2 threads, the voice branch's"
        " `VoiceEncoder.frames` on 1; this machine, other work running beside it); head cost: numpy (LR,"
        " attention) or torch (MLP) per clip, frames → probabilities. These are in-corpus scores; the shipped"
        " head is chosen across corpora: [cross_corpus.md](cross_corpus.md) (`pipelines.evaluate.cross_corpus`)."
    )


def notes(cfg: dict, data: VoiceData, total: float, costs: dict[float, float], kept: tuple[str, ...] = ()) -> str:
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(data.skipped.items())) or "none"
    a = cfg["attention"]
    cost_table = ""
    if costs:
        cost_table = (
            "Encoder cost per utterance by frame source (median of "
            f"{cfg.get('encoder_cost_clips', 24)} UEM clips, int8; recognition 2 threads, the voice pass 1):\n\n"
            "| frames | encoder ms/utt |\n|---|---|\n"
            + "".join(f"| {s.name} | {ms:.0f} |\n" for s, ms in sorted(costs.items(), key=lambda c: c[0].sort_key()))
            + "\n"
        )
    shipped = (
        f"Shipped as the package's voice head: `{cfg['ship']}` (`--ship`; why, and its limits:"
        " streamer/models/MODEL_CARD.md)."
        if cfg.get("ship")
        else "Shipped: none of these (the config's `ship` is null)."
    )
    return (
        shipped
        + "\n\n"
        + cost_table
        + _stream_note(cfg)
        + _prosody_note(cfg)
        + f"Skipped input (counted, never silent): {skipped}.\n\n"
        f"Attention heads: hidden {a['hidden']}, dropout {a['dropout']}, AdamW lr {a['lr']} wd {a['weight_decay']},"
        f" {a['epochs']} epochs of batch {a['batch']}, random {a['crop_frames']}-frame crops with repeat"
        " padding, lr × 0.9 after 5 epochs without a lower training loss, class-weighted cross-entropy,"
        " standardisation with the training side's frame mean/std, one torch thread, seed"
        f" {cfg['seed']}. Scored on the whole utterance (no crop) by the numpy head the runtime uses."
        " `+aug`: every training clip (UEM and EmoDB) has one cached augmented copy, re-encoded by Whisper: speed ×0.9"
        " or ×1.1, coloured noise at 5–20 dB SNR, synthetic reverberation (RT60 0.2–0.9 s), each with p 0.5 and at"
        " least one; the attention heads use the copy instead of the clip with p 0.3 per epoch, the LR adds all"
        " copies as rows. Test folds are never augmented, except in the `CV, augmented test clips` column, which"
        " scores the same CV fits on each test clip's augmented copy (a robustness check; in-distribution for the"
        " `+aug` recipes). `-s1`/`-s2`: the same recipe with training seed 1/2 (same folds); ensembles average the"
        " members' out-of-fold probabilities. Fit times are wall seconds with other jobs sharing the 2 cores; the"
        " MLP's head cost excludes computing the MFCCs.\n\n"
        "Caveats: C, epochs and sizes were set once, not tuned per fold; choosing the best of these rows on the"
        " same folds is mildly optimistic. test1 and test2 are also inside the CV folds. The CI resamples clips,"
        " which are not independent within a speaker, so it is narrower than a speaker-level interval."
        + (
            f" Run time of this table: {total:.0f} s."
            if not kept
            else f" Run time of the last run ({total:.0f} s) covers its recipes only; the rows of"
            f" {', '.join(f'`{n}`' for n in kept)} were kept from the previous table (same config, folds and code"
            " path; rerun them with `--recipes` or the whole table without it)."
        )
    )


def _prosody_note(cfg: dict) -> str:
    if not any(rc.get("prosody") for rc in cfg["recipes"].values()):
        return ""
    from streamer.prosody import PROSODY_NAMES

    return (
        "Prosody (`prosody`, issue #3): Whisper's encoder was trained for recognition and is partly blind to pitch and"
        " loudness, so these recipes add 15 numbers per clip from `streamer.prosody` (numpy, one core; the `prosody"
        " ms/utt` column is the median over the same UEM clips as the encoder cost): "
        + ", ".join(f"`{n}`" for n in PROSODY_NAMES)
        + ". F0 is tracked YIN-style on the audio decimated to 8 kHz (70–450 Hz, 25 ms windows every 20 ms), in"
        " semitones re 100 Hz; energy in dB re full scale. `-sn`: the prosody vectors are normalised per speaker"
        " exactly as the frames (training side: the speaker's own mean and std; test side: the stream's earlier"
        " clips, shrunk toward the training side's moments), each block with its own moments and the same histories;"
        " without `-sn` they are standardised globally. The LR on frames + prosody keeps the frames' C (0.03, the"
        " prosody columns standardised like the others); the prosody-only LR has C = 1; both set once, not tuned."
        " The ensemble with prosody swaps the shipped ensemble's LR member for the LR on frames + prosody; the"
        " late fusion averages the shipped ensemble's two members and the prosody-only LR in thirds (set a priori,"
        " not tuned on any fold). The extraction's settings (thresholds, range, hop) were set before any row was"
        " scored. `-nodur` (an ablation added after seeing the rows): without `voiced_rate`, `active_ratio` and"
        " `log_active_s`, which depend on how an utterance is cut and how long its sentence is (the acted corpora say"
        " fixed sentences; live utterances are VAD cuts of any sentence); what remains is pitch, energy, tilt and"
        " zero crossings. Prosody is computed on the whole clip here; at run time on the segmenter's cut (250 ms of"
        " pre-roll, 32 ms after the last speech window), which is why only `-nodur` recipes were candidates to"
        " ship. The shipped head's cost per utterance at run time (prosody, normalisation, heads) and how far the cut"
        " moves each prosody column: `python -m pipelines.train.voice --runtime-cost`.\n\n"
    )


def _stream_note(cfg: dict) -> str:
    sn = cfg.get("stream_norm")
    if not sn or not any(rc.get("stream_norm") for rc in cfg["recipes"].values()):
        return ""
    return (
        "Stream normalisation (`-sn`, issue #3): in live use a stream (a microphone, one side of a call) is one"
        " speaker, so the runtime could keep running sums of the encoder frames of the stream's past utterances"
        " and normalise the next one by them. Training side: each speaker's frames (UEM and EmoDB; the augmented"
        " copies by their clean clips' statistics) minus that speaker's frame mean, over its frame std. Test side,"
        " causal: each unseen speaker's clips in a random order; clip k is normalised by the frame moments of"
        " clips 0..k-1, shrunk toward the training side's global moments with weight"
        f" k / (k + {sn['n0']}) (n0 set once, not tuned; clip 0 gets the global ones). The main CV / held-out"
        " columns are order 0; the `causal history` column is the mean ± sd over"
        f" {sn['orders']} random orders (CV: fold-mean macro-F1; held-out: pooled macro-F1). Acted corpora give"
        " each speaker every emotion alike, which flatters a stream's statistics; the `mostly-neutral history`"
        f" column draws each clip's history ({sn['orders']} draws) from the other clips of its speaker with"
        f" {100 * float(sn['neutral_share']):.0f} % neutral ones, min(k, cap) clips (cap: UEM has only ~12"
        " neutral clips per speaker, so at most ~18), as a real, mostly neutral stream would have heard."
        " `transductive`: all clips of the speaker, the clip itself included, no shrinkage: an upper bound that"
        " no live stream has. Ensembles of `-sn` members use the same histories for every member.\n\n"
    )
