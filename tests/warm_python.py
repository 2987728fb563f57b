"""A warm ``python`` for the docs test's blocks: the same command in a process of its own, without
paying Python's start and the imports of torch, transformers and diffusers (about 6 s of CPU) each
time a block calls ``python`` or ``glm-image``.

``warm_python.py serve SOCKET`` imports what the commands import (``cli_server.PRELOAD``), then
listens on a Unix socket. ``warm_python.py SOCKET ARGS...`` is the client the ``python`` shim
runs: it hands its stdin, stdout and stderr (the descriptors themselves), argv, environment and
working folder to the server, which forks the command; the client forwards SIGINT/SIGTERM to it
and exits with its status (dying by the same signal where the command did). What it runs:
``-c CODE``, ``-m MODULE`` or a script path, each with its arguments, as the interpreter runs
them (``sys.argv``, ``sys.path[0]``, ``__main__``; an uncaught exception is a traceback and
status 1; ``atexit`` runs). Anything else (interpreter flags, stdin as the program), or no
server, and the client execs the real interpreter instead: never a different answer, only a
slower one. The server runs no torch operation, so its forks start with no thread pool.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys


def _preload() -> None:
    import importlib

    from cli_server import CLASSES, PRELOAD  # tests/ is sys.path[0] here

    for name in PRELOAD:
        importlib.import_module(name)
    for module, names in CLASSES.items():
        for name in names:
            getattr(importlib.import_module(module), name)


def serve(path: str):
    """Serve until killed; in a forked command, return its (request, descriptors)."""
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters reap themselves
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)  # the socket appears only once it listens
    while True:
        conn, _ = listener.accept()
        if os.fork() != 0:
            conn.close()
            continue
        # the waiter: reads the request, forks the command, answers its pid then its status
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        listener.close()
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        while chunk := conn.recv(1 << 16):
            data += chunk
        pid = os.fork()
        if pid == 0:
            conn.close()
            return json.loads(data), fds
        for fd in fds:
            os.close(fd)
        conn.sendall(f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        os._exit(0)


@contextlib.contextmanager
def warm_bin(bin_dir, env: dict[str, str], timeout: float = 120.0):
    """Within the block, ``bin_dir`` (a folder for the front of PATH) holds ``python`` and
    ``python3``: this interpreter, each command forked warm from a server started here with
    ``env`` (what a command reads at import time is the server's; everything else, its own).
    Yields ``bin_dir``; the server and every command it forked are killed at the end."""
    import shlex
    import subprocess
    import time
    from pathlib import Path

    bin_dir = Path(bin_dir)
    path = str(bin_dir / "warm.sock")
    command = f'exec {shlex.quote(sys.executable)} {shlex.quote(__file__)} {shlex.quote(path)} "$@"'
    for name in ("python", "python3"):
        shim = bin_dir / name
        shim.write_text(f"#!/bin/sh\n{command}\n")
        shim.chmod(0o755)
    server = subprocess.Popen(
        [sys.executable, __file__, "serve", path],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(bin_dir / "warm.log").open("wb"),
        start_new_session=True,  # its commands too: one killpg ends them all
    )
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # no server: the shims run the real interpreter (slower, same answers)
    try:
        yield bin_dir
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def run(request: dict, fds: list[int]) -> None:
    """Become the command (in the forked process): its descriptors, environment, folder, argv."""
    import runpy

    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    argv = request["argv"]
    if argv[0] == "-c":
        import types

        sys.argv, sys.path[0] = ["-c", *argv[2:]], ""
        main = sys.modules["__main__"] = types.ModuleType("__main__")
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    elif argv[0] == "-m":
        sys.argv, sys.path[0] = [argv[1], *argv[2:]], os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


def _supported(argv: list[str]) -> bool:
    if not argv:
        return False
    if argv[0] in ("-c", "-m"):
        return len(argv) >= 2
    return not argv[0].startswith("-") and os.path.isfile(argv[0])


def client(path: str, argv: list[str]) -> None:
    if _supported(argv):
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(path)
        except OSError:
            conn = None
        if conn is not None:
            request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}
            socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
            conn.shutdown(socket.SHUT_WR)
            answers = conn.makefile("r")
            pid = int(answers.readline())
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, lambda number, _frame: os.kill(pid, number))
            code = int(answers.readline())
            if code < 0:  # the command died by a signal: so does its caller's process
                signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            sys.exit(code)
    os.execv(sys.executable, [sys.executable, *argv])


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        command = serve(sys.argv[2])
        run(*command)  # only a forked command gets here; the interpreter's exit is its exit
    else:
        client(sys.argv[1], sys.argv[2:])
