"""Typed readers for the labelled data in `../shared/data` and grouped folds over them.

Nothing here is committed with the project: the data folder is found through `EMOTION_DATA_DIR`
(default `<repo>/../shared/data`). Records outside the six EmoSPeech labels (UEM, GoEmotions and EmoEvent
surprise, EmoDB boredom), multi-label rows, empty texts and missing audio files are skipped; every skip is
counted and logged as a warning. English text (GoEmotions, EmoEvent en) comes with its official
train/dev/test split in `TextRow.source`. The licence of each corpus is here too, since every head trained on one
carries it in its meta.
"""

from __future__ import annotations

import csv
import html
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from streamer.frames import LABELS

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

UEM = "speech_es_uem"
EMODB = "speech_de_emodb"
URDU = "speech_ur_urdu"
EMOSPEECH = "text_es_emospeech2024"
EMOEVENT = "text_es_en_emoevent"
GOEMOTIONS = "text_en_goemotions"
SPLITS = ("train", "dev", "test")  # the official splits of GoEmotions and EmoEvent

# Labels outside the six EmoSPeech labels that a dataset is known to carry; they are dropped on purpose.
DROPPED = {
    UEM: {"surprise"},
    EMODB: {"boredom"},
    URDU: set(),
    EMOSPEECH: set(),
    EMOEVENT: {"surprise"},
    GOEMOTIONS: {"surprise"},
}
# EmoEvent's "others" means "neutral or another emotion"; it is mapped to neutral (an approximation).
EMOEVENT_LABELS = {"others": "neutral"}
# EmoEvent's anonymisation placeholders, removed so tweets look a little more like speech transcripts.
EMOEVENT_PLACEHOLDERS = ("USER", "HASHTAG", "URL")
_PLACEHOLDER_RE = re.compile(r"\b(?:" + "|".join(EMOEVENT_PLACEHOLDERS) + r")\b")
# The split files hold the raw tweets (HTML entities escaped): links, @mentions, #hashtags and stray # are removed,
# as the full csv's anonymisation did, and so are its leftovers (USER, also glued to a word or as USER_d).
_RAW_TWEET_RE = re.compile(r"https?://\S+|@\w+|#\w*|USER(?:_\w+)?|\b(?:HASHTAG|URL)\b")

# UEM file-name prefixes (column label_es) and EmoDB file-name codes (6th character, column code).
UEM_LABELS_ES = {
    "Alegria": "joy",
    "Asco": "disgust",
    "Ira": "anger",
    "Miedo": "fear",
    "Neutro": "neutral",
    "Tristeza": "sadness",
    "Sorpresa": "surprise",
}
EMODB_CODES = {
    "W": "anger",
    "L": "boredom",
    "E": "disgust",
    "A": "fear",
    "F": "joy",
    "T": "sadness",
    "N": "neutral",
}


class DataError(RuntimeError):
    """The data folder or one of its files is missing or malformed."""


@dataclass(frozen=True)
class SpeechClip:
    dataset: str
    path: Path
    label: str
    speaker: str
    split: str  # UEM: train | test_unseen_speaker; EmoDB: all


@dataclass(frozen=True)
class TextRow:
    dataset: str
    id: str
    label: str
    text: str
    youtube_key: str  # the group of grouped folds: the video for EmoSPeech, the row itself elsewhere
    source: str  # EmoSPeech: train | extra; EmoEvent full csv: emoevent; official splits: train | dev | test
    language: str = "es"


@dataclass
class Loaded(Generic[T]):
    """Records read from one dataset plus why others were skipped (reason → count)."""

    name: str
    records: list[T]
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.records)

    def label_counts(self) -> dict[str, int]:
        counts = Counter(r.label for r in self.records)  # type: ignore[attr-defined]
        return {label: counts.get(label, 0) for label in LABELS}


def data_dir(path: str | Path | None = None) -> Path:
    """The shared data folder: the argument, else `$EMOTION_DATA_DIR`, else `<repo>/../shared/data`."""
    if path is not None:
        return Path(path)
    env = os.environ.get("EMOTION_DATA_DIR")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data").resolve()


