"""Every shell and Python example in README.md and docs/*.md runs, on the tiny model.

One test per fenced block, named ``file:line`` (the line of the opening fence). The rules (also in
docs/development.md, "The docs test"):

- ```bash / ```sh / ```shell blocks run in bash with ``set -e -o pipefail`` (every command counts,
  not only the last); ```python / ```py blocks run in Python. Any other fence (```text,
  ```console, none) is not run: that is where commands needing real weights, a GPU or minutes go.
- Each block runs in a fresh subprocess, in a fresh temporary folder holding links to the
  checkout's ``benchmarks/``, ``deploy/`` and ``scripts/`` (so ``python benchmarks/x.py`` works as
  it does from the checkout). ``python`` is the interpreter running these tests, forked warm from
  a server that imported torch once (``warm_python.py``: the block's own process, descriptors,
  environment and status), and ``glm-image`` a shim that runs this checkout's CLI
  (``python -m glm_image.cli``). No weights, no network: the
  hub is offline (tests/conftest.py) and ``--model tiny`` is built once into the test run's cache.
- ``<!-- docs-test: skip: REASON -->`` on the line before a fence: the block is reported as
  skipped with REASON (a server that runs until Ctrl-C, a GPU, an extra that is not installed).
- ``<!-- docs-test: append: ARGS -->``: the test's ``glm-image`` appends ARGS to every call in
  the block (argparse: the last value wins), so an example kept as a user types it runs short
  here; the README's first command runs with ``--steps 2`` this way (its 50 steps at 512x512
  take minutes on a busy 2-core machine, and the same stages run at 2).
- ``<!-- docs-test: server -->``: the block is a client. It runs while the test serves the tiny
  model (``glm-image serve --model tiny``, started once, on a free port, only when such a block
  runs), with ``localhost:8000`` / ``127.0.0.1:8000`` in the block pointing to that port.
- In bash blocks a ``pip install ...`` (or ``python -m pip install ...``) command is not run: the
  environment under test is already installed. Joined with ``&&``, only the install part is
  dropped and the rest of the line runs (the README's first command). A command that runs the
  test suite (``python -m pytest``) is dropped too: this test is part of that run.

A block fails its test when it exits nonzero (or runs past ``BLOCK_TIMEOUT``). A second group of
tests checks the docs against the CLI: every ``--flag`` on a ``glm-image ...`` command line in
any block must be an option of that (sub)command, and every ``--flag`` the prose names in
backquotes must exist in some ``glm-image`` command or one of the scripts it names.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
LINKED = ("benchmarks", "deploy", "scripts")  # what blocks may read relative to the checkout
BLOCK_TIMEOUT = 600  # seconds; a block is a few seconds on an idle CPU
DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(?P<what>skip|server|append)\s*(?::\s*(?P<why>.*?))?\s*-->$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str  # the fence's info string ("" when none)
    code: str
    directive: str = ""  # "", "skip", "append" or "server"
    why: str = ""  # the skip's reason; append's arguments

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"


def parse(page: Path) -> list[Block]:
    """The fenced blocks of a page, each with the docs-test directive on the line before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, end = i, i + 1
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page.name}:{start + 1}: the fence is never closed")
        before = lines[start - 1].strip() if start else ""
        directive = DIRECTIVE.match(before)
        if before.startswith("<!--") and "docs-test" in before and not directive:
            raise AssertionError(
                f"{page.name}:{start}: unknown docs-test directive {before!r}; allowed: "
                "'<!-- docs-test: skip: REASON -->', '<!-- docs-test: append: ARGS -->', "
                "'<!-- docs-test: server -->'"
            )
        what, why = (directive["what"], directive["why"] or "") if directive else ("", "")
        if what in ("skip", "append") and not why:
            raise AssertionError(
                f"{page.name}:{start}: a docs-test {what} needs its text (a reason, the arguments)"
            )
        code = "\n".join(lines[start + 1 : end]) + "\n"
        blocks.append(Block(page, start + 1, fence["lang"].lower(), code, what, why))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in parse(page)]
RUNNABLE = [block for block in ALL_BLOCKS if block.lang in RUN]

_INSTALL = re.compile(r"^\s*(?:python3? -m )?pip3? install\b")
_SUITE = re.compile(r"^\s*python3? -m pytest\b")


