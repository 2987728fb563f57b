"""One rank of a ``StageGroup``: ``python -m glm_image.parallel.worker FD``.

The rank reads its orders from the socket ``FD`` (a ``multiprocessing`` connection to the process
that spawned it): first what to load (``launch.RankSpec``, its rank and device, the rendezvous),
then calls, until it is told to stop or the connection closes. It joins the process group with
the device's backend (NCCL on CUDA, HCCL on Ascend, gloo on the CPU), builds its groups (the AR's
tensor-parallel group; the DiT's CFG and SP groups, rank = cfg_index * sp + sp_index), loads its
engine and runs each call with the stage function of ``glm_image.stages``.

It ignores Ctrl-C (its parent stops it) and exits by itself when its parent dies (on Linux the
kernel also kills it then, even while it is stopped). While it loads or runs a call a thread of its
own says "alive" to the parent every few seconds (``launch.StageGroup`` counts a silent rank as
hung); every message goes through one lock, so the heartbeat never splits another message.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta

from .launch import receive, send

__all__ = ["backend", "control_group", "load_rank", "main", "stage_groups"]

CANCEL_EVERY = 16  # AR steps between the ranks' checks that a call is still wanted (DiT: every step)

_SENDING = threading.Lock()  # the main thread and the heartbeat share the connection
_BUSY = threading.Event()  # loading or in a call: the parent waits for us and listens


class _Cancelled(Exception):
    pass


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


def backend(device) -> str:
    """The process-group backend of ``device``'s type: NCCL, HCCL or gloo."""
    if device.type == "cuda":
        return "nccl"
    if device.type == "npu":
        from ..device import npu_module

        npu_module()  # registers the hccl backend
        return "hccl"
    return "gloo"


def control_group(device, world: int, rank: int):
    """A gloo ``Comm`` over the whole world, for decisions the ranks take together on the host
    (a call's cancellation, an SPMD launch's calls and answers)."""
    import torch.distributed as dist

    from .comm import Comm

    group = dist.group.WORLD if device.type == "cpu" else dist.new_group(backend="gloo")
    return Comm(group, world, rank, range(world), None)


def stage_groups(spec, first: int, world: int, rank: int, device, stats):
    """The groups of ``spec``'s stage, whose ranks are ``first`` .. ``first + spec.size - 1`` of a
    world of ``world``: the AR's tensor-parallel ``Comm``, or the DiT's ``DitGroups`` (rank =
    first + cfg_index * sp + sp_index); None when ``rank`` is not one of them. Every rank of the
    world calls it, in the same order (creating a process group takes all of them)."""
    import torch.distributed as dist

    from .comm import Comm, DitGroups

    def comm(members: list[int]) -> Comm | None:
        if len(members) == 1:  # a group of one needs no process group (and every rank skips it)
            group = None
        else:
            group = dist.group.WORLD if len(members) == world else dist.new_group(members)
        if rank not in members:
            return None
        return Comm(group, len(members), members.index(rank), members, device, stats)

    if spec.stage == "ar":
        return comm(list(range(first, first + spec.tp)))
    sp = [comm([first + c * spec.sp + s for s in range(spec.sp)]) for c in range(spec.cfg)]
    cfg = [comm([first + c * spec.sp + s for c in range(spec.cfg)]) for s in range(spec.sp)]
    mine_sp, mine_cfg = [x for x in sp if x is not None], [x for x in cfg if x is not None]
    return DitGroups(mine_cfg[0], mine_sp[0]) if mine_sp else None


def load_rank(spec, device, groups):
    """The engine of ``spec``'s stage on this rank: its shard, in its groups."""
    import dataclasses

    from ..server.stagework import load_stage

    stage = dataclasses.replace(spec, quantize=f"{spec.stage}={spec.quantize}")  # "int4": the AR's only
    return load_stage(stage, device, **({"tp": groups} if spec.stage == "ar" else {"groups": groups}))


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
        if stage == "dit" or self.calls % CANCEL_EVERY == 0:
            flag = torch.tensor([int(self.cancel)])
            if self.control.all_reduce(flag).item():
                raise _Cancelled


def _serve(conn, spec, engine, control, leads: bool) -> None:
    from ..errors import GlmImageError, NonFiniteError
    from ..stages import run_stage

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
            result = (
                payload(engine) if callable(payload) else run_stage(spec.stage, engine, payload, progress)
            )
            reply = ("ok", result if leads else None)
        except _Cancelled:
            reply = ("cancelled", "")
        except NonFiniteError as e:
            reply = ("nonfinite", str(e))
        except GlmImageError as e:
            reply = ("invalid", str(e))
        except Exception as e:
            reply = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
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

        from .comm import CommStats

        if init["threads"] is not None:
            torch.set_num_threads(init["threads"])  # this process's own setting: it runs nothing else
        device = torch.device(init["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        elif device.type == "npu":
            from ..device import npu_module

            npu_module()  # torch.npu exists once torch_npu is imported
            torch.npu.set_device(device)
        host, port = init["store"]
        store = dist.TCPStore(host, port, spec.size, False, timeout=timedelta(minutes=10))
        dist.init_process_group(backend(device), store=store, rank=rank, world_size=spec.size)
        control = control_group(device, spec.size, rank)
        groups = stage_groups(spec, 0, spec.size, rank, device, CommStats())
        engine = load_rank(spec, device, groups)
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