def dataset_dir(name: str, root: str | Path | None = None) -> Path:
    folder = data_dir(root) / name
    if not folder.is_dir():
        raise DataError(f"dataset {name} not found at {folder} (set EMOTION_DATA_DIR to the folder that holds {name}/)")
    return folder


def _read_csv(path: Path, required: Sequence[str], tabs: bool = False) -> list[dict[str, str]]:
    """Rows of a csv with a header; `tabs`: EmoEvent's tab-separated files, read with quoting off (tweets contain
    quotes)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tabs else csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
        return list(reader)


def _warn_skips(loaded: Loaded) -> Loaded:
    if loaded.skipped:
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(loaded.skipped.items()))
        log.warning("%s: kept %d records, skipped %s", loaded.name, len(loaded.records), detail)
    return loaded


def _label_skip(dataset: str, label: str) -> str | None:
    """None when the label is one of LABELS, else the reason it is skipped."""
    if label in LABELS:
        return None
    return f"label {label}" if label in DROPPED[dataset] else f"unknown label {label!r}"


def _speech_clip(dataset: str, folder: Path, row: dict, label: str, speaker: str, split: str, skipped: Counter):
    reason = _label_skip(dataset, label)
    if reason:
        skipped[reason] += 1
        return None
    path = folder / row["path"]
    if not path.is_file() or path.stat().st_size == 0:
        log.warning("%s: audio file missing or empty: %s", dataset, path)
        skipped["missing audio"] += 1
        return None
    return SpeechClip(dataset=dataset, path=path, label=label, speaker=speaker, split=split)


def read_uem(root: str | Path | None = None) -> Loaded[SpeechClip]:
    """Acted Spanish speech, 16 speakers; `split` test_unseen_speaker marks the authors' held-out test1/test2."""
    folder = dataset_dir(UEM, root)
    loaded: Loaded[SpeechClip] = Loaded(UEM, [])
    for row in _read_csv(folder / "manifest.csv", ("path", "label_es", "label", "speaker", "orig_split")):
        label = UEM_LABELS_ES.get(row["label_es"], row["label"])
        if label != row["label"]:
            log.warning("%s: %s has label %r but prefix %r", UEM, row["path"], row["label"], row["label_es"])
            loaded.skipped["label disagrees with file name"] += 1
            continue
        clip = _speech_clip(UEM, folder, row, label, row["speaker"], row["orig_split"], loaded.skipped)
        if clip:
            loaded.records.append(clip)
    return _warn_skips(loaded)


def read_emodb(root: str | Path | None = None) -> Loaded[SpeechClip]:
    """Acted German speech (EmoDB, 2 s clips at 22.05 kHz); labels from the file-name code, boredom dropped."""
    folder = dataset_dir(EMODB, root)
    loaded: Loaded[SpeechClip] = Loaded(EMODB, [])
    for row in _read_csv(folder / "manifest.csv", ("path", "speaker", "code", "label")):
        label = EMODB_CODES.get(row["code"], row["label"])
        if label != row["label"]:
            log.warning("%s: %s has label %r but code %r", EMODB, row["path"], row["label"], row["code"])
            loaded.skipped["label disagrees with file name"] += 1
            continue
        speaker = f"emodb{int(row['speaker']):02d}" if row["speaker"].isdigit() else row["speaker"]
        clip = _speech_clip(EMODB, folder, row, label, speaker, "all", loaded.skipped)
        if clip:
            loaded.records.append(clip)
    return _warn_skips(loaded)


def read_urdu(root: str | Path | None = None) -> Loaded[SpeechClip]:
    """Natural Urdu talk-show speech (29 speakers, 1–3 s clips; anger, joy, neutral and sadness only): a voice and
    cross-corpus set, the only one here not acted (its words are Urdu and carry nothing for the words heads)."""
    folder = dataset_dir(URDU, root)
    loaded: Loaded[SpeechClip] = Loaded(URDU, [])
    for row in _read_csv(folder / "manifest.csv", ("path", "label", "speaker")):
        clip = _speech_clip(URDU, folder, row, row["label"], f"urdu-{row['speaker']}", "all", loaded.skipped)
        if clip:
            loaded.records.append(clip)
    return _warn_skips(loaded)


