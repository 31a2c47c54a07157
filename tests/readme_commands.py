"""The README's shell commands, read from the README itself, so that the tests run what a reader types."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# The README and the topic pages it links: their commands are checked alike.
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
# What a fresh login shell has on PATH before the README adds anything.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROGRAMS = ("source", "make", "python", "ray", "mlflow")
VENV_BIN = ".venv/bin/"


@dataclass
class Command:
    text: str          # as printed (continuation lines joined), comment included
    words: list[str]   # shell words, leading VAR=value assignments and the comment left out
    block: int         # which code block of the README it is in

    @property
    def program(self) -> str:
        """`python` for both `python` and `.venv/bin/python` (which works from the repo root as printed)."""
        return self.words[0].removeprefix(VENV_BIN)


def _code_blocks(text: str) -> list[list[str]]:
    """The README's indented code blocks (four spaces after a blank line), as their lines."""
    blocks, current, previous_blank = [], None, True
    for line in text.splitlines():
        if current is not None and (line.startswith("    ") or not line.strip()):
            current.append(line[4:])
            continue
        if current is not None:
            blocks.append(current)
            current = None
        if line.startswith("    ") and previous_blank:
            current = [line[4:]]
        previous_blank = not line.strip()
    if current is not None:
        blocks.append(current)
    return [[line for line in block if line.strip()] for block in blocks]


def _join_continuations(lines: list[str]) -> list[str]:
    joined, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].rstrip() + " "
        else:
            joined.append(pending + line.strip())
            pending = ""
    return joined


def readme_commands(text: str | None = None) -> list[Command]:
    """Every line of a README code block that runs one of PROGRAMS."""
    text = README.read_text() if text is None else text
    commands = []
    for index, block in enumerate(_code_blocks(text)):
        for line in _join_continuations(block):
            try:  # a command substitution is one word to the program that runs the line
                words = shlex.split(re.sub(r"\$\([^()]*\)", "SUBSTITUTED", line), comments=True)
            except ValueError:
                continue  # not shell (program output, a layout sketch)
            while words and "=" in words[0] and not words[0].startswith("-"):
                words = words[1:]  # VAR=value prefixes
            if words and words[0].removeprefix(VENV_BIN) in PROGRAMS:
                commands.append(Command(line, words, index))
    return commands


def page_commands() -> list[tuple[Path, Command]]:
    """Every command of every page in PAGES, with the page it is printed on."""
    return [(page, command) for page in PAGES for command in readme_commands(page.read_text())]


def tour_block(commands: list[Command], containing: str) -> list[Command]:
    """The commands of the code block that holds a command containing `containing`."""
    blocks = {c.block for c in commands if containing in c.text}
    assert len(blocks) == 1, f"expected one README code block with {containing!r}, found {len(blocks)}"
    return [c for c in commands if c.block in blocks]
