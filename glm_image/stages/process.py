"""A stage run by rank processes that this process spawns and owns: the process handle.

``ProcessStage`` starts one process per rank (``python -m glm_image.stages.worker``, talking to
this process over a socket pair), hosts their rendezvous (a ``TCPStore`` on localhost; none for
one rank), waits until every rank has loaded its shard, then runs calls: each call (an
``ArCall`` or a ``DitCall``, see ``glm_image.stages``) goes to every rank, every rank runs the same stage
function on its shard (the collectives keep them in step), and the first rank's answer comes
back. This process holds no weights and never joins a collective, so it can always see a rank
die and stop the others. One rank is a server's stage worker (``serve --stages separate``);
several are a stage spread over devices (``--ar-tp``, ``--dit-sp``; a Ray replica with several
GPUs). The same heartbeat, cancellation and failure rules hold for both.

Lifetime and failures:

- ``close()`` (also at exit, and when the object is collected) asks the ranks to stop, then
  terminates and kills what is left; a rank also exits on its own when this process dies (it
  watches its parent);
- Ctrl-C reaches this process (the ranks ignore SIGINT): the call is abandoned and the group is
  closed, nothing left behind;
- a rank that dies (killed, out of memory, a crash) makes the running call, and every later one,
  raise ``StageDied`` naming the rank and its exit code; the other ranks are stopped at once (they
  may be waiting in a collective for the dead one). ``broken`` says why;
- a rank that stops answering (SIGSTOP, a hang that holds its interpreter) is a dead rank: while
  a rank loads or runs a call, a thread of its own says "alive" every ``answer_seconds / 4``
  seconds, whatever its main thread does (a long step sends nothing else, yet keeps answering);
  a rank not heard from for ``answer_seconds`` (``GLM_IMAGE_RANK_TIMEOUT``, default 60) fails
  the call with ``StageDied`` naming it, and the group is stopped (a stopped process is killed at
  once: SIGKILL needs no SIGCONT). Between calls ``broken`` also reports a rank that exited or
  is stopped, so ``/health`` says so before the next call;
- an error in a call (a ``GlmImageError``, a ``NonFiniteError``, anything else) is raised here
  with the rank's message once every rank has answered; ranks that do not answer within
  ``grace`` seconds after one failed are waiting for it in a collective: the group is closed and
  ``StageDied`` raised;
- a ``progress`` callback gets the first rank's progress; when it raises (a server abandoning a
  call, Ctrl-C) every rank is told, the ranks agree to stop at the same step (a small collective
  every few steps), and the exception is raised here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path

from ..errors import Cancelled, GlmImageError, StageDied, StageError, error_of
from .handle import StageSpec

__all__ = ["ProcessStage", "answer_seconds", "process_state", "receive", "send"]

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
GRACE_SECONDS = 10.0  # how long the other ranks may take to fail too, once one rank failed
ANSWER_SECONDS = 60.0  # a busy rank not heard from for this long is hung (GLM_IMAGE_RANK_TIMEOUT)
LOAD_ANSWER_SECONDS = 120.0  # at least this while loading: C-level imports hold the GIL for a while
STOP_SECONDS = 5.0  # how long ranks may take to exit when asked or terminated, before SIGKILL


def answer_seconds(value: float | None = None) -> float:
    """How long a busy rank may stay silent: ``value``, else ``GLM_IMAGE_RANK_TIMEOUT``, else
    ``ANSWER_SECONDS``."""
    if value is None:
        text = os.environ.get("GLM_IMAGE_RANK_TIMEOUT", "").strip()
        try:
            value = float(text) if text else ANSWER_SECONDS
        except ValueError:
            raise GlmImageError(
                f"GLM_IMAGE_RANK_TIMEOUT = {text!r}; allowed: seconds, a number > 0"
            ) from None
    if not value > 0 or value == float("inf"):  # also NaN
        raise GlmImageError(f"the rank answer timeout is {value!r} seconds; allowed: a number > 0")
    return float(value)


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (R, S, D, T for stopped, t traced, Z zombie);
    None where ``/proc`` cannot say."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _is_stopped(pid: int) -> bool:
    return process_state(pid) in ("T", "t")


def send(conn: Connection, message) -> None:
    """Plain pickle: torch's multiprocessing pickler would share tensors through file
    descriptors only a ``multiprocessing`` child may fetch; these are copied."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection):
    return pickle.loads(conn.recv_bytes())


