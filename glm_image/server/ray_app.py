"""`glm-image serve --ray`: the same FastAPI app on Ray Serve, the AR and the DiT scaled apart.

Three deployments make one Serve application:

- ``Ingress``: our FastAPI app (``create_app``: both API shapes, auth, metrics, the same errors,
  the same bounded queue and batching), built in its replica by ``__serve_build_asgi_app__``,
  with a ``StagedExecutor`` whose stages are the two deployments below. It loads no weights; it
  writes the PNGs to ``--output-dir`` and serves them (one replica, so every URL it returns is
  served by the replica that wrote the file).
- ``ArStage`` and ``DitStage``: one engine each per replica, ``max_ongoing_requests=1``, their
  own replica counts (fixed, or autoscaled between a minimum and a maximum), CPUs and GPUs per
  replica (at most one GPU: a replica's engine runs on one device; more GPUs, more replicas). Only an ``ArCall`` goes to the AR, only ``PriorTokens``
  (token ids, condition codes) from it to the DiT; images come back to the ingress.

A replica that dies while it runs a call: the call is sent once more (Serve routes it to a
live replica, or to the one it restarts); if that fails too the request gets a 500 naming the
stage, with an error id. The seeds are drawn before the first try, so a retried call gives the
same images and none is written twice.

``build(args)`` is the application builder of a Ray Serve config file (``deploy/``); its
``args`` are the ``glm-image serve`` flags, parsed by the same parser.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import RequestCancelledError

from ..errors import Cancelled, GlmImageError, StageDied
from ..stages import StageSpec, open_stage
from .executors import Abandon, ModelFront, StagedExecutor
from .settings import RayOptions, ServerSettings

__all__ = ["APP_NAME", "RayRunner", "application", "build", "serve_with_ray"]

log = logging.getLogger("glm_image.server")

APP_NAME = "glm-image"
POLL_SECONDS = 0.1  # how often a waiting call checks that someone still wants it
# Died, unreachable, or lost with its node: the call never finished there.
REPLICA_LOST = (RayActorError, RequestCancelledError)


def _log_like_serve() -> None:
    """Our log lines in a replica: through Serve's handlers (its console and log files)."""
    ours, theirs = logging.getLogger("glm_image"), logging.getLogger("ray.serve")
    ours.setLevel(logging.INFO)
    for handler in theirs.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = not theirs.handlers


class _StageReplica:
    """One stage handle (``stages.open_stage``: its engine loaded here, on the one device the
    replica uses; more than one GPU per replica is refused); one call at a time."""

    stage = ""

    def __init__(self, spec: StageSpec) -> None:
        _log_like_serve()
        self.handle = open_stage(spec)

    async def run(self, payload):
        """The stage call on a thread; when the caller cancels, the call stops at its next step
        and the replica answers nothing until the engine is free again."""
        stop = threading.Event()

        def progress(stage: str, done: int, total: int) -> None:
            if stop.is_set():
                raise Cancelled

        work = asyncio.ensure_future(asyncio.to_thread(self.handle.run, payload, progress))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.gather(work, return_exceptions=True)
            raise


@serve.deployment(max_ongoing_requests=1)
class ArStage(_StageReplica):
    stage = "ar"


@serve.deployment(max_ongoing_requests=1)
class DitStage(_StageReplica):
    stage = "dit"


class RayRunner:
    """A stage as a Serve deployment, reached through its handle."""

    broken = None

    def __init__(self, stage: str, handle, slots: int) -> None:
        self.stage, self.handle, self.slots = stage, handle, slots
        self.retries = 0  # calls sent again after their replica was lost

    async def start(self) -> None:
        """Serve started the replicas (``serve.run`` returns once they are healthy)."""

    async def stop(self) -> None:
        """Serve stops the replicas with the application."""

    def describe(self) -> dict:
        return {
            "runner": "ray",
            "deployment": self.handle.deployment_name,
            "slots": self.slots,
            "retries": self.retries,
        }

    async def run(self, payload, abandoned: Abandon):
        try:
            return await self._once(payload, abandoned)
        except REPLICA_LOST as e:
            self.retries += 1
            log.warning(
                "a %s replica was lost during a call (%s); sending it again", self.stage, type(e).__name__
            )
        try:
            return await self._once(payload, abandoned)
        except REPLICA_LOST as e:
            raise StageDied(
                f"a {self.stage} replica was lost while it ran this request, twice ({type(e).__name__}); "
                "Serve is replacing it"
            ) from e

    async def _once(self, payload, abandoned: Abandon):
        response = self.handle.run.remote(payload)

        async def result():
            return await response

        task = asyncio.ensure_future(result())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_SECONDS)
                if done:
                    return task.result()
                if abandoned():
                    response.cancel()
                    raise Cancelled
        except RayTaskError as e:  # raised by our code in the replica: keep its kind
            cause = getattr(e, "cause", None)
            if isinstance(cause, (GlmImageError, Cancelled)):
                raise cause from None
            raise RuntimeError(f"the {self.stage} replica failed:\n{e}") from None
        finally:
            task.cancel()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress()