def shell_script(code: str) -> str:
    """A bash block as the test runs it: install commands and the suite itself dropped (above)."""
    out = []
    for line in code.splitlines():
        if _INSTALL.match(line):
            if "&&" not in line:
                continue
            line = line.split("&&", 1)[1].lstrip()
        if _SUITE.match(line):
            continue
        out.append(line)
    return "set -e -o pipefail\n" + "\n".join(out) + "\n"


# ---------------------------------------------------------------------- running a block


@pytest.fixture(scope="session")
def docs_bin(tmp_path_factory) -> Path:
    """A folder for PATH: ``python`` (this interpreter, warm: ``warm_python.py`` forks each
    command from a server that imported torch, transformers and diffusers once) and
    ``glm-image`` (this checkout's CLI through that ``python``)."""
    from warm_python import warm_bin

    bin_dir = tmp_path_factory.mktemp("docs-bin")
    shim = bin_dir / "glm-image"
    shim.write_text(
        f'#!/bin/sh\nexec {shlex.quote(str(bin_dir / "python"))} -m glm_image.cli "$@" $DOCS_TEST_APPEND\n'
    )
    shim.chmod(0o755)
    with warm_bin(bin_dir, block_env(bin_dir), BLOCK_TIMEOUT):
        yield bin_dir


def block_env(bin_dir: Path) -> dict[str, str]:
    """The environment of a block: this checkout first on the import path, nothing test-only."""
    import glm_image_kernels

    import glm_image

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the suite's setting; a block that wants it says so
    env.pop("DOCS_TEST_APPEND", None)
    paths = [str(Path(m.__file__).resolve().parents[1]) for m in (glm_image, glm_image_kernels)]
    env["PYTHONPATH"] = os.pathsep.join([*dict.fromkeys(paths), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_server(docs_bin, tmp_path_factory):
    """``glm-image serve --model tiny`` on a free port for the client blocks; its port."""
    port, folder = _free_port(), tmp_path_factory.mktemp("docs-server")
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "glm_image.cli",
            "serve",
            "--model",
            "tiny",
            "--port",
            str(port),
            "--output-dir",
            str(folder / "files"),
        ],  # the real interpreter, so that terminate() ends it
        cwd=folder,
        env=block_env(docs_bin),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + BLOCK_TIMEOUT
        while True:
            if server.poll() is not None:
                raise AssertionError(
                    f"the tiny server exited {server.returncode}:\n{_tail(folder / 'server.log')}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the tiny server did not answer /health:\n{_tail(folder / 'server.log')}"
                )
            time.sleep(0.5)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.mark.docs
@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b, id=b.id, marks=[pytest.mark.skip(reason=b.why)] if b.directive == "skip" else [])
        for b in RUNNABLE
    ],
)
def test_block_runs(block: Block, docs_bin: Path, tmp_path: Path, request) -> None:
    code = block.code
    if block.directive == "server":
        port = request.getfixturevalue("tiny_server")
        code = re.sub(r"\b(localhost|127\.0\.0\.1):8000\b", rf"\g<1>:{port}", code)
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    if RUN[block.lang] == "bash":
        command = ["bash", "-c", shell_script(code)]
    else:
        command = [str(docs_bin / "python"), "-c", code]
    env = block_env(docs_bin)
    if block.directive == "append":
        env["DOCS_TEST_APPEND"] = block.why
    try:
        done = subprocess.run(
            command,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.id} ran past {BLOCK_TIMEOUT} s:\n{code}\n{e.stdout or ''}\n{e.stderr or ''}")
    if done.returncode != 0:
        output = (done.stdout + "\n" + done.stderr)[-6000:]
        pytest.fail(f"{block.id} exited {done.returncode}:\n--- block ---\n{code}--- output ---\n{output}")


# ---------------------------------------------------------------------- the rules themselves


