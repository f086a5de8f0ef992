"""Every block of the README is run by a test or says why not; the example parser itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.readme import Block, blocks, fill

TESTS = Path(__file__).resolve().parent.parent


def test_every_block_of_the_readme_is_run_by_a_test_or_says_why_not() -> None:
    unmarked = [b.line for b in blocks() if b.name is None and b.reason is None]
    assert not unmarked, f"README blocks without '<!-- example: NAME -->' or '<!-- not run: REASON -->' at lines {unmarked}"


def test_every_example_name_is_unique_and_some_test_runs_it() -> None:
    names = [b.name for b in blocks() if b.name]
    assert len(names) == len(set(names)), names
    sources = "\n".join(p.read_text() for p in TESTS.rglob("test_*.py") if p.resolve() != Path(__file__).resolve())
    used = set(re.findall(r"""example\(["']([a-z0-9-]+)["']\)""", sources))
    assert set(names) - used == set(), f"README examples no test runs: {sorted(set(names) - used)}"
    assert used - set(names) == set(), f"tests run README examples that are gone: {sorted(used - set(names))}"


def write(tmp_path: Path, text: str) -> Path:
    readme = tmp_path / "README.md"
    readme.write_text(text)
    return readme


def test_blocks_carry_their_marker_line_and_language(tmp_path: Path) -> None:
    readme = write(
        tmp_path,
        "intro\n<!-- example: first -->\n```\necho a\n```\ntext\n\n```toml\nx = 1\n```\n"
        "<!-- not run: needs a CE -->\n```sh\narcsub\n```\n",
    )
    found = blocks(readme)
    assert [(b.line, b.lang, b.name, b.reason, b.text) for b in found] == [
        (3, "", "first", None, "echo a\n"),
        (8, "toml", None, None, "x = 1\n"),
        (12, "sh", None, "needs a CE", "arcsub\n"),
    ]


def test_an_unclosed_block_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="line 2: a fenced block that is never closed"):
        blocks(write(tmp_path, "x\n```\necho\n"))


def test_commands_join_continuations_and_tell_guest_prompt_lines_apart() -> None:
    text = (
        "# a comment\napppot submit --to slurm \\\n    --mem 1G -- ./run.sh   # note\n\n"
        "apppot start --cow m.cow\nuser@apppot:~$ sudo apppot-snap changes\n"
    )
    commands = Block(10, "", text, "x", None).commands()
    assert [(c.text, c.prompt, c.line) for c in commands] == [
        ("apppot submit --to slurm     --mem 1G -- ./run.sh   # note", None, 12),
        ("apppot start --cow m.cow", None, 15),
        ("sudo apppot-snap changes", "user@apppot:~$", 16),
    ]
    with pytest.raises(ValueError, match="guest prompts"):
        Block(10, "", text, "x", None).script()


def test_placeholders_are_filled_only_as_whole_words() -> None:
    text = "apppot start --image app.img --changes mine.tar.gz -- x myapp.img app.img.cow $CE JOBID JOBIDS\n"
    filled = fill(text, {"app.img": "/c/tiny.img", "$CE": "https://localhost:8443/arex", "JOBID": "42"})
    assert filled == (
        "apppot start --image /c/tiny.img --changes mine.tar.gz -- x myapp.img app.img.cow "
        "https://localhost:8443/arex 42 JOBIDS\n"
    )
