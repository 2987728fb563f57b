"""`glm-image serve`: arguments here; FastAPI and uvicorn are imported only when it runs."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..errors import GlmImageError
from ..options import add_generation_arguments, add_runtime_arguments, generation_kwargs, runtime_kwargs

__all__ = ["add_parser", "settings_from_args"]

log = logging.getLogger("glm_image.server")


def add_parser(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="HTTP server: bigmodel and OpenAI image APIs",
        description="Serve the bigmodel (POST /api/paas/v4/images/generations) and OpenAI "
        "(POST /v1/images/generations, /v1/images/edits) image APIs, plus /health, /metrics and "
        "/files/<id>.png. The model loads once, before the server listens.",
    )
    serve.add_argument(
        "--model", default="tiny", help="tiny | wide | a checkpoint folder | a Hugging Face id"
    )
    add_runtime_arguments(serve)
    add_generation_arguments(serve)
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
    serve.set_defaults(func=_run)


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


def _run(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from .app import create_app
        from .files import FileStore
    except ImportError as e:
        raise GlmImageError(f'serve: {e.name} is not installed; pip install "glm-image[serve]"') from None

    from ..pipeline import GlmImage

    settings = settings_from_args(args)
    FileStore(settings.output_dir)  # a bad --output-dir fails now, not after the model loads
    pipe = GlmImage.from_pretrained(args.model, **runtime_kwargs(args), **generation_kwargs(args))
    app = create_app(pipe, settings)
    for name in ("glm_image.server", "uvicorn.error"):
        logging.getLogger(name).setLevel(logging.INFO)
    if settings.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s with no API key: anyone who can reach it can generate", args.host)
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)
