"""Every option of ``glm-image serve``, as one frozen value the app is built from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import GlmImageError
from ..validation import check_guidance

__all__ = ["ServerSettings"]


@dataclass(frozen=True)
class ServerSettings:
    """How the server behaves; the model itself is passed to ``create_app`` already loaded."""

    output_dir: Path = Path("glm-image-files")
    # Jobs waiting for the engine (the running batch not counted); one more gets 429.
    max_queue: int = 32
    # Images per engine call when same-size requests are batched (a request with more runs alone).
    max_batch: int = 4
    # Seconds from arrival to result. Past it: 504, and the request leaves the queue (or its engine
    # call stops at the next step, once no request in it is still waited for).
    timeout: float = 600.0
    # Bearer token every endpoint but /health and /files/ requires; None: no auth.
    api_key: str | None = None
    # Model names the endpoints accept besides "glm-image" (the name the server was started with).
    model_names: tuple[str, ...] = ()
    steps: int = 50  # defaults for requests that do not set them
    guidance: float = 1.5
    # A request may ask for at most this many steps: an engine call cannot be preempted by
    # another request, so one huge request would hold every other client.
    max_steps: int = 200
    # Base of the returned file URLs (behind a proxy); None: the address the client used.
    public_url: str | None = None
    max_upload_bytes: int = 32 * 1024 * 1024  # per condition image on /v1/images/edits

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_batch", "steps", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise GlmImageError(f"{name} = {value!r}; allowed: an integer >= 1")
        if self.steps > self.max_steps:
            raise GlmImageError(f"steps = {self.steps}; allowed: 1..{self.max_steps} (max_steps)")
        if not self.timeout > 0:
            raise GlmImageError(f"timeout = {self.timeout!r}; allowed: seconds > 0")
        check_guidance(self.guidance, "guidance")
        if self.api_key is not None and not self.api_key.strip():
            raise GlmImageError("api key: empty; allowed: a non-empty string, or no key (no auth)")
