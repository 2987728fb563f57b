"""`glm-image serve --ray`: the same FastAPI app on Ray Serve, the AR and the DiT scaled apart.

Three deployments make one Serve application:

- ``Ingress``: our FastAPI app (``create_app``: both API shapes, auth, metrics, the same errors,
  the same bounded queue and batching), built in its replica by ``__serve_build_asgi_app__``,
  with a ``StagedExecutor`` whose stages are the two deployments below. It loads no weights; it
  writes the PNGs to ``--output-dir`` and serves them (one replica, so every URL it returns is
  served by the replica that wrote the file).
- ``ArStage`` and ``DitStage``: one stage handle each per replica (``stages.open_stage``),
  ``max_ongoing_requests=1``, their own replica counts (fixed, or autoscaled between a minimum
  and a maximum), CPUs and GPUs per replica. A replica of one rank loads its engine itself; a
  replica of G ranks (``--ar-tp``, ``--dit-cfg-parallel``/``--dit-sp``, or ``--ar-gpus G`` /
  ``--dit-gpus G``) runs its stage on G rank processes of its own (``stages.ProcessStage``: AR
  tensor parallel, DiT CFG/Ulysses), one per GPU Ray gave it, or on its CPUs over gloo with
  ``num_gpus`` 0. Only an ``ArCall`` goes to the AR, only ``PriorTokens`` (token ids,
  condition codes) from it to the DiT; images come back to the ingress.
- The ingress holds each deployment as a ``RayStage`` (a ``StageHandle``) in the executor's
  ``HandleRunner``, as the other servers hold theirs.

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
from .executors import HandleRunner, ModelFront, StagedExecutor
from .settings import RayOptions, ServerSettings
from .workers import hold_adapters_on

__all__ = ["APP_NAME", "RayStage", "application", "build", "serve_with_ray"]

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


def _rank_devices(spec: StageSpec) -> list:
    """A replica's device per rank: its one device (``spec.device``) for one rank; for several,
    ``cpu`` each on a CPU, else the GPUs Ray gave the replica (it sets ``CUDA_VISIBLE_DEVICES``,
    so they count from 0), as ``ParallelConfig.devices`` numbers them."""
    if spec.size == 1:
        return [spec.device]
    import torch

    from ..device import resolve_device
    from ..parallel.config import ParallelConfig

    kind = torch.device(resolve_device(spec.device).type)
    ar, dit = ParallelConfig(spec.tp, spec.cfg == 2, spec.sp).devices(kind)
    return ar if spec.stage == "ar" else dit


class _StageReplica:
    """One stage handle (``stages.open_stage``): the engine loaded here for a replica of one rank,
    else rank processes of its own, one per GPU Ray gave it (or CPU ranks over gloo); one call at
    a time. Serve's health check fails a replica whose ranks died, and Serve replaces it."""

    stage = ""

    def __init__(self, spec: StageSpec) -> None:
        _log_like_serve()
        self.handle = open_stage(spec, _rank_devices(spec))

    def __del__(self) -> None:  # Serve calls it when it stops the replica: the ranks stop first
        handle = getattr(self, "handle", None)
        if handle is not None:
            handle.close()

    def check_health(self) -> None:
        if self.handle.broken is not None:
            raise RuntimeError(f"the {self.stage} replica cannot run calls: {self.handle.broken}")

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


