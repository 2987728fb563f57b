"""One rank of a ``ProcessStage``: ``python -m glm_image.stages.worker FD``.

The rank reads its orders from the socket ``FD`` (a ``multiprocessing`` connection to the process
that spawned it): first what to load (``handle.StageSpec``, its rank and device, the rendezvous),
then calls, until it is told to stop or the connection closes. One of several ranks joins the
process group with the device's backend and builds its groups (``parallel.groups``); a lone rank
(a server's stage worker) joins none. It loads its engine and runs each call with ``run.run_on``.

It ignores Ctrl-C (its parent stops it) and exits by itself when its parent dies (on Linux the
kernel also kills it then, even while it is stopped). While it loads or runs a call a thread of its
own says "alive" to the parent every few seconds (``process.ProcessStage`` counts a silent rank as
hung); every message goes through one lock, so the heartbeat never splits another message.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from datetime import timedelta

from ..errors import Cancelled, reply_of
from .handle import load_stage
from .process import receive, send
from .run import run_on

__all__ = ["main"]

CANCEL_EVERY = 16  # AR steps between the ranks' checks that a call is still wanted (DiT: every step)

_SENDING = threading.Lock()  # the main thread and the heartbeat share the connection
_BUSY = threading.Event()  # loading or in a call: the parent waits for us and listens


def _say(conn, message) -> None:
    with _SENDING:
        send(conn, message)


def _heartbeat(conn, seconds: float) -> None:
    """Say "alive" every ``seconds`` while busy, from a thread: a long step of the main thread
    (which releases the GIL in torch's kernels and collectives) does not silence it, a stopped
    or wedged process does. Idle, we say nothing: the parent does not read between calls."""

    def beat() -> None:
        while True:
            time.sleep(seconds)
            if _BUSY.is_set():
                try:
                    _say(conn, ("alive",))
                except OSError:
                    return  # the parent is gone; the parent watch ends us

    threading.Thread(target=beat, name="glm-image-heartbeat", daemon=True).start()


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL when the parent dies, even if we are stopped then (the
    parent watch thread cannot run in a stopped process)."""
    if sys.platform.startswith("linux"):
        import contextlib
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _watch_parent(parent: int) -> None:
    """Exit when the process that spawned us is gone (even if it was killed)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="glm-image-parent-watch", daemon=True).start()


class _Progress:
    """A rank's progress callback: the first rank reports to the parent; every rank polls for a
    cancel order, and every few steps they all agree (one small collective) whether to stop."""

    def __init__(self, conn, call_id: int, control, leads: bool) -> None:
        self.conn, self.call_id, self.control, self.leads = conn, call_id, control, leads
        self.calls, self.cancel, self.stop = 0, False, False

    def __call__(self, stage: str, done: int, total: int) -> None:
        import torch

        if self.leads:
            _say(self.conn, ("progress", self.call_id, stage, done, total))
        while self.conn.poll(0):
            message = receive(self.conn)
            if message[0] == "cancel" and message[1] == self.call_id:
                self.cancel = True
            elif message[0] == "stop":
                self.cancel = self.stop = True
        self.calls += 1
        if self.control is None:  # one rank: nobody to agree with
            if self.cancel:
                raise Cancelled
        elif stage == "dit" or self.calls % CANCEL_EVERY == 0:
            flag = torch.tensor([int(self.cancel)])
            if self.control.all_reduce(flag).item():
                raise Cancelled


def _serve(conn, spec, engine, control, leads: bool) -> None:
    while True:
        try:
            message = receive(conn)
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        if message[0] != "call":
            continue  # a cancel order for a call already over
        _, call_id, payload, wants_progress = message
        _BUSY.set()
        progress = _Progress(conn, call_id, control, leads) if wants_progress else None
        try:
            # a call of the stage (``ArCall``, ``DitCall``), or a function of the engine itself
            result = run_on(spec.stage, engine, payload, progress)
            reply = ("ok", result if leads else None)
        except Exception as e:  # said so the handle raises it again (``errors.error_of``)
            reply = reply_of(e)
        _say(conn, ("reply", call_id, *reply))
        _BUSY.clear()
        if progress is not None and progress.stop:
            return


def main(fd: int) -> None:
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    conn = Connection(fd)
    init = receive(conn)
    if init.get("die_with_parent"):
        _die_with_parent()
    _watch_parent(init["parent"])  # also catches a parent that died before the line above
    _BUSY.set()  # loading
    _heartbeat(conn, init.get("beat", 15.0))
    spec, rank = init["spec"], init["rank"]
    try:
        import torch
        import torch.distributed as dist

        from ..parallel.comm import CommStats
        from ..parallel.groups import backend, control_group, stage_groups

        if init["threads"] is not None:
            torch.set_num_threads(init["threads"])  # this process's own setting: it runs nothing else
        device = torch.device(init["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif device.type == "npu":
            from ..device import npu_module

            npu_module()  # torch.npu exists once torch_npu is imported
            torch.npu.set_device(device)
        control = groups = None
        if init["store"] is not None:  # several ranks: a process group; one rank needs none
            host, port = init["store"]
            store = dist.TCPStore(host, port, spec.size, False, timeout=timedelta(minutes=10))
            dist.init_process_group(backend(device), store=store, rank=rank, world_size=spec.size)
            control = control_group(device, spec.size, rank)
            groups = stage_groups(spec, 0, spec.size, rank, device, CommStats())
        engine = load_stage(spec, device, groups)
    except BaseException as e:  # every load failure is reported, then we exit
        _say(conn, ("failed", f"{type(e).__name__}: {e}"))
        return
    _say(conn, ("ready", os.getpid()))
    _BUSY.clear()
    leads = rank == 0
    try:
        _serve(conn, spec, engine, control, leads)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]))
