"""`pipelines.train.text`: the Spanish table and the English section share one page without overwriting each
other or the sections after them, and a tiny `--english` run (real data and the shipped heads; skipped where the
data is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.data import corpora as D
from pipelines.train.text import EN_SECTION, write_part


def test_each_mode_rewrites_only_its_own_part(tmp_path: Path) -> None:
    page = tmp_path / "text_recipes.md"
    write_part(page, "# Spanish v1\n\ntable 1\n", english=False)
    assert page.read_text() == "# Spanish v1\n\ntable 1\n"
    write_part(page, f"{EN_SECTION}\n\nEnglish v1\n", english=True)
    write_part(page, "# Spanish v2\n\ntable 2\n", english=False)
    assert page.read_text() == f"# Spanish v2\n\ntable 2\n\n{EN_SECTION}\n\nEnglish v1\n"
    write_part(page, f"{EN_SECTION}\n\nEnglish v2\n", english=True)
    assert page.read_text() == f"# Spanish v2\n\ntable 2\n\n{EN_SECTION}\n\nEnglish v2\n"
    # sections after the English one (other pipelines write them) stay, whichever part is rewritten
    page.write_text(page.read_text() + "\n## Fine-tuning\n\n### Table\n\nrows\n")
    write_part(page, f"{EN_SECTION}\n\nEnglish v3\n", english=True)
    write_part(page, "# Spanish v3\n\ntable 3\n", english=False)
    tail = "\n\n## Fine-tuning\n\n### Table\n\nrows\n"
    assert page.read_text() == f"# Spanish v3\n\ntable 3\n\n{EN_SECTION}\n\nEnglish v3{tail}"


@pytest.mark.slow
def test_tiny_english_run_writes_the_section(tmp_path: Path) -> None:
    for name in (D.GOEMOTIONS, D.EMOEVENT, D.EMOSPEECH):
        if not (D.data_dir() / name).is_dir():
            pytest.skip(f"dataset {name} not found at {D.data_dir() / name} (set EMOTION_DATA_DIR)")
    from pipelines.train.text import main

    page = tmp_path / "text_recipes.md"
    page.write_text("# Spanish table\n")
    args = ["--english", "--limit", "40", "--out", str(page), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    md = page.read_text()
    assert md.startswith("# Spanish table\n") and EN_SECTION in md
    for row in ("en head → GoEmotions test", "es head → EmoEvent en test", "joint → EmoSPeech CV",
                "en head → EmoSPeech", "es recipe → EmoSPeech CV"):  # fmt: skip
        assert f"| `{row}` |" in md
    assert "--limit 40" in md
    assert (tmp_path / "text_recipes_en").is_dir() and any((tmp_path / "text_recipes_en").glob("*.png"))
    assert not (tmp_path / "text_recipes_en.md").exists()