class RayStage:
    """A stage as a Serve deployment: the ``StageHandle`` of its ``DeploymentHandle``. A call
    goes to one replica (Serve picks it); a replica lost during the call (died, unreachable) gets
    the call once more, and a second loss is ``StageDied``. A replica reports no steps: while the
    call runs, ``progress(stage, 0, 0)`` is called every ``POLL_SECONDS`` (nothing known done),
    and when it raises the call is cancelled in its replica. Serve replaces lost replicas, so
    the handle is never ``broken``; ``close`` leaves the replicas to the application."""

    broken = None

    def __init__(self, stage: str, deployment) -> None:
        self.stage, self.deployment = stage, deployment
        self.retries = 0  # calls sent again after their replica was lost

    def close(self) -> None:
        """Serve stops the replicas with the application."""

    def to(self, device) -> None:
        """The replicas stay on their devices."""

    def describe(self) -> dict:
        return {"handle": "ray", "deployment": self.deployment.deployment_name, "retries": self.retries}

    def run(self, call, progress=None):
        try:
            return self._once(call, progress)
        except REPLICA_LOST as e:
            self.retries += 1
            log.warning(
                "a %s replica was lost during a call (%s); sending it again", self.stage, type(e).__name__
            )
        try:
            return self._once(call, progress)
        except REPLICA_LOST as e:
            raise StageDied(
                f"a {self.stage} replica was lost while it ran this request, twice ({type(e).__name__}); "
                "Serve is replacing it"
            ) from e

    def _once(self, call, progress):
        response = self.deployment.run.remote(call)
        while True:
            try:
                return response.result(timeout_s=POLL_SECONDS)
            except RayTaskError as e:  # raised by our code in the replica: keep its kind
                cause = getattr(e, "cause", None)
                if isinstance(cause, (GlmImageError, Cancelled)):
                    raise cause from None
                raise RuntimeError(f"the {self.stage} replica failed:\n{e}") from None
            except TimeoutError:  # not yet: is it still wanted?
                pass
            if progress is not None:
                try:
                    progress(self.stage, 0, 0)
                except BaseException:
                    response.cancel()
                    raise


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
        front.parallel = config["parallel"]  # each replica's ranks: the size rule, the PNGs' text
        ar, dit = (
            HandleRunner(stage, RayStage(stage, deployment), slots=slots)
            for stage, deployment, slots in zip(
                ("ar", "dit"), (self.ar, self.dit), config["slots"], strict=True
            )
        )
        executor = StagedExecutor(front, ar, dit, name="ray")
        named, fixed = config["lora"]
        if named or fixed:  # checked on one replica of each stage at start; the others read them at a call
            hold_adapters_on(executor, (ar, dit), named, fixed)
        front.lora_scales = {name: scale for name, _, scale in named}
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
    lora: tuple = ((), ()),
):
    """The Serve application: ``Ingress`` bound to the two stage deployments. ``model`` is what
    every stage replica loads (a path each node can read, or a hub id); ``gpus``: per replica;
    ``options`` also says each replica's ranks (``RayOptions.ranks``); ``lora``: (named, unnamed)
    adapters as ``server.arguments.checked_loras`` gives them (paths every node can read)."""
    common = (model, device, dtype, attention_backend, quantize)
    ar = ArStage.options(**_stage_options(options.ar_replicas, options.ar_cpus, gpus[0])).bind(
        StageSpec("ar", *common, tp=options.ar_tp)
    )
    dit = DitStage.options(**_stage_options(options.dit_replicas, options.dit_cpus, gpus[1])).bind(
        StageSpec("dit", *common, cfg=options.dit_cfg, sp=options.dit_sp)
    )
    config = {
        "settings": dataclasses.replace(settings, api_key=None),
        "api_key_env": api_key_env,
        "name": front.name,
        "limits": front.limits,
        "decoding": (front.ar_decoding, front.jacobi_window, front.dit_cache, front.quantize),
        "parallel": front.parallel,
        "jacobi": front.jacobi.kwargs(),
        # a batch enters a stage when one of its replicas can take it (the most, when autoscaled)
        "slots": (options.ar_replicas[1], options.dit_replicas[1]),
        "lora": (tuple(lora[0]), tuple(lora[1])),
    }
    return Ingress.bind(ar, dit, config)


def _gpus(options: RayOptions, device: str | None) -> tuple[float, float]:
    """GPUs per replica: as given, else one per rank when the cluster has GPUs and the device is
    not cpu, else 0 (a replica's ranks are then CPU processes)."""
    on_gpus = False
    unset = options.ar_gpus is None or options.dit_gpus is None
    if unset and (device is None or not str(device).startswith("cpu")):
        on_gpus = ray.cluster_resources().get("GPU", 0) > 0
    given = (options.ar_gpus, options.dit_gpus)
    return tuple(
        float(g) if g is not None else float(ranks) if on_gpus else 0.0
        for g, ranks in zip(given, options.ranks, strict=True)
    )


def _from_args(args) -> tuple:
    """(front, settings, options, application keywords) of parsed ``serve`` flags."""
    from ..config.checkpoint import CheckpointConfig
    from ..hub import SYNTHETIC_MODELS, resolve_checkpoint
    from ..options import generation_kwargs
    from ..parallel.config import ParallelConfig
    from .arguments import checked_loras, ray_options_from_args, settings_from_args

    settings = settings_from_args(args)
    options = ray_options_from_args(args) or RayOptions()
    quantize = _stage_quantize(args.quantize)
    front = ModelFront.from_checkpoint(args.model, quantize=quantize or "none", **generation_kwargs(args))
    # each replica's ranks: checked against the model here, and the sizes Ulysses splits per request
    front.parallel = ParallelConfig(options.ar_tp, options.dit_cfg == 2, options.dit_sp)
    front.parallel.check(CheckpointConfig.from_dir(resolve_checkpoint(args.model)))
    # a preset is built here once; every replica then reads the same folder (one machine)
    model = str(resolve_checkpoint(args.model)) if args.model in SYNTHETIC_MODELS else str(args.model)
    keywords = {
        "device": args.device,
        "dtype": args.dtype,
        "attention_backend": args.attention_backend,
        "quantize": quantize,
        "api_key_env": args.api_key_env,
        "lora": checked_loras(args),
    }
    return front, model, settings, options, keywords


def build(args: dict):
    """The application builder of a Serve config file: ``args`` holds ``glm-image serve`` flags
    by their long names (``model``, ``dit_replicas``, ``output_dir``, ...), typed as YAML types
    them (``server.arguments.config_argv``)."""
    from .arguments import config_argv, serve_parser

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
