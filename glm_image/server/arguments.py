"""What `glm-image serve` accepts: its flags, a Serve config's typed values as flags, and parsed
flags turned into settings and stage or Ray options. ``server.cli`` (running the server) and
``server.ray_app`` (a Serve config's builder) both read flags through here; neither imports the
other's module at its top."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import GlmImageError
from ..options import (
    add_generation_arguments,
    add_lora_arguments,
    add_parallel_arguments,
    add_runtime_arguments,
    lora_kwargs,
    named_loras,
    parallel_config,
)

__all__ = [
    "add_serve_arguments",
    "checked_loras",
    "config_argv",
    "ray_options_from_args",
    "serve_parser",
    "settings_from_args",
    "stage_options_from_args",
]


def serve_parser() -> argparse.ArgumentParser:
    """A parser of ``glm-image serve``'s flags alone (a Serve config's ``args``, see ``config_argv``)."""
    parser = argparse.ArgumentParser(prog="glm-image")
    add_serve_arguments(parser.add_subparsers(dest="command", required=True).add_parser("serve"))
    return parser


# serve's flags that repeat, one value each (argparse ``append``)
REPEATED = frozenset({"lora"})


def config_argv(args: dict) -> list[str]:
    """``glm-image serve`` arguments of a Serve config's ``args`` (YAML values, typed): ``true`` is
    the bare flag and ``false`` leaves it out (``dit_cache_taylor: true``), a list gives its
    values one after another (the flag once per value for a repeated flag: ``lora``), a number
    or a string is the flag's value."""
    argv = []
    for key, value in (args or {}).items():
        flag = f"--{str(key).replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list | tuple) and key in REPEATED:
            for v in value:  # a flag given once per value (``lora: [a=x, b=y]``)
                argv += [flag, str(v)]
        elif isinstance(value, list | tuple):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """The flags of ``glm-image serve`` on ``serve``."""
    serve.add_argument(
        "--model",
        default="tiny",
        help="tiny | wide | glm-image-random | a checkpoint folder | a Hugging Face id",
    )
    add_runtime_arguments(serve)
    add_generation_arguments(serve)
    add_parallel_arguments(serve)
    add_lora_arguments(serve, named=True)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--output-dir",
        default="glm-image-files",
        help="where generated PNGs are written (default ./glm-image-files)",
    )
    serve.add_argument(
        "--max-queue", type=int, default=32, help="requests that may wait; one more gets 429 (default 32)"
    )
    serve.add_argument(
        "--max-batch",
        type=int,
        default=4,
        help="images per engine call when batching same-size requests (default 4)",
    )
    serve.add_argument(
        "--batching",
        choices=("auto", "continuous", "static"),
        default="static",
        help="continuous: requests join and leave the running AR decode between iterations, each "
        "image its solo image (docs/continuous-batching.md; no block offload yet); static "
        "(default): same-size requests share one engine call that runs to its end; auto: "
        "continuous where the AR runs on one device, in the server process or a --stages "
        "separate worker, and nothing above rules it out, else static",
    )
    serve.add_argument(
        "--max-rows",
        type=int,
        default=16,
        help="continuous batching: images the AR decodes at once; more wait (default 16)",
    )
    serve.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds a request may take, queue included; then 504 (default 600)",
    )
    serve.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require 'Authorization: Bearer <key>', the key read from environment variable VAR (/health stays open)",
    )
    serve.add_argument(
        "--steps", type=int, default=50, help="denoising steps when a request sets none (default 50)"
    )
    serve.add_argument(
        "--guidance", type=float, default=1.5, help="guidance when a request sets none (default 1.5)"
    )
    serve.add_argument(
        "--max-steps", type=int, default=200, help="most steps a request may ask for (default 200)"
    )
    serve.add_argument(
        "--public-url",
        help="base of the returned file URLs, e.g. behind a proxy (default: the address the client used)",
    )
    stages = serve.add_argument_group(
        "stages", "where the AR and the DiT run (default: both in the server process, one call at a time)"
    )
    stages.add_argument(
        "--stages",
        choices=("together", "separate"),
        default="together",
        help="separate: the AR and the DiT in two worker processes, so one request's AR runs while "
        "another's DiT runs; only token ids cross between them (default together)",
    )
    stages.add_argument(
        "--ar-device", metavar="DEV", help="with --stages separate: the AR's device, e.g. cuda:0"
    )
    stages.add_argument(
        "--dit-device", metavar="DEV", help="with --stages separate: the DiT's device, e.g. cuda:1"
    )
    stages.add_argument(
        "--stage-threads",
        type=int,
        metavar="N",
        help="with --stages separate: CPU threads per worker (default: on a CPU, the cores split between the two)",
    )
    ray = serve.add_argument_group(
        "ray",
        'Ray Serve (pip install "glm-image[ray]"): the same API, the AR and the DiT scaled separately; '
        "--ar-tp, --dit-cfg-parallel and --dit-sp say each replica's ranks",
    )
    ray.add_argument(
        "--ray", action="store_true", help="serve on Ray Serve (see deploy/ for a cluster config)"
    )
    ray.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="a running Ray cluster (auto, or ray://host:10001); default: start a local Ray instance",
    )
    for stage in ("ar", "dit"):
        name = stage.upper() if stage == "ar" else "DiT"
        ray.add_argument(
            f"--{stage}-replicas",
            default="1",
            metavar="N|MIN-MAX",
            help=f"{name} replicas: a fixed count, or MIN-MAX to autoscale (default 1)",
        )
        if stage == "ar":
            ranks, flags = "tensor parallel, as --ar-tp G", "--ar-tp"
        else:
            ranks = "as --dit-cfg-parallel/--dit-sp say, else CFG x2 with G/2 Ulysses ranks each; G odd: Ulysses xG"
            flags = "--dit-cfg-parallel/--dit-sp"
        ray.add_argument(
            f"--{stage}-gpus",
            type=float,
            metavar="G",
            help=f"GPUs per {name} replica: at most 1 for a replica of one rank, or a whole G: the replica "
            f"runs its stage on G rank processes, one per GPU ({ranks}); 0: the ranks {flags} give run on "
            "the replica's CPUs over gloo (default: a GPU per rank on a cluster with GPUs, else 0)",
        )
        ray.add_argument(
            f"--{stage}-cpus",
            type=float,
            default=1.0,
            metavar="C",
            help=f"CPUs per {name} replica (default 1)",
        )