def read_emospeech(root: str | Path | None = None, include_extra: bool = True) -> Loaded[TextRow]:
    """EmoSPeech 2024 training transcripts (`train.csv`) and, optionally, the extra MEACorpus rows."""
    folder = dataset_dir(EMOSPEECH, root)
    loaded: Loaded[TextRow] = Loaded(EMOSPEECH, [])
    sources = ("train", "extra") if include_extra else ("train",)
    for source in sources:
        for row in _read_csv(folder / f"{source}.csv", ("id", "label", "transcription", "youtube_key")):
            reason = _label_skip(EMOSPEECH, row["label"])
            text = " ".join(row["transcription"].split())
            if reason is None and not text:
                reason = "empty text"
            if reason is None and not row["youtube_key"].strip():
                reason = "no youtube_key"
            if reason:
                loaded.skipped[reason] += 1
                continue
            loaded.records.append(TextRow(EMOSPEECH, row["id"], row["label"], text, row["youtube_key"].strip(), source))
    return _warn_skips(loaded)


def _emoevent_row(loaded: Loaded[TextRow], row: dict, clean: Callable[[str], str], source: str, language: str) -> None:
    """Append one EmoEvent tweet (others → neutral, surprise dropped, text cleaned) or count why it is skipped."""
    label = EMOEVENT_LABELS.get(row["emotion"], row["emotion"])
    reason = _label_skip(EMOEVENT, label)
    text = " ".join(clean(row["tweet"] or "").split())
    if reason is None and not text:
        reason = "empty text"
    if reason:
        loaded.skipped[reason] += 1
        return
    loaded.records.append(TextRow(EMOEVENT, row["id"], label, text, f"emoevent:{row['id']}", source, language))


def read_emoevent(root: str | Path | None = None, language: str = "es") -> Loaded[TextRow]:
    """EmoEvent tweets (full anonymised csv), others → neutral, surprise dropped. Training-side material only:
    tweets are not speech transcripts. `youtube_key` is `emoevent:<id>` (each tweet its own group)."""
    path = dataset_dir(EMOEVENT, root) / f"emoevent_{language}.csv"
    loaded: Loaded[TextRow] = Loaded(EMOEVENT, [])
    for row in _read_csv(path, ("id", "tweet", "emotion"), tabs=True):
        _emoevent_row(loaded, row, lambda t: _PLACEHOLDER_RE.sub(" ", t), "emoevent", language)
    return _warn_skips(loaded)


def read_emoevent_splits(
    root: str | Path | None = None, language: str = "en", splits: Sequence[str] = SPLITS
) -> Loaded[TextRow]:
    """EmoEvent's official train/dev/test split (`source`), so held-out scores are comparable with the shared
    task's. The split files hold raw tweets; links, mentions and hashtags are removed like the full csv's
    anonymisation. Labels as `read_emoevent`."""
    folder = dataset_dir(EMOEVENT, root) / "splits" / language
    loaded: Loaded[TextRow] = Loaded(f"{EMOEVENT}/{language}", [])
    for split in splits:
        for row in _read_csv(folder / f"{split}.tsv", ("id", "tweet", "emotion"), tabs=True):
            _emoevent_row(loaded, row, lambda t: _RAW_TWEET_RE.sub(" ", html.unescape(t)), split, language)
    return _warn_skips(loaded)


