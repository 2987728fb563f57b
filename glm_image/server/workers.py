"""A stage in its own worker process: its own engine, its own device, one call at a time.

The server spawns the worker (``spawn``: a fresh interpreter, never a fork of a process holding
torch threads or a CUDA context), which loads one engine (``stagework.load_stage``) and answers
calls over a pipe: ``ArCall`` -> ``PriorTokens`` for the AR stage, ``DitCall`` -> ``Images``
for the DiT stage (``glm_image.stages``). Replies are plain tuples; an error crosses as its kind
and text (a NaN result stays a ``NonFiniteError``, anything else is logged with the worker's
traceback under the request's error id).

A worker dies with the server: it ignores Ctrl-C (the server stops it), exits when its pipe
closes, and on Linux is killed by the kernel if the server dies first (``PR_SET_PDEATHSIG``).
When a worker dies while it runs a call, that call fails (``StageDied``: a 500 with an error id)
and a new worker is started; the calls that come meanwhile wait for it (a worker found dead
between calls is replaced before the next call, which then runs). A worker that cannot start
again leaves the server answering 503 (``broken``), its /health saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

from ..errors import GlmImageError, NonFiniteError
from ..stages import run_stage
from .errors import ApiError
from .executors import Abandon, StageDied
from .stagework import Abandoned, StageSpec, load_stage

__all__ = ["ProcessRunner", "staged_processes"]

log = logging.getLogger("glm_image.server")

POLL_SECONDS = 0.05  # how often a waiting call checks the worker is alive and still wanted


class _Lost(Exception):
    """The worker's pipe closed or its process ended."""


class RemoteError(Exception):
    """An unexpected error in a worker: its type and traceback, for the server log."""


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel sends SIGKILL when the server dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the server died before the line above took effect
        os._exit(0)


