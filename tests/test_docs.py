"""What a new user reads first."""

from tests.conftest import REPO


def test_the_licence_limits_come_before_the_first_command():
    """Before: the non-commercial licence of the shipped heads was stated only at the end of the README."""
    readme = (REPO / "README.md").read_text()
    section = readme.index("## Licences and commercial use")
    assert section < readme.index("## Two commands")
    text = readme[section : readme.index("\n## ", section + 1)]
    assert "non-commercial" in text and "CC BY-NC 4.0" in text and "voice head" in text