class Ingress:
    """Our FastAPI app; its two stages are the AR and DiT deployments."""

    def __init__(self, ar, dit, config: dict) -> None:
        self.ar, self.dit, self.config = ar, dit, config

    def __serve_build_asgi_app__(self):
        from .app import create_app

        _log_like_serve()
        config = self.config
        settings: ServerSettings = config["settings"]
        if config["api_key_env"]:  # read here: the key never travels in the deployment's arguments
            settings = dataclasses.replace(settings, api_key=os.environ.get(config["api_key_env"], ""))
        front = ModelFront(config["name"], config["limits"], *config["decoding"], **config["jacobi"])
        executor = StagedExecutor(
            front,
            RayRunner("ar", self.ar, config["slots"][0]),
            RayRunner("dit", self.dit, config["slots"][1]),
            name="ray",
        )
        return create_app(front, settings, executor)


def _stage_options(replicas: tuple[int, int], cpus: float, gpus: float) -> dict:
    low, high = replicas
    options: dict = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}}
    if low == high:
        options["num_replicas"] = low
    else:  # Serve adds replicas while calls queue at the handle, up to the maximum
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": 1,
        }
    return options


def application(
    front: ModelFront,
    model: str,
    settings: ServerSettings,
    options: RayOptions,
    *,
    device: str | None = None,
    dtype: str | None = None,
    attention_backend: str | None = None,
    quantize: str | None = None,
    api_key_env: str | None = None,
    gpus: tuple[float, float] = (0, 0),
):
    """The Serve application: ``Ingress`` bound to the two stage deployments. ``model`` is what
    every stage replica loads (a path each node can read, or a hub id); ``gpus``: per replica."""
    ar = ArStage.options(**_stage_options(options.ar_replicas, options.ar_cpus, gpus[0])).bind(
        StageSpec("ar", model, device, dtype, attention_backend, quantize)
    )
    dit = DitStage.options(**_stage_options(options.dit_replicas, options.dit_cpus, gpus[1])).bind(
        StageSpec("dit", model, device, dtype, attention_backend, quantize)
    )
    config = {
        "settings": dataclasses.replace(settings, api_key=None),
        "api_key_env": api_key_env,
        "name": front.name,
        "limits": front.limits,
        "decoding": (front.ar_decoding, front.jacobi_window, front.dit_cache, front.quantize),
        "jacobi": front.jacobi.kwargs(),
        # a batch enters a stage when one of its replicas can take it (the most, when autoscaled)
        "slots": (options.ar_replicas[1], options.dit_replicas[1]),
    }
    return Ingress.bind(ar, dit, config)


def _gpus(options: RayOptions, device: str | None) -> tuple[float, float]:
    """GPUs per replica: as given, else 1 when the cluster has GPUs and the device is not cpu."""
    default = 0.0
    unset = options.ar_gpus is None or options.dit_gpus is None
    if unset and (device is None or not str(device).startswith("cpu")):
        default = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    ar = options.ar_gpus if options.ar_gpus is not None else default
    dit = options.dit_gpus if options.dit_gpus is not None else default
    return ar, dit


def _from_args(args) -> tuple:
    """(front, settings, options, application keywords) of parsed ``serve`` flags."""
    from ..hub import SYNTHETIC_MODELS, resolve_checkpoint
    from ..options import generation_kwargs
    from .cli import ray_options_from_args, settings_from_args

    settings = settings_from_args(args)
    options = ray_options_from_args(args) or RayOptions()
    quantize = _stage_quantize(args.quantize)
    front = ModelFront.from_checkpoint(args.model, quantize=quantize or "none", **generation_kwargs(args))
    # a preset is built here once; every replica then reads the same folder (one machine)
    model = str(resolve_checkpoint(args.model)) if args.model in SYNTHETIC_MODELS else str(args.model)
    keywords = {
        "device": args.device,
        "dtype": args.dtype,
        "attention_backend": args.attention_backend,
        "quantize": quantize,
        "api_key_env": args.api_key_env,
    }
    return front, model, settings, options, keywords


def build(args: dict):
    """The application builder of a Serve config file: ``args`` holds ``glm-image serve`` flags
    by their long names (``model``, ``dit_replicas``, ``output_dir``, ...), typed as YAML types
    them (``server.cli.config_argv``)."""
    from .cli import config_argv, serve_parser

    parsed = serve_parser().parse_args(["serve", "--ray", *config_argv(args)])
    front, model, settings, options, keywords = _from_args(parsed)
    return application(front, model, settings, options, **keywords, gpus=_gpus(options, parsed.device))


def serve_with_ray(args) -> None:
    """``glm-image serve --ray``: start (or join) Ray, run the application on ``--host``/``--port``
    until SIGINT or SIGTERM, then remove it, and stop the Ray instance this command started."""
    front, model, settings, options, keywords = _from_args(args)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    ray.init(address=options.address or "local", include_dashboard=False)
    try:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # ray.init installs its own
        serve.start(http_options={"host": args.host, "port": args.port})
        app = application(front, model, settings, options, **keywords, gpus=_gpus(options, args.device))
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as e:
            raise GlmImageError(f"serve --ray: the application did not start: {e}") from None
        log.info("serving %s on Ray at http://%s:%d", args.model, args.host, args.port)
        while not stop.wait(1.0):
            pass
        log.info("stopping: removing the application and shutting Serve down")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _stage_quantize(quantize: str | None) -> str | None:
    from .workers import stage_quantize

    return stage_quantize(quantize)