def _worker_main(spec: StageSpec, threads: int | None, conn, cancel, parent: int) -> None:
    """The worker process: load, say ready, then answer calls until the pipe closes."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us
    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)  # this process's own setting: it runs nothing else
        engine = load_stage(spec)
    except BaseException as e:  # every load failure is reported, then we exit
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            call_id, payload = conn.recv()
        except (EOFError, OSError):  # the server closed the pipe or died
            return

        def progress(stage: str, done: int, total: int, call_id: int = call_id) -> None:
            if cancel.value == call_id:
                raise Abandoned

        try:
            reply = (call_id, "ok", run_stage(spec.stage, engine, payload, progress))
        except Abandoned:
            reply = (call_id, "abandoned", "")
        except NonFiniteError as e:
            reply = (call_id, "nonfinite", str(e))
        except GlmImageError as e:
            reply = (call_id, "invalid", str(e))
        except Exception as e:  # the server decides; the worker keeps serving
            reply = (
                call_id,
                "error",
                f"{type(e).__name__} in the {spec.stage} worker:\n{traceback.format_exc()}",
            )
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


class ProcessRunner:
    """One stage in a spawned worker process (see the module docstring)."""

    slots = 1

    def __init__(self, spec: StageSpec, threads: int | None = None) -> None:
        self.spec, self.threads = spec, threads
        self.broken: str | None = None
        self.restarts = 0
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._conn = None
        self._cancel = None
        self._calls = 0
        self._ready: asyncio.Event | None = None
        self._link: ThreadPoolExecutor | None = None
        self._lock: asyncio.Lock | None = None
        self._restarting: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def describe(self) -> dict:
        return {
            "runner": "process",
            "pid": self.pid,
            "device": self.spec.device or "auto",
            "restarts": self.restarts,
            "threads": self.threads,
        }

    async def start(self) -> None:
        self._link = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"glm-image-{self.spec.stage}-link")
        self._ready, self._lock = asyncio.Event(), asyncio.Lock()
        await self._spawn()
        self._ready.set()

    async def _spawn(self) -> None:
        """Start a worker and wait until its engine is loaded; a load error is a ``GlmImageError``."""
        parent, child = self._context.Pipe()
        cancel = self._context.RawValue("q", 0)
        process = self._context.Process(
            target=_worker_main,
            args=(self.spec, self.threads, child, cancel, os.getpid()),
            name=f"glm-image-{self.spec.stage}-worker",
            daemon=True,  # multiprocessing ends it at exit if nothing else did
        )
        process.start()
        child.close()
        self._process, self._conn, self._cancel = process, parent, cancel
        loop = asyncio.get_running_loop()
        try:
            message = await loop.run_in_executor(self._link, self._first_message, parent, process)
        except BaseException:
            await self._end()
            raise
        if message[0] != "ready":
            await self._end()
            raise GlmImageError(
                f"the {self.spec.stage} stage worker could not load {self.spec.model}: {message[1]}"
            )
        log.info(
            "the %s stage worker (pid %d) is ready on %s",
            self.spec.stage,
            process.pid,
            self.spec.device or "auto",
        )

    @staticmethod
    def _first_message(conn, process) -> tuple:
        while not conn.poll(POLL_SECONDS):
            if not process.is_alive() and not conn.poll(0):
                process.join(1)
                return ("failed", f"the worker exited with code {process.exitcode} while loading")
        try:
            return conn.recv()
        except (EOFError, OSError):
            return ("failed", "the worker closed its pipe while loading")

    async def stop(self) -> None:
        if self._restarting is not None:
            self._restarting.cancel()
            await asyncio.gather(self._restarting, return_exceptions=True)
        await self._end()
        if self._link is not None:
            self._link.shutdown(wait=False, cancel_futures=True)

    async def _end(self) -> None:
        """Stop the worker: SIGTERM, then SIGKILL if it does not go within 10 s."""
        process, conn = self._process, self._conn
        if process is None:
            return
        if process.is_alive():
            process.terminate()
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 5)
        if conn is not None:
            conn.close()
        process.close()
        self._process = self._conn = None

    async def run(self, payload, abandoned: Abandon):
        async with self._lock:
            await self._ready.wait()
            if self.broken is None and not self._process.is_alive():  # it died between calls
                await self._lost()
                await self._ready.wait()
            if self.broken is not None:
                raise ApiError("unavailable", f"the server cannot generate: {self.broken}")
            self._calls += 1
            call_id, pid = self._calls, self.pid
            loop = asyncio.get_running_loop()
            try:
                reply = await loop.run_in_executor(
                    self._link, self._roundtrip, self._conn, self._process, call_id, payload, abandoned
                )
            except _Lost:
                code = await self._lost()
                raise StageDied(
                    f"the {self.spec.stage} stage worker (pid {pid}) stopped with exit code {code} while it "
                    "ran this request; a new one is starting"
                ) from None
        _, kind, value = reply
        if kind == "ok":
            return value
        if kind == "abandoned":
            raise Abandoned
        if kind == "nonfinite":
            raise NonFiniteError(value)
        if kind == "invalid":
            raise GlmImageError(value)
        raise RemoteError(value)

    def _roundtrip(self, conn, process, call_id: int, payload, abandoned: Abandon) -> tuple:
        """Runs on the link thread: send the call, wait for its reply, watch the worker."""
        try:
            conn.send((call_id, payload))
        except (BrokenPipeError, OSError):
            raise _Lost from None
        cancelled = False
        while True:
            if conn.poll(POLL_SECONDS):
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    raise _Lost from None
                if reply[0] == call_id:
                    return reply
                continue
            if not process.is_alive() and not conn.poll(0):
                raise _Lost
            if not cancelled and abandoned():
                self._cancel.value = call_id  # the worker stops the call at its next step
                cancelled = True

    async def _lost(self) -> int | None:
        """The worker died: note its exit code and start a new one in the background."""
        process = self._process
        await asyncio.to_thread(process.join, 5)
        code = process.exitcode
        log.error("the %s stage worker (pid %d) died with exit code %s", self.spec.stage, process.pid, code)
        self._ready.clear()
        await self._end()
        self._restarting = asyncio.create_task(self._restart(), name=f"glm-image-{self.spec.stage}-restart")
        return code

    async def _restart(self) -> None:
        try:
            await self._spawn()
            self.restarts += 1
        except Exception as e:  # any failure leaves the stage broken, said in /health
            self.broken = f"the {self.spec.stage} stage worker died and could not start again ({e})"
            log.error("%s", self.broken)
        finally:
            self._ready.set()


def staged_processes(
    front,
    model: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    attention_backend: str | None = None,
    quantize: str | None = None,
    ar_device: str | None = None,
    dit_device: str | None = None,
    threads: int | None = None,
):
    """A ``StagedExecutor`` whose AR and DiT run in two worker processes. The devices are
    checked here, before any worker starts; on a CPU (both stages) the cores are split between
    the two workers unless ``threads`` says otherwise."""
    from ..device import resolve_device
    from .executors import StagedExecutor

    where = {"ar": ar_device or device, "dit": dit_device or device}
    resolved = {stage: resolve_device(name) for stage, name in where.items()}
    if threads is None and all(d.type == "cpu" for d in resolved.values()):
        threads = max(1, (os.cpu_count() or 2) // 2)
    runners = [
        ProcessRunner(
            StageSpec(stage, model, str(resolved[stage]), dtype, attention_backend, quantize),
            threads if resolved[stage].type == "cpu" else None,
        )
        for stage in ("ar", "dit")
    ]
    return StagedExecutor(front, *runners, name="stages")


def stage_quantize(quantize: str | None) -> str | None:
    """The weight format for stage workers, checked before any starts. ``auto`` needs the whole
    pipeline's memory planner (both stages on one device), so stages apart take a named scheme."""
    from ..quant import parse_quantize

    scheme = parse_quantize(quantize)
    if str(scheme) == "auto":
        raise GlmImageError(
            "quantize = 'auto' plans both stages on one device; with the stages apart name the "
            "format, e.g. int8 or ar=int4,dit=int8"
        )
    return quantize
