"""The HTTP server (`glm-image serve`): the bigmodel and OpenAI image APIs over one engine queue.

``create_app(pipe, settings)`` builds the FastAPI app from a loaded ``GlmImage``. It is imported
lazily so that ``glm-image generate`` never needs the ``serve`` extra (FastAPI, uvicorn).

- ``settings``: ``ServerSettings``, every option of ``glm-image serve`` (no FastAPI import);
- ``app``: the routes, auth and request logging; thin: request -> ``GenerationRequest`` -> queue;
- ``jobs``: the bounded queue, which batches same-size requests and pushes each batch through
  the executor's stages;
- ``executors``: what runs the engine calls: in this process (default), or the AR and the DiT as
  two overlapped stages, each a stage handle (``glm_image.stages``) on a ``HandleRunner``
  (``workers``: a stage in a worker process; ``ray_app``: the stages as Ray Serve deployments
  behind this same app, ``--ray``);
- ``schemas``, ``errors``: request bodies and the two error styles (bigmodel, OpenAI);
- ``files``: PNG encoding and atomic, random-id files; ``metrics``: Prometheus text;
- ``runner``: uvicorn in a background thread (tests, the load benchmark).
"""

from __future__ import annotations

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
