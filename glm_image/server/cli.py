"""`glm-image serve`: arguments here; FastAPI and uvicorn are imported only when it runs."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import socket

from ..errors import GlmImageError
from ..hub import resolve_checkpoint
from ..options import (
    generation_kwargs,
    lora_kwargs,
    parallel_config,
    parallel_kwargs,
    runtime_kwargs,
)
from .arguments import (
    add_serve_arguments,
    checked_loras,
    ray_options_from_args,
    settings_from_args,
    stage_options_from_args,
)

__all__ = ["add_parser", "listen", "uvicorn_server"]

log = logging.getLogger("glm_image.server")


def add_parser(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="HTTP server: bigmodel and OpenAI image APIs",
        description="Serve the bigmodel (POST /api/paas/v4/images/generations) and OpenAI "
        "(POST /v1/images/generations, /v1/images/edits) image APIs, plus /health, /metrics and "
        "/files/<id>.png. The model loads once, before the server listens.",
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=_run)


FORCED_EXIT_ANSWER_S = 5.0  # after a second Ctrl-C: how long the 503s and the app's shutdown may take


def listen(host: str, port: int) -> list[socket.socket]:
    """Bound sockets for ``--host``/``--port`` (every address the host resolves to, as uvicorn's
    own binding does), made before the model loads: a busy port or a wrong host is a one-line
    error now, not a log line after minutes of loading. The caller hands them to uvicorn (no
    other process can take the port meanwhile) or closes them."""
    where = f"--host {host} --port {port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) else "not a valid host name"
        raise GlmImageError(f"--host {host}: cannot listen there ({reason})") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
            if family == socket.AF_INET6:  # as asyncio: the IPv4 address gets its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # bound, not listening: while the model loads a client is refused at once (a health
            # probe must not hang), and uvicorn's listen() then takes the port
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]  # with --port 0: every address on the free port the first got
    except OSError as e:
        for sock in sockets:
            sock.close()
        if e.errno == errno.EADDRINUSE:
            raise GlmImageError(
                f"{where}: the port is already in use; stop what listens there or pick another "
                "--port (0: any free port)"
            ) from None
        if e.errno == errno.EACCES:
            raise GlmImageError(f"{where}: permission denied (ports below 1024 need privileges)") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise GlmImageError(f"--host {host}: not an address of this machine ({e.strerror})") from None
        raise GlmImageError(f"{where}: cannot listen there ({e.strerror or e})") from None
    return sockets


def uvicorn_server(app, host: str, port: int):
    """uvicorn's server for ``app``, with an answer for a forced exit.

    uvicorn's first Ctrl-C waits for the requests in flight; a second one ("force quit") skips the
    app's shutdown and lets the event loop cancel whatever still waits, so each waiting request
    got a bare 500 and a traceback in the log. Here the queue answers them all with a 503 at
    once (both APIs' error shape, through the app's handlers), their engine calls stop at the
    next step, and the app's own shutdown runs, each bounded by ``FORCED_EXIT_ANSWER_S``.
    """
    import uvicorn

    class Server(uvicorn.Server):
        _loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            if self.force_exit and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._abort)

        def _abort(self) -> None:
            queue = getattr(app.state, "queue", None)
            if queue is None:
                return
            answered = queue.abort("the server is shutting down (forced); this request was not finished")
            if answered:
                log.warning("forced shutdown: answered %d waiting request(s) with 503", answered)

        async def shutdown(self, sockets=None) -> None:
            await super().shutdown(sockets)
            if not self.force_exit:
                return
            self._abort()  # also when the force came before the loop could run it
            loop = asyncio.get_running_loop()
            deadline = loop.time() + FORCED_EXIT_ANSWER_S
            while self.server_state.tasks and loop.time() < deadline:  # the 503s on their way out
                await asyncio.sleep(0.02)
            try:  # the app's shutdown, which uvicorn skips on a forced exit: the executor stops
                await asyncio.wait_for(self.lifespan.shutdown(), max(deadline - loop.time(), 0.5))
            except TimeoutError:
                log.warning("forced shutdown: the engine did not stop in time; leaving it")

    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on")
    return Server(config)


def _run(args: argparse.Namespace) -> None:
    try:
        import uvicorn  # noqa: F401  (here: its absence is a one-line error before anything loads)

        from .app import create_app
        from .files import FileStore
    except ImportError as e:
        raise GlmImageError(f'serve: {e.name} is not installed; pip install "glm-image[serve]"') from None

    settings = settings_from_args(args)
    stages, ray = stage_options_from_args(args), ray_options_from_args(args)
    if args.max_rows < 1:
        raise GlmImageError(f"--max-rows {args.max_rows}; allowed: an integer >= 1")
    parallel_config(args).check()  # the heads and the device count are checked as the model loads
    FileStore(settings.output_dir)  # a bad --output-dir fails now, not after the model loads
    sockets = listen(args.host, args.port)  # so does a busy --port or a wrong --host
    for name in ("glm_image.server", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.INFO)
    if ray is not None:
        try:
            from .ray_app import serve_with_ray
        except ImportError as e:
            raise GlmImageError(
                f'serve --ray: {e.name} is not installed; pip install "glm-image[ray]"'
            ) from None
        for sock in sockets:  # Ray Serve's proxy binds the port itself
            sock.close()
        serve_with_ray(args)
        return
    if stages is not None:
        from .executors import ModelFront
        from .workers import stage_quantize, staged_processes

        quantize = stage_quantize(args.quantize)
        pipe = ModelFront.from_checkpoint(args.model, quantize=quantize or "none", **generation_kwargs(args))
        named, fixed = checked_loras(args)
        runtime = runtime_kwargs(args)
        executor = staged_processes(
            pipe,
            str(resolve_checkpoint(args.model)),
            device=runtime["device"],
            dtype=args.dtype,
            attention_backend=runtime["attention_backend"],
            quantize=quantize,
            ar_device=stages.ar_device,
            dit_device=stages.dit_device,
            threads=stages.threads,
            named_lora=named,
            fixed_lora=fixed,
            batching=args.batching,
            max_rows=args.max_rows,
        )
        pipe.lora_scales = {name: scale for name, _, scale in named}
        app = create_app(pipe, settings, executor)
    else:
        from ..pipeline import GlmImage

        named, _ = checked_loras(args)
        pipe = GlmImage.from_pretrained(
            args.model,
            **runtime_kwargs(args),
            **generation_kwargs(args),
            **parallel_kwargs(args),
            **lora_kwargs(args),
        )
        pipe.lora_scales = {}  # the adapters requests may name -> their default scale
        for name, path, scale in named:
            pipe.load_lora(name, path)
            pipe.lora_scales[name] = scale
        from .continuous import executor_for

        executor = None
        if pipe.parallel.placement == "separate" and args.batching != "continuous":
            from .executors import StagedExecutor  # each stage on devices of its own: overlap them

            executor = StagedExecutor.in_threads(pipe)
        else:
            executor = executor_for(pipe, args.batching, args.max_rows)
        app = create_app(pipe, settings, executor)
    if settings.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s with no API key: anyone who can reach it can generate", args.host)
    server = uvicorn_server(app, args.host, args.port)
    try:
        server.run(sockets=sockets)
    except OSError as e:  # another server took the port while the model loaded
        if server.started or e.errno != errno.EADDRINUSE:
            raise
        raise GlmImageError(
            f"--host {args.host} --port {args.port}: the port was taken while the model loaded; "
            "pick another --port (0: any free port)"
        ) from None
    finally:
        for sock in sockets:
            sock.close()  # a stage on several ranks: its worker processes stop with the server
        if hasattr(pipe, "close"):
            pipe.close()
