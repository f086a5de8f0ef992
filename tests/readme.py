"""The README's examples, as the tests run them.

Every fenced block in README.md follows a marker line of its own:

    <!-- example: NAME -->       a test runs it (it finds the block by NAME: ``example("NAME")``)
    <!-- not run: REASON -->     shown only; REASON says why no test can run it

``tests/unit/test_readme.py`` refuses a block without a marker and a NAME no test uses, so a README
change that breaks an example fails a test. A block runs as a bash script with ``set -e``, line by line
as a user pasting it would, in a scratch directory; its placeholders (``app.img``, ``$CE``, ``JOBID``)
are filled by the test that runs it. Lines that begin with a guest prompt (``user@apppot:~$ CMD``) are
typed into the interactive session the line before started: ``Block.commands`` tells them apart.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_MARKER = re.compile(r"<!-- (?:example: (?P<name>[a-z0-9-]+)|not run: (?P<reason>.+?)) -->\s*$")
_FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")
_PROMPT = re.compile(r"^(?P<prompt>\S+@\S+:\S*[$#]) (?P<command>.*)$")


@dataclass(frozen=True)
class Command:
    text: str  # one logical line: continuations joined, a trailing comment kept (bash ignores it)
    prompt: str | None  # the guest's prompt when the line is typed into an interactive session
    line: int  # in README.md


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    name: str | None
    reason: str | None

    def commands(self) -> list[Command]:
        """The block's command lines, without blank and comment-only lines."""
        commands: list[Command] = []
        pending, start = "", 0
        for number, raw in enumerate(self.text.splitlines(), self.line + 1):
            if not pending:
                start = number
                if not raw.strip() or raw.lstrip().startswith("#"):
                    continue
            pending += raw
            if raw.endswith("\\"):
                pending = pending[:-1]
                continue
            prompted = _PROMPT.match(pending)
            if prompted:
                commands.append(Command(prompted["command"], prompted["prompt"], start))
            else:
                commands.append(Command(pending, None, start))
            pending = ""
        return commands

    def script(self, placeholders: Mapping[str, str] = {}) -> str:
        """The block as a bash script that stops at the first failing line, placeholders filled."""
        if any(c.prompt for c in self.commands()):
            raise ValueError(f"README line {self.line}: a block with guest prompts is driven through a terminal")
        return "set -e\n" + fill(self.text, placeholders)


def fill(text: str, placeholders: Mapping[str, str]) -> str:
    """``text`` with each placeholder replaced where it is a whole word (``app.img``, not ``myapp.img``)."""
    for placeholder, value in placeholders.items():
        pattern = rf"(?<![\w.-]){re.escape(placeholder)}(?![\w-]|\.\w)"
        text = re.sub(pattern, value.replace("\\", "\\\\"), text)
    return text


def blocks(readme: Path = README) -> list[Block]:
    """Every fenced block of ``readme`` with the marker before it (None, None where there is none)."""
    found: list[Block] = []
    lines = readme.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"README line {i + 1}: a fenced block that is never closed")
        marker = _MARKER.match(lines[i - 1]) if i else None
        text = "\n".join(lines[i + 1 : end]) + "\n"
        found.append(Block(i + 1, fence["lang"], text, marker and marker["name"], marker and marker["reason"]))
        i = end + 1
    return found


def example(name: str) -> Block:
    matches = [b for b in blocks() if b.name == name]
    if len(matches) != 1:
        raise LookupError(f"README has {len(matches)} examples named {name!r}")
    return matches[0]


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str  # bash's trace (set -x) and the commands' stderr


def run(script: str, cwd: Path, env: Mapping[str, str], *, user: str | None = None, timeout: float = 900) -> Ran:
    """Run a block's script in ``cwd`` with exactly ``env`` (as ``user`` when given: root drops to it)."""
    argv = ["bash", "-x", "-c", script]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *argv]
    proc = subprocess.run(
        argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
    )
    return Ran(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))