def read_goemotions(root: str | Path | None = None, splits: Sequence[str] = SPLITS) -> Loaded[TextRow]:
    """GoEmotions English Reddit comments in the Ekman grouping, Google's official split (`source`). Only
    single-label rows are kept (a comment labelled joy and neutral has no one answer); surprise is dropped.
    Files: `data/ekman/<split>.tsv` (text, comma-separated label ids, comment id; no header) and `labels.txt`."""
    folder = dataset_dir(GOEMOTIONS, root) / "data" / "ekman"
    names_path = folder / "labels.txt"
    if not names_path.is_file():
        raise DataError(f"{names_path}: no such file")
    names = names_path.read_text(encoding="utf-8").split()
    loaded: Loaded[TextRow] = Loaded(GOEMOTIONS, [])
    for split in splits:
        path = folder / f"{split}.tsv"
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        with open(path, newline="", encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\r\n").split("\t")
                ids = parts[1].split(",") if len(parts) == 3 else []
                text = " ".join(parts[0].split()) if parts else ""
                if not ids or not all(i.isdigit() and int(i) < len(names) for i in ids):
                    reason = "malformed row"
                elif len(ids) > 1:
                    reason = "multiple labels"
                else:
                    label = names[int(ids[0])]
                    reason = _label_skip(GOEMOTIONS, label) or ("empty text" if not text else None)
                if reason:
                    loaded.skipped[reason] += 1
                    continue
                loaded.records.append(TextRow(GOEMOTIONS, parts[2], label, text, f"goemotions:{parts[2]}", split, "en"))
    return _warn_skips(loaded)


VOICE_READERS: dict[str, Callable[[str | Path | None], Loaded[SpeechClip]]] = {
    UEM: read_uem,
    EMODB: read_emodb,
    URDU: read_urdu,
}
VOICE_LICENCES = {
    UEM: "UEM speech: no licence stated, research use only",
    EMODB: "EmoDB: free for research (TU Berlin)",
    URDU: "URDU-Dataset (siddiquelatif/URDU-Dataset): research use only, as stated; no licence file",
}
EN_LICENCES = {
    GOEMOTIONS: "GoEmotions: CC BY 4.0 (Google; credit Demszky et al., ACL 2020)",
    EMOEVENT: "EmoEvent: no licence stated, research use only (cite Plaza-del-Arco et al., LREC 2020)",
}


def read_english(name: str, root: str | Path | None) -> Loaded[TextRow]:
    """The English rows of an English-capable text dataset, with their official split in `source`."""
    if name == GOEMOTIONS:
        return read_goemotions(root)
    if name == EMOEVENT:
        return read_emoevent_splits(root, "en")
    raise ValueError(f"no English reader for {name} (known: {GOEMOTIONS}, {EMOEVENT})")


def repo_relative(path: Path) -> str:
    """`path` relative to the repository when it is inside it (so a head's meta names no one's home folder)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def cap_per_label(records: Sequence[T], cap: int | None, seed: int) -> list[T]:
    """At most `cap` records of each label, drawn at random (seeded), in their original order; rarer labels are
    kept whole. Used to embed fewer of GoEmotions' 15k joy and 13k neutral rows without losing rare classes."""
    if cap is None:
        return list(records)
    rng = np.random.default_rng(seed)
    labels = np.array([r.label for r in records])  # type: ignore[attr-defined]
    keep = np.zeros(len(records), dtype=bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        keep[idx if len(idx) <= cap else rng.choice(idx, cap, replace=False)] = True
    return [r for r, k in zip(records, keep, strict=True) if k]


def grouped_folds(
    labels: Sequence[str], groups: Sequence[str], n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds in which no group (speaker, video) is on both sides; `n_splits` is capped at the
    number of groups (and at the size of the largest class). Deterministic for a given seed."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(labels)
    n_groups = len(set(groups))
    if n_groups < 2:
        raise ValueError(f"grouped folds need at least 2 groups, got {n_groups}")
    largest_class = int(np.unique(y, return_counts=True)[1].max())
    n = min(n_splits, n_groups, largest_class)
    if n < n_splits:
        log.warning("grouped folds: %d folds instead of %d (%d groups)", n, n_splits, n_groups)
    splitter = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
    return [(train, test) for train, test in splitter.split(np.zeros(len(y)), y, np.asarray(groups))]


def text_folds(rows: Sequence[TextRow], n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The text heads' folds: one set over all EmoSPeech rows (train + extra), grouped by YouTube video."""
    return grouped_folds([r.label for r in rows], [r.youtube_key for r in rows], n_splits, seed)


def take_rows(rows: list | np.ndarray, idx: Sequence[int] | np.ndarray) -> list | np.ndarray:
    """Rows `idx` of an array, or of a list (variable-length sequences, texts) as a list."""
    return [rows[i] for i in idx] if isinstance(rows, list) else rows[idx]


def limit_records(records: Sequence[T], n: int | None, seed: int) -> list[T]:
    """A deterministic subset of `n` records that cycles through the labels (for tiny runs); all if n is None."""
    if n is None or n >= len(records):
        return list(records)
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[T]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)  # type: ignore[attr-defined]
    queues = [[items[i] for i in rng.permutation(len(items))] for _, items in sorted(by_label.items())]
    out: list[T] = []
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return out