def settings_from_args(args: argparse.Namespace):
    """The server's settings; a missing key variable or a bad value is a one-line error."""
    from .settings import ServerSettings

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env, "")
        if not api_key.strip():
            raise GlmImageError(
                f"--api-key-env {args.api_key_env}: that environment variable is not set or empty"
            )
    if not 0 <= args.port <= 65535:
        raise GlmImageError(f"--port {args.port}; allowed: 0..65535")
    return ServerSettings(
        output_dir=Path(args.output_dir),
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        timeout=args.timeout,
        api_key=api_key,
        model_names=(args.model,),
        steps=args.steps,
        guidance=args.guidance,
        max_steps=args.max_steps,
        public_url=args.public_url,
    )


def stage_options_from_args(args: argparse.Namespace):
    """``--stages separate`` and its devices; a stage flag without it is a one-line error."""
    from .settings import StageOptions

    given = [flag for flag in ("ar_device", "dit_device", "stage_threads") if getattr(args, flag) is not None]
    if args.stages != "separate":
        if given:
            raise GlmImageError(f"--{given[0].replace('_', '-')} needs --stages separate")
        return None
    _single_device_stages(args, "--stages separate")
    if args.residency not in (None, "resident"):  # each worker holds its stage on its own device
        raise GlmImageError(
            f"--residency {args.residency}: with --stages separate each stage stays on its own "
            "device; allowed: resident or none"
        )
    if args.max_memory is not None:  # the workers load their stage whole: nothing is planned
        raise GlmImageError(
            f"--max-memory {args.max_memory}: with --stages separate each worker loads its stage "
            "whole on its own device and plans nothing; allowed: drop it, or serve without "
            "--stages separate (--placement separate plans the memory of both devices)"
        )
    if args.ray:
        raise GlmImageError(
            "--stages separate and --ray: Ray always runs the stages as separate deployments; pick one"
        )
    return StageOptions(args.ar_device, args.dit_device, args.stage_threads)


