"""Runs ``glm-image`` commands for the tests' ``cli`` fixture, each in a process of its own, without
paying Python's start and the imports of torch, transformers and diffusers (about 6 s of CPU) per
command: one server process imports them once, then forks a child per command.

The child is what a user's command is, short of those imports: its own process with the test's
argv, environment, working folder, stdout, stderr (files, read back as text) and exit status;
``SystemExit`` and uncaught exceptions end it as they end the ``glm-image`` script
(``sys.exit(main())``). The server never runs a torch operation, so its children fork with no
thread pool. The console script itself is started by ``test_cli.test_script_and_console_entry_point``.

Protocol: one JSON request a line on the server's stdin ({"argv", "env", "cwd", "out", "err"}),
one line back on the server's original stdout: the child's exit status as ``subprocess`` gives it.
"""

from __future__ import annotations

import json
import os
import sys

# What the commands import (transformers and diffusers load their model classes lazily: named here)
PRELOAD = (
    "torch",
    "PIL.Image",
    "glm_image.cli",
    "glm_image.pipeline",
    "glm_image.engine",
    "glm_image.info",
    "glm_image.residency",
    "glm_image.ops.selfcheck",
    "glm_image.synthetic.checkpoint",
    "glm_image.synthetic.reference",
)
CLASSES = {
    "transformers": (
        "GlmImageForConditionalGeneration",
        "GlmImageProcessor",
        "T5EncoderModel",
        "ByT5Tokenizer",
    ),
    "diffusers": ("GlmImagePipeline", "GlmImageTransformer2DModel", "AutoencoderKL"),
}


def _child(request: dict, answers: int) -> None:
    """Become the command: never returns (the process ends as ``sys.exit(main())`` would)."""
    os.close(answers)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["out"]), (2, request["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = ["glm-image", *request["argv"]]
    from glm_image.cli import main

    sys.exit(main(request["argv"]))  # SystemExit and uncaught errors: the interpreter's own handling


def serve() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for module, names in CLASSES.items():
        for name in names:
            getattr(importlib.import_module(module), name)
    answers = os.dup(1)  # children get the command's stdout at fd 1; the answers go here
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.set_inheritable(answers, False)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request, answers)
        _, status = os.waitpid(pid, 0)
        os.write(answers, f"{os.waitstatus_to_exitcode(status)}\n".encode())


if __name__ == "__main__":
    serve()
