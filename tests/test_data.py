"""The English text readers (GoEmotions, EmoEvent's official splits) and the per-label cap.

Reader behaviour is checked on small generated fixtures; the real-data checks read `$EMOTION_DATA_DIR` (default
`<repo>/../shared/data`) and skip, saying where they looked, when a dataset is absent.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from pipelines.data import corpora as D
from streamer.frames import LABELS


def require(name: str) -> Path:
    folder = D.data_dir() / name
    if not folder.is_dir():
        pytest.skip(f"dataset {name} not found at {folder} (set EMOTION_DATA_DIR)")
    return folder


@pytest.fixture
def goemotions(tmp_path: Path) -> Path:
    folder = tmp_path / D.GOEMOTIONS / "data" / "ekman"
    folder.mkdir(parents=True)
    (folder / "labels.txt").write_text("anger\ndisgust\nfear\njoy\nneutral\nsadness\nsurprise\n")
    (folder / "train.tsv").write_text(
        "I hate   this so much\t0\tc1\n"
        "What a lovely day!\t3\tc2\n"
        "Wow, I did not expect that\t6\tc3\n"  # surprise: dropped
        "Thanks, that is fine\t3,4\tc4\n"  # two labels: no single answer
        "   \t5\tc5\n"  # empty text
        "broken row without labels\n"
        "Bad id\t9\tc6\n"  # label id out of range
    )
    (folder / "dev.tsv").write_text("[NAME] left and I miss her\t5\td1\n")
    (folder / "test.tsv").write_text("That is disgusting\t1\tt1\nI am scared of the dark\t2\tt2\n")
    return tmp_path


def test_goemotions_reader_keeps_single_labels_with_official_splits(goemotions: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    loaded = D.read_goemotions(goemotions)
    assert [(r.id, r.label, r.text, r.source, r.language) for r in loaded.records] == [
        ("c1", "anger", "I hate this so much", "train", "en"),
        ("c2", "joy", "What a lovely day!", "train", "en"),
        ("d1", "sadness", "[NAME] left and I miss her", "dev", "en"),
        ("t1", "disgust", "That is disgusting", "test", "en"),
        ("t2", "fear", "I am scared of the dark", "test", "en"),
    ]
    assert loaded.skipped == Counter({"label surprise": 1, "multiple labels": 1, "empty text": 1, "malformed row": 2})
    assert "text_en_goemotions: kept 5 records, skipped" in caplog.text
    assert {r.youtube_key for r in loaded.records} == {f"goemotions:{r.id}" for r in loaded.records}
    assert [r.id for r in D.read_goemotions(goemotions, splits=("test",)).records] == ["t1", "t2"]


def test_goemotions_missing_files_name_the_path(goemotions: Path, tmp_path: Path) -> None:
    (goemotions / D.GOEMOTIONS / "data" / "ekman" / "dev.tsv").unlink()
    with pytest.raises(D.DataError, match=r"dev\.tsv"):
        D.read_goemotions(goemotions)
    with pytest.raises(D.DataError, match="EMOTION_DATA_DIR"):
        D.read_goemotions(tmp_path / "nowhere")


@pytest.fixture
def emoevent_splits(tmp_path: Path) -> Path:
    folder = tmp_path / D.EMOEVENT / "splits" / "en"
    folder.mkdir(parents=True)
    header = "id\tevent\ttweet\toffensive\temotion\n"
    (folder / "train.tsv").write_text(
        header
        + 'a1\tNotreDame\tSo "sad" about #NotreDame https://t.co/x1 @someone\tNO\tsadness\n'
        + "a2\tVenezuela\tUSER_d #Venezuela\tNO\tanger\n"  # nothing left once anonymised
        + "a3\tLaLiga\tDid not see that coming\tNO\tsurprise\n"
        + "a4\tLaLiga\tMatch day today\tNO\tothers\n",
        encoding="utf-8",
    )
    (folder / "dev.tsv").write_text(header + "b1\tWorldBookDay\tI love this book!\tNO\tjoy\n", encoding="utf-8")
    (folder / "test.tsv").write_text(header + "c1\tGameOfThrones\tThat scene scared me\tNO\tfear\n")
    return tmp_path


def test_emoevent_splits_anonymise_raw_tweets_and_keep_the_split(emoevent_splits: Path) -> None:
    loaded = D.read_emoevent_splits(emoevent_splits, "en")
    assert [(r.id, r.label, r.text, r.source, r.language) for r in loaded.records] == [
        ("a1", "sadness", 'So "sad" about', "train", "en"),
        ("a4", "neutral", "Match day today", "train", "en"),
        ("b1", "joy", "I love this book!", "dev", "en"),
        ("c1", "fear", "That scene scared me", "test", "en"),
    ]
    assert loaded.skipped == Counter({"empty text": 1, "label surprise": 1})
    assert [r.id for r in D.read_emoevent_splits(emoevent_splits, "en", ("dev",)).records] == ["b1"]
    with pytest.raises(D.DataError, match=r"splits/es/train\.tsv"):
        D.read_emoevent_splits(emoevent_splits, "es")


def test_cap_per_label_keeps_rare_labels_whole_and_is_seeded() -> None:
    counts = {"joy": 50, "neutral": 40, "fear": 3}
    rows = [D.TextRow(D.GOEMOTIONS, f"{k}{i}", k, "x", "g", "train", "en") for k, n in counts.items() for i in range(n)]
    capped = D.cap_per_label(rows, 10, seed=0)
    assert Counter(r.label for r in capped) == {"joy": 10, "neutral": 10, "fear": 3}
    assert capped == D.cap_per_label(rows, 10, seed=0) != D.cap_per_label(rows, 10, seed=1)
    assert [rows.index(r) for r in capped] == sorted(rows.index(r) for r in capped)  # original order
    assert D.cap_per_label(rows, None, seed=0) == rows


# --------------------------------------------------------------------------- real data


def test_real_goemotions_counts_and_official_splits() -> None:
    require(D.GOEMOTIONS)
    loaded = D.read_goemotions()
    # the README's single-label counts, surprise dropped: train 39,555 − 3,858 surprise rows
    assert Counter(r.source for r in loaded.records) == {"train": 35_697, "dev": 4_487, "test": 4_480}
    assert loaded.skipped == Counter({"label surprise": 4_805, "multiple labels": 4_794})
    train = Counter(r.label for r in loaded.records if r.source == "train")
    assert train == {"joy": 15216, "neutral": 12823, "anger": 4293, "sadness": 2326, "fear": 541, "disgust": 498}
    assert len({r.id for r in loaded.records}) == len(loaded)  # comment ids are unique across splits


def test_real_emoevent_english_splits() -> None:
    require(D.EMOEVENT)
    loaded = D.read_emoevent_splits(language="en")
    # README: train 5,112 / dev 744 / test 1,447, of which surprise 165 / 24 / 46
    assert Counter(r.source for r in loaded.records) == {"train": 4_947, "dev": 720, "test": 1_401}
    assert loaded.skipped == Counter({"label surprise": 235})
    assert set(loaded.label_counts()) == set(LABELS) and min(loaded.label_counts().values()) > 100
    assert not any("http" in r.text or "#" in r.text or "USER" in r.text for r in loaded.records)
    assert len(D.read_emoevent(language="en")) == len(loaded)  # the full csv holds the same tweets