def test_the_readme_commands_run_as_the_rules_say() -> None:
    """The README's first block keeps its generate command whole and drops only the installs and
    the suite; a page without runnable examples, or a parser that found none, would fail here."""
    first = ALL_BLOCKS[0]
    assert first.id == "README.md:4" and first.lang == "bash", first.id
    assert (first.directive, first.why) == ("append", "--steps 2")
    script = shell_script(first.code).splitlines()
    assert script[0] == "set -e -o pipefail"
    assert script[1].startswith(
        "glm-image generate \"a sign that says 'OPEN'\" --model tiny --size 512x512 -o open.png"
    )
    assert not any("pip install" in line or "pytest" in line for line in script), script
    assert shell_script("pip install -e '.[serve]'\npython -m pip install x\necho ok\n").splitlines()[1:] == [
        "echo ok"
    ]
    pages = {block.page for block in RUNNABLE if block.directive != "skip"}
    assert ROOT / "README.md" in pages and len(pages) >= 6, sorted(p.name for p in pages)


def test_a_directive_must_be_known_and_a_skip_must_say_why(tmp_path: Path) -> None:
    page = tmp_path / "x.md"
    page.write_text("<!-- docs-test: skip -->\n```bash\ntrue\n```\n")
    with pytest.raises(AssertionError, match="needs its text"):
        parse(page)
    page.write_text("<!-- docs-test: maybe -->\n```bash\ntrue\n```\n")
    with pytest.raises(AssertionError, match="unknown docs-test directive"):
        parse(page)
    page.write_text("text\n<!-- docs-test: server -->\n```python\nprint(1)\n```\n```text\nx\n```\n")
    assert [(b.line, b.lang, b.directive, b.code) for b in parse(page)] == [
        (3, "python", "server", "print(1)\n"),
        (6, "text", "", "x\n"),
    ]


# ---------------------------------------------------------------------- the docs against --help


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], set[str]]:
    """(sub)command path -> its option strings, for the parser and every subparser under it."""
    found = {path: {s for action in parser._actions for s in action.option_strings}}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_options(sub, (*path, name)))
    return found


def _cli_options() -> dict[tuple[str, ...], set[str]]:
    from glm_image.cli import build_parser

    return _options(build_parser())


def _command_lines(code: str) -> list[list[str]]:
    """The ``glm-image ...`` commands of a block as argument lists (continuations joined; the
    installs before ``&&`` and comments dropped)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            while words and "=" in words[0] and not words[0].startswith("-"):
                words.pop(0)  # VAR=value before the command
            if words[:1] == ["torchrun"]:
                words = (
                    ["glm-image", *words[words.index("glm_image.cli") + 1 :]]
                    if "glm_image.cli" in words
                    else []
                )
            if words[:1] == ["glm-image"]:
                commands.append(words[1:])
    return commands


def test_every_flag_on_a_glm_image_command_line_is_an_option_of_that_command() -> None:
    options = _cli_options()
    wrong = []
    for block in ALL_BLOCKS:
        for words in _command_lines(block.code):
            path: tuple[str, ...] = ()
            for word in words:
                if (*path, word) in options:
                    path = (*path, word)
                elif not word.startswith("-"):
                    break
            known = options[path] | options[()]
            for word in words:
                flag = word.split("=", 1)[0]
                if (
                    flag.startswith("-")
                    and len(flag) > 1
                    and flag not in known
                    and not flag.lstrip("-").isdigit()
                ):
                    wrong.append(f"{block.id}: glm-image {' '.join(path)} has no {flag}")
    assert not wrong, "\n".join(wrong)


# Flags the prose names that belong to other programs (pytest, torchrun) or to our scripts
# (benchmarks/*.py).
_OTHER_PROGRAMS = {"--nproc-per-node", "-m", "-k", "-q", "--help"}
_SCRIPTS = tuple(p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "benchmarks").glob("*.py")))


def _script_options(script: str) -> set[str]:
    """The ``--flags`` a script's argparse defines (read from its source, not run)."""
    source = (ROOT / script).read_text(encoding="utf-8")
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))


def test_every_flag_the_prose_names_exists() -> None:
    known = set().union(*_cli_options().values(), *map(_script_options, _SCRIPTS), _OTHER_PROGRAMS)
    wrong = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
        for code in re.findall(r"`([^`\n]+)`", text):
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", code):
                if flag not in known:
                    wrong.append(f"{page.relative_to(ROOT)}: `{code}` names {flag}, which no command has")
    assert not wrong, "\n".join(wrong)
