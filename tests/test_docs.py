"""Executes the documentation: every ```python block of README.md and docs/*.md, and `--help` of
every `fgkeras` subcommand shown in a shell block, so that the docs cannot rot.

How blocks run:
- One subprocess per page, in a fresh temporary working directory, with this checkout first on
  PYTHONPATH. The page's Python blocks run in order in one namespace: a later block of a page
  may use names an earlier block of the same page defined (never names from another page).
  Each block is compiled under the page's name with its own line numbers, so a traceback points
  at the Markdown line.
- A block whose first line starts with `# docs: not run` (followed by the reason: the network,
  a cluster, minutes of CPU) is shown but not executed; where it shows a long job, the block
  right after it is its smoke-sized twin, and that is the one executed.
- Shell blocks (```bash, ```sh, ```console or unlabelled): every command starting with
  `fgkeras` (also after `&&`, `;` or `|`) is reduced to `fgkeras <subcommand> --help`, which
  must exit 0 — an unknown subcommand or a broken parser fails.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOT_RUN = "# docs: not run"
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\w*)\s*$")
PAGE_TIMEOUT = 600  # seconds per page, a guard against a hung block, not a speed assertion


def pages():
    """README.md and every Markdown page of docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(text):
    """`[(language, first line number, source)]` of the fenced blocks of a Markdown text."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line.strip())
        if language is None and match:
            language, start, lines = match.group(1).lower(), number + 1, []
        elif language is not None and line.strip() == "```":
            blocks.append((language, start, textwrap.dedent("\n".join(lines))))
            language = None
        elif language is not None:
            lines.append(line)
    return blocks


def runnable_python(blocks):
    """The Python blocks the test executes: those not marked `# docs: not run`."""
    return [(start, source) for language, start, source in blocks
            if language == "python" and not source.lstrip().startswith(NOT_RUN)]


def page_script(page_name, python_blocks):
    """A script that runs the blocks in order in one namespace; each is compiled under the page's
    name, padded so that its line numbers are the Markdown's."""
    calls = [f"exec(compile({chr(10) * (start - 1) + source!r}, {page_name!r}, 'exec'), namespace)"
             for start, source in python_blocks]
    return "\n".join(["namespace = {'__name__': '__main__'}", *calls, ""])


def run_python_blocks(page, tmp_path):
    """Runs a page's Python blocks in a subprocess in `tmp_path`; returns the CompletedProcess."""
    blocks = runnable_python(code_blocks(page.read_text()))
    script = tmp_path / "_docs_blocks.py"
    script.write_text(page_script(page.name, blocks))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=PAGE_TIMEOUT)


def shell_subcommands(blocks):
    """The `fgkeras` subcommands shown in shell blocks, in order of first appearance."""
    found = []
    for language, _, source in blocks:
        if language not in SHELL_LANGUAGES:
            continue
        for line in source.splitlines():
            for command in re.split(r"&&|;|\|", line.split("#", 1)[0]):
                words = command.split()
                if words and words[0] == "fgkeras":
                    subcommand = words[1] if len(words) > 1 and not words[1].startswith("-") else ""
                    if subcommand not in found:
                        found.append(subcommand)
    return found


HELP_SCRIPT = """
import contextlib, io, json, sys
from fgkeras.cli import main
codes = {}
for subcommand in sys.argv[1:]:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            main(([subcommand] if subcommand else []) + ["--help"])
        codes[subcommand] = 0
    except SystemExit as stop:
        codes[subcommand] = stop.code or 0
print(json.dumps(codes))
"""


def help_exit_codes(subcommands, cwd):
    """`{subcommand: exit code of fgkeras <subcommand> --help}`, all in one subprocess (one
    TensorFlow import), through this checkout's CLI."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.run([sys.executable, "-c", HELP_SCRIPT, *subcommands], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, _failure(process)
    return json.loads(process.stdout.strip().splitlines()[-1])


def _failure(process):
    return f"exit {process.returncode}\n--- stdout\n{process.stdout[-3000:]}\n--- stderr\n{process.stderr[-6000:]}"


@pytest.mark.parametrize("page", pages(), ids=lambda page: page.name)
def test_python_blocks_run(page, tmp_path):
    if not runnable_python(code_blocks(page.read_text())):
        pytest.skip(f"{page.name} has no Python block to run")
    process = run_python_blocks(page, tmp_path)
    assert process.returncode == 0, _failure(process)


def test_every_fgkeras_command_shown_has_a_working_help(tmp_path):
    subcommands = []
    for page in pages():
        subcommands += [s for s in shell_subcommands(code_blocks(page.read_text())) if s not in subcommands]
    assert "train" in subcommands and "serve" in subcommands  # the scan found the README's commands
    codes = help_exit_codes(subcommands, tmp_path)
    assert codes == {subcommand: 0 for subcommand in subcommands}, codes


def test_the_runner_fails_on_a_broken_block_and_skips_a_marked_one(tmp_path):
    page = tmp_path / "broken.md"
    page.write_text(textwrap.dedent('''\
        ```python
        # docs: not run (this would fail if it ran)
        raise SystemExit(3)
        ```
        ```python
        value = 41
        ```
        Text between blocks.
        ```python
        assert value + 1 == 42        # names carry over within a page
        undefined_name
        ```
        ```bash
        fgkeras no-such-command --smoke
        ```
        '''))
    work = tmp_path / "work"
    work.mkdir()
    process = run_python_blocks(page, work)
    assert process.returncode != 0
    assert 'File "broken.md", line 11' in process.stderr and "NameError" in process.stderr  # the block's own line
    assert shell_subcommands(code_blocks(page.read_text())) == ["no-such-command"]
    assert help_exit_codes(["no-such-command", "train"], work) == {"no-such-command": 2, "train": 0}
