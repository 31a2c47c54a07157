"""Every command the README prints works as printed after `make run`, on a PATH that holds the system
directories plus what the README adds (the venv it activates). Tour step 4 (a local head node and
`ray job submit`) runs end to end in test_progressive.py; here every command is checked against
the program that will run it, without running it."""
import os
import subprocess

import pytest

import re

from readme_commands import README, REPO, SYSTEM_PATH, Command, page_commands, readme_commands

COMMANDS = readme_commands()
PAGE_COMMANDS = page_commands()
ACTIVATE = "source .venv/bin/activate"


def test_the_readme_puts_the_venv_on_path_before_any_bare_python_ray_or_mlflow():
    activations = [i for i, c in enumerate(COMMANDS) if c.text.startswith(ACTIVATE)]
    assert activations, f"the README never says {ACTIVATE}"
    bare = [i for i, c in enumerate(COMMANDS) if c.words[0] in ("python", "ray", "mlflow")]
    assert bare and min(bare) > activations[0], COMMANDS[min(bare)].text
    assert len({c.block for c in COMMANDS}) >= 8, "fewer README code blocks than expected: is the parser lost?"


def test_python_ray_and_mlflow_are_the_venvs_after_activation_on_a_system_path():
    script = f"{ACTIVATE} && command -v python ray mlflow make"
    result = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root")})
    assert result.returncode == 0, result.stderr
    python, ray, mlflow, make = result.stdout.split()
    for found in (python, ray, mlflow):
        assert found.startswith(str(REPO / ".venv" / "bin")), found
    assert os.path.dirname(make) in SYSTEM_PATH.split(":")


def _options(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("-") and w not in ("-", "--")]


def _shell_words(words: list[str]) -> list[str]:
    """The words up to a redirection or `&`, which the shell, not the program, takes."""
    for i, w in enumerate(words):
        if w in ("&", ">", ">>", "2>", "|"):
            return words[:i]
    return words


def _check_click(cli, words: list[str], text: str) -> None:
    """The (sub)command exists and takes every option the README gives it; an entry point after
    `--` (ray job submit) is itself checked."""
    import click
    words = _shell_words(words)
    entrypoint = words[words.index("--") + 1:] if "--" in words else None
    words = words[:words.index("--")] if "--" in words else words
    command, rest = cli, words[1:]
    while isinstance(command, click.Group):
        found = command.get_command(click.Context(command), rest[0]) if rest else None  # knows aliases (mlflow ui)
        assert found is not None, f"{text}: no such command {rest[:1]}"
        command, rest = found, rest[1:]
    accepted = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    unknown = [o for o in _options(rest) if o not in accepted]
    assert not unknown, f"{text}: {command.name} has no option {unknown}"
    if entrypoint:
        check_command(Command(" ".join(entrypoint), entrypoint, -1))


def check_command(command: Command) -> None:
    words, program = command.words, command.program
    if program == "source":
        assert (REPO / words[1]).is_file(), command.text
    elif program == "make":
        result = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{command.text}: {result.stderr}"
    elif program == "python" and words[1:3] == ["-m", "orchestrator"]:
        from orchestrator.cli import build_parser
        build_parser().parse_args(_shell_words(words)[3:])
    elif program == "python" and words[1] == "jobs/progressive_scaling.py":  # `python -m orchestrator scale`
        from orchestrator.cli import build_parser
        assert (REPO / words[1]).is_file()
        build_parser().parse_args(["scale", *_shell_words(words)[2:]])
    elif program == "ray":
        from ray.scripts.scripts import cli
        _check_click(cli, words, command.text)
    elif program == "mlflow":
        from mlflow.cli import cli
        _check_click(cli, words, command.text)
    else:
        pytest.fail(f"the README runs {command.text!r}, which this test does not know how to check")


@pytest.mark.parametrize("page,command", PAGE_COMMANDS,
                         ids=[f"{page.relative_to(REPO)}: {c.text[:50]}" for page, c in PAGE_COMMANDS])
def test_every_command_of_the_readme_and_docs_is_accepted_by_the_program_it_runs(page, command):
    check_command(command)


def test_the_readme_is_a_front_door_whose_links_all_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 200, "the README is the front door: topics belong in docs/"
    pages = {REPO / "README.md", *(REPO / "docs").rglob("*.md")}
    for page in sorted(pages):
        for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links {target}, which does not exist"
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", text))
    topics = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert topics <= linked, f"the README does not link {sorted(topics - linked)}"


def test_the_readme_links_the_architecture_notes_it_ships():
    assert "docs/ARCHITECTURE.md" in README.read_text()
    notes = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    for path in sorted((REPO / "orchestrator").rglob("*.py")) + sorted((REPO / "model").glob("*.py")):
        if path.name != "__init__.py":
            name = path.relative_to(REPO).as_posix()
            assert name in notes, f"docs/ARCHITECTURE.md does not say what {name} does"