def _single_device_stages(args: argparse.Namespace, mode: str) -> None:
    """Worker processes of one device per stage (``--stages separate``) do not take the
    several-device flags: those run in the one-process server, whose stages spawn their ranks
    (or in each Ray replica, ``--ray``)."""
    parallel = parallel_config(args)
    if parallel.spread:
        raise GlmImageError(
            f"{mode} runs each stage in one worker on one device, so it cannot take {parallel.describe()}; "
            "allowed: drop the flag, or serve without it (the server's stages then run on their ranks, "
            "--placement separate puts the DiT's on devices of its own)"
        )


def ray_options_from_args(args: argparse.Namespace):
    """``--ray`` and its replica counts and resources; a Ray flag without ``--ray`` is an error."""
    from .settings import RayOptions, parse_replicas

    defaults = {"ar_replicas": "1", "dit_replicas": "1", "ar_cpus": 1.0, "dit_cpus": 1.0}
    flags = ("ray_address", "ar_gpus", "dit_gpus", *defaults)
    given = [f for f in flags if getattr(args, f) is not None and getattr(args, f) != defaults.get(f)]
    if not args.ray:
        if given:
            raise GlmImageError(f"--{given[0].replace('_', '-')} needs --ray")
        return None
    if args.batching == "continuous":  # a replica's calls go to any replica: no scheduler state to keep
        raise GlmImageError(
            "--batching continuous drives the AR in the server process or a --stages separate "
            "worker; with --ray use --batching static (or auto)"
        )
    ar_tp, dit_cfg, dit_sp = _replica_ranks(args)
    return RayOptions(
        address=args.ray_address,
        ar_replicas=parse_replicas(args.ar_replicas, "--ar-replicas"),
        dit_replicas=parse_replicas(args.dit_replicas, "--dit-replicas"),
        ar_gpus=args.ar_gpus,
        dit_gpus=args.dit_gpus,
        ar_cpus=args.ar_cpus,
        dit_cpus=args.dit_cpus,
        ar_tp=ar_tp,
        dit_cfg=dit_cfg,
        dit_sp=dit_sp,
    )


def _replica_ranks(args: argparse.Namespace) -> tuple[int, int, int]:
    """(AR tp, DiT cfg, DiT sp) of each Ray replica: ``--ar-tp``, ``--dit-cfg-parallel`` and
    ``--dit-sp`` as given, or, when only ``--{stage}-gpus G`` (G > 1) is, a rank per GPU: the AR
    tensor parallel over G, the DiT's two CFG branches apart and G/2 Ulysses ranks each (G even)
    or G Ulysses ranks (G odd). ``RayOptions`` checks that GPUs and ranks agree."""
    parallel = parallel_config(args)
    if parallel.placement != "same":
        raise GlmImageError(
            "--placement separate with --ray: a Ray replica holds one stage, its ranks on its own "
            "GPUs; allowed: same (the default)"
        )
    ar_tp, dit_cfg, dit_sp = parallel.ar_tp, parallel.dit_cfg, parallel.dit_sp
    for stage in ("ar", "dit"):
        gpus = getattr(args, f"{stage}_gpus")
        if gpus is not None and gpus > 1 and gpus != int(gpus):
            raise GlmImageError(
                f"--{stage}-gpus {gpus:g}; allowed: at most 1 (a replica of one rank), or a whole "
                "number, one rank per GPU"
            )
    if args.ar_gpus is not None and args.ar_gpus > 1 and ar_tp == 1:
        ar_tp = int(args.ar_gpus)
    if args.dit_gpus is not None and args.dit_gpus > 1 and dit_cfg * dit_sp == 1:
        gpus = int(args.dit_gpus)
        dit_cfg = 2 if gpus % 2 == 0 else 1
        dit_sp = gpus // dit_cfg
    return ar_tp, dit_cfg, dit_sp


def checked_loras(args: argparse.Namespace) -> tuple[list[tuple[str, str, float]], list[tuple[str, float]]]:
    """``--lora``: the named adapters (name, path, scale) and the unnamed ones (path, scale), each
    path absolute (a stage worker or a Ray replica reads it from its own folder), every file
    read, so a bad flag or adapter fails before any model loads."""
    from ..lora import read_adapters

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    named = [(name, absolute(path), scale) for name, path, scale in named_loras(args)]
    fixed = [(absolute(path), scale) for path, scale in lora_kwargs(args)["lora"]]
    for path in [p for _, p, _ in named] + [p for p, _ in fixed]:
        read_adapters(path)
    return named, fixed
