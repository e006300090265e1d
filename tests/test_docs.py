"""What a new user reads first: the README and the pages under docs/."""

import re
import unicodedata

import pytest

from tests.conftest import REPO

README_MAX_LINES = 150  # about two screens; the rest lives in docs/
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE_BLOCK = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"`((?:streamer|pipelines|configs|tests|docs)/[^`\s<>…]*)`")
PIPELINES_COMMAND = re.compile(r"python3? -m (pipelines(?:\.\w+)+)(?!\w|\.[\w<])")  # not `pipelines.bench.<name>`


def _prose(path) -> str:
    """The page without its fenced code blocks (links and paths there are examples, not references)."""
    return CODE_BLOCK.sub("", path.read_text())


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = heading.strip().replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", _prose(path), re.M)}


def test_the_licence_limits_come_before_the_first_command():
    """Before: the non-commercial licence of the shipped heads was stated only at the end of the README."""
    readme = (REPO / "README.md").read_text()
    section = readme.index("## Licences and commercial use")
    assert section < readme.index("## Two commands")
    text = readme[section : readme.index("\n## ", section + 1)]
    assert "non-commercial" in text and "CC BY-NC 4.0" in text and "voice head" in text


def test_the_readme_stays_short():
    """Before: 551 lines mixing install, operations, telephony, scale-out, the event schema, models and benchmarks."""
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details into docs/ (limit {README_MAX_LINES})"


def test_the_readme_commands_are_those_setup_and_ci_run():
    """The two commands of the README are the first setup step and the test command of .ci/run, word for word."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Two commands") :]
    start = section.index("```sh\n") + len("```sh\n")
    block = section[start : section.index("```", start)]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    ci = (REPO / ".ci" / "run").read_text()
    test_command = next(line.strip() for line in ci.splitlines() if "-m pytest" in line)
    assert commands == ["./setup.sh", test_command]
    assert (REPO / "setup.sh").exists()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    """A link to a file (and to a heading in it) that a move or a rename left behind is a dead end for the reader:
    docs/deployment.md became docs/scale-out.md, and the README's sections moved into docs/."""
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.is_file():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_repository_path_named_exists(page):
    """`streamer/…`, `pipelines/…`, `configs/…` in the text must exist, so that "where would I change X?" leads
    somewhere (pipelines/ was split into packages)."""
    missing = []
    for name in REPO_PATH.findall(_prose(page)):
        name = name.rstrip(".,;:")
        if not (list(REPO.glob(name)) if "*" in name else (REPO / name).exists()):
            missing.append(name)
    assert not missing, f"{page.relative_to(REPO)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_pipelines_command_names_a_module(page):
    """`python -m pipelines.X` must name a module or a package with a __main__ (the old flat names are gone)."""
    missing = []
    for module in set(PIPELINES_COMMAND.findall(page.read_text())):
        path = REPO.joinpath(*module.split("."))
        if not (path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()):
            missing.append(module)
    assert not missing, f"{page.relative_to(REPO)}: no such module {sorted(missing)}"


def test_the_docs_pages_are_linked_from_the_readme():
    """Every page under docs/ is reachable from the README."""
    readme = _prose(REPO / "README.md")
    unlinked = [p.name for p in PAGES[1:] if f"](docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