def _stop_all(processes: list[subprocess.Popen]) -> None:
    """SIGTERM every process still running, then SIGKILL what is left after a few seconds; a
    stopped process (SIGSTOP) cannot act on SIGTERM, so it gets SIGKILL at once."""
    for process in processes:
        if process.poll() is None:
            if _is_stopped(process.pid):
                process.kill()
            else:
                process.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ProcessStage:
    """One stage on ``len(devices)`` rank processes (see the module docstring).

    ``devices``: one per rank (``cpu`` for every rank on a CPU); ``threads``: torch threads per
    rank on a CPU (default: the cores split between the ranks); ``answer_seconds``: how long a
    busy rank may stay silent before it counts as hung (default: ``answer_seconds()``)."""

    def __init__(
        self,
        spec: StageSpec,
        devices: Sequence[str],
        *,
        threads: int | None = None,
        answer_seconds: float | None = None,
    ) -> None:
        from ..config import CheckpointConfig
        from ..hub import resolve_checkpoint

        if len(devices) != spec.size:
            raise GlmImageError(
                f"{spec.stage} stage: {spec.size} ranks need {spec.size} devices, got {devices}"
            )
        self.spec, self.devices = spec, list(devices)
        self.stage, self.size = spec.stage, spec.size
        self.config = CheckpointConfig.from_dir(resolve_checkpoint(spec.model))
        self.answer_seconds = globals()["answer_seconds"](answer_seconds)
        self._broken: str | None = None
        self._heard: list[float] = []  # per rank: when it last said anything (monotonic seconds)
        if threads is None and self.devices[0] == "cpu":
            threads = max(1, (os.cpu_count() or 1) // self.size)
        self.threads = threads
        self._lock = threading.Lock()
        self._calls = 0
        self._processes: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._processes)
        self._start()

    @property
    def attention_backend(self) -> str | None:
        return self.spec.attention_backend

    @property
    def device(self):
        """The first rank's device (where the answering rank runs)."""
        import torch

        return torch.device(self.devices[0])

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    @property
    def broken(self) -> str | None:
        """Why no call can run any more; None while every rank can. Between calls this also
        looks at the processes, so a rank that exited or is stopped shows at once (``/health``)."""
        if self._broken is not None:
            return self._broken
        for rank, process in enumerate(self._processes):
            code = process.poll()
            if code is not None:
                return f"{self._who(rank)} stopped with {_how(code)}"
            if _is_stopped(process.pid):
                return f"{self._who(rank)} is stopped (SIGSTOP) and cannot answer"
        return None

    @broken.setter
    def broken(self, reason: str | None) -> None:
        self._broken = reason

    def _who(self, rank: int) -> str:
        pid = self._processes[rank].pid if rank < len(self._processes) else "?"
        if self.size == 1:
            return f"the {self.stage} stage worker (pid {pid}, {self.devices[rank]})"
        return f"the {self.stage} stage's rank {rank} of {self.size} (pid {pid}, {self.devices[rank]})"

    @property
    def _unit(self) -> str:
        return "the group" if self.size > 1 else "the worker"

    def to(self, device) -> None:
        """The ranks stay on their devices."""

    def describe(self) -> dict:
        return {
            "handle": "process",
            "stage": self.stage,
            "pid": self.pids[0] if self._processes else None,  # the answering rank's
            "threads": self.threads,
            "ranks": self.size,
            "devices": self.devices,
            "pids": self.pids,
            "tp": self.spec.tp,
            "cfg": self.spec.cfg,
            "sp": self.spec.sp,
            "broken": self.broken,
        }

    # ---------------------------------------------------------------- start and stop

    def _start(self) -> None:
        import torch.distributed as dist

        # the rendezvous: this process serves it and never joins the group
        # (one rank joins no group: a server's stage worker)
        self._store = (
            dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False) if self.size > 1 else None
        )
        env = dict(os.environ)
        path = [p for p in sys.path if p]
        env["PYTHONPATH"] = os.pathsep.join(path + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        try:
            for rank, device in enumerate(self.devices):
                ours, theirs = socket.socketpair()
                process = subprocess.Popen(
                    [sys.executable, "-m", "glm_image.stages.worker", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),),
                    env=env,
                )
                theirs.close()
                self._processes.append(process)
                conn = Connection(ours.detach())
                self._conns.append(conn)
                send(
                    conn,
                    {
                        "spec": self.spec,
                        "rank": rank,
                        "device": device,
                        "store": ("127.0.0.1", self._store.port) if self._store is not None else None,
                        "threads": self.threads,
                        "parent": os.getpid(),
                        "beat": self.answer_seconds / 4,
                        # the kernel kills a rank whose spawning *thread* ends: only the main
                        # thread lives as long as this process
                        "die_with_parent": threading.current_thread() is threading.main_thread(),
                    },
                )
                self._heard.append(time.monotonic())
            self._wait_ready()
        except BaseException:
            self.close(ask=False)  # a rank still loading reads no message
            raise
        log.info(
            "%s stage: %d ranks ready on %s (pids %s)",
            self.stage,
            self.size,
            ", ".join(self.devices),
            self.pids,
        )

    def _wait_ready(self) -> None:
        ready: set[int] = set()
        while len(ready) < self.size:
            for rank, message in self._receive():
                if message[0] == "failed":
                    raise GlmImageError(
                        f"the {self.stage} stage's rank {rank} ({self.devices[rank]}) could not load "
                        f"{self.spec.model}: {message[1]}"
                    )
                if message[0] == "ready":
                    ready.add(rank)
            self._check_alive("while loading")
            self._check_answering(max(self.answer_seconds, LOAD_ANSWER_SECONDS), "while loading")

    def close(self, ask: bool = True) -> None:
        """Stop every rank: asked first (``ask``; not when they may be stuck in a collective),
        then terminated and killed if they do not go."""
        if ask:
            self._send_all(("stop",))
            deadline = time.monotonic() + STOP_SECONDS
            for process in self._processes:
                if _is_stopped(process.pid):
                    continue  # it cannot read the order; ``_stop_all`` kills it
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(max(0.0, deadline - time.monotonic()))
        self._finalizer()  # terminate / kill what is left; runs once
        for conn in self._conns:
            conn.close()
        self._conns.clear()
        if self._broken is None:
            self._broken = f"the {self.stage} stage group was closed"

    def __enter__(self) -> ProcessStage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fail(self, reason: str, quiet: bool = False) -> StageDied:
        """Close the group for good; the error to raise (logged unless ``quiet``)."""
        if not quiet:
            log.error("%s", reason)
        self.close(ask=False)
        self.broken = reason
        return StageDied(reason)

    def _check_alive(self, when: str) -> None:
        for rank, process in enumerate(self._processes):
            code = process.poll()
            if code is not None:
                raise self._fail(
                    f"{self._who(rank)} stopped with {_how(code)} {when}; {self._unit} was stopped"
                )

    def _check_answering(self, seconds: float, when: str) -> None:
        """A rank silent for ``seconds`` while it should be saying "alive" is hung: a dead rank."""
        now = time.monotonic()
        for rank, heard in enumerate(self._heard):
            if now - heard > seconds:
                stopped = (
                    " (its process is stopped: SIGSTOP)" if _is_stopped(self._processes[rank].pid) else ""
                )
                raise self._fail(
                    f"{self._who(rank)} stopped answering{stopped}: nothing from it within {seconds:g} s "
                    f"{when}; it counts as dead, and {self._unit} was stopped"
                )

    def _receive(self) -> list[tuple[int, tuple]]:
        """The messages ready now (waiting up to ``POLL_SECONDS``), as (rank, message)."""
        out = []
        for conn in wait(self._conns, timeout=POLL_SECONDS):
            rank = self._conns.index(conn)
            try:
                message = receive(conn)
                self._heard[rank] = time.monotonic()
                if message[0] != "alive":  # a heartbeat says only that
                    out.append((rank, message))
            except (EOFError, OSError):  # the rank is ending: let ``_check_alive`` see its exit code
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._processes[rank].wait(5)
        return out

    # ---------------------------------------------------------------- calls

    def run(self, payload, progress: Callable[[str, int, int], None] | None = None):
        """The stage's answer to ``payload`` (from the first rank), every rank having run it:
        ``stages.ar_stage`` / ``dit_stage`` of an ``ArCall`` / ``DitCall``, or, for a picklable
        function of one argument (a module-level function, a ``functools.partial`` of one),
        its value on each rank's engine (benchmarks and tests look inside the engines so)."""
        with self._lock:
            if self._broken is not None:  # a rank that died since is found by ``_run``
                raise StageDied(self._broken)
            self._calls += 1
            call_id = self._calls
            try:
                answer, raised = self._run(call_id, payload, progress)
            except (StageDied, GlmImageError, StageError, Cancelled):
                raise
            except BaseException:  # Ctrl-C or a fault here: the ranks are left mid-call
                self._fail(
                    f"the {self.stage} stage's call was interrupted; {self._unit} was stopped", quiet=True
                )
                raise
        if raised is not None:  # the caller's progress stopped the call; every rank is ready again
            raise raised
        return answer

    def _run(self, call_id: int, payload, progress) -> tuple:
        """(rank 0's answer, the exception the caller's ``progress`` raised or None)."""
        self._check_alive("between calls")
        for rank, process in enumerate(self._processes):
            if _is_stopped(process.pid):  # it would only time out: fail now
                raise self._fail(
                    f"{self._who(rank)} is stopped (SIGSTOP) between calls; {self._unit} was stopped"
                )
        self._heard = [time.monotonic()] * self.size  # idle ranks say nothing: the clocks start now
        for rank, conn in enumerate(self._conns):
            try:
                send(conn, ("call", call_id, payload, progress is not None))
            except OSError:  # the rank is ending: its exit code says how
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._processes[rank].wait(5)
                self._check_alive("as a call was sent")
                raise self._fail(
                    f"the {self.stage} stage's rank {rank} of {self.size} (pid {self._processes[rank].pid}) "
                    f"stopped reading its calls; {self._unit} was stopped"
                ) from None
        replies: dict[int, tuple] = {}
        raised: BaseException | None = None
        failed_at: float | None = None
        while len(replies) < self.size:
            for rank, message in self._receive():
                if message[0] == "progress" and message[1] == call_id:
                    if raised is None and progress is not None:
                        try:
                            progress(*message[2:])
                        except Exception as e:  # the caller wants the call stopped
                            raised = e
                            self._send_all(("cancel", call_id))
                elif message[0] == "reply" and message[1] == call_id:
                    replies[rank] = message
                    if message[2] not in ("ok", "cancelled") and failed_at is None:
                        failed_at = time.monotonic()
            self._check_alive("while it ran a call")
            self._check_answering(self.answer_seconds, "while it ran a call")
            if failed_at is not None and time.monotonic() - failed_at > GRACE_SECONDS:
                waiting = sorted(set(range(self.size)) - set(replies))
                first = min(r for r, m in replies.items() if m[2] not in ("ok", "cancelled"))
                raise self._fail(
                    f"the {self.stage} stage's rank {first} failed ({replies[first][3].splitlines()[0]}) "
                    f"and ranks {waiting} did not finish; {self._unit} was stopped"
                )
        for rank in range(self.size):
            _, _, kind, value = replies[rank]
            if kind not in ("ok", "cancelled"):
                raise error_of(kind, value, f"rank {rank} of the {self.stage} stage")
        if raised is None and any(replies[r][2] == "cancelled" for r in replies):
            raise Cancelled(f"the {self.stage} stage's call was stopped")
        return replies[0][3], raised

    def _send_all(self, message: tuple) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):  # a dead rank: ``_check_alive`` reports it
                send(conn, message)


def _how(code: int) -> str:
    """A process's exit status in words."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
