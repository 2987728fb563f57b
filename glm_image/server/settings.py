"""Every option of ``glm-image serve``: ``ServerSettings`` (the app), ``StageOptions`` and
``RayOptions`` (what runs the engine), frozen values checked when built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import GlmImageError
from ..validation import check_guidance

__all__ = ["RayOptions", "ServerSettings", "StageOptions", "parse_replicas"]


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


@dataclass(frozen=True)
class StageOptions:
    """``--stages separate``: the AR and the DiT in two worker processes, overlapped."""

    ar_device: str | None = None  # None: the server's --device
    dit_device: str | None = None
    # CPU threads of each worker; None: torch's default (on a CPU: the cores split between the two)
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise GlmImageError(f"--stage-threads {self.threads!r}; allowed: an integer >= 1")


def parse_replicas(text: str, flag: str) -> tuple[int, int]:
    """'2' -> (2, 2): a fixed count; '1-4' -> (1, 4): autoscaled between the two."""
    low, dash, high = str(text).partition("-")
    try:
        bounds = (int(low), int(high) if dash else int(low))
    except ValueError:
        bounds = (0, 0)
    if not 1 <= bounds[0] <= bounds[1]:
        raise GlmImageError(
            f"{flag} {text!r}; allowed: N (a fixed count >= 1) or MIN-MAX (autoscaled, 1 <= MIN <= MAX)"
        )
    return bounds


@dataclass(frozen=True)
class RayOptions:
    """``--ray``: the app on Ray Serve; the AR and the DiT as deployments of their own."""

    address: str | None = None  # None: start a local Ray instance; "auto": the running cluster
    ar_replicas: tuple[int, int] = (1, 1)  # (min, max): equal is a fixed count, else autoscaled
    dit_replicas: tuple[int, int] = (1, 1)
    # GPUs per replica (Ray's num_gpus). None: each replica's ranks when the cluster has GPUs and
    # --device is not cpu (a GPU per rank), else 0 (the ranks are CPU processes).
    ar_gpus: float | None = None
    dit_gpus: float | None = None
    ar_cpus: float = 1.0  # CPUs Ray reserves per replica
    dit_cpus: float = 1.0
    # Each replica's ranks: AR tensor-parallel ranks, DiT CFG ranks (1 or 2) x Ulysses ranks; a
    # replica of several ranks runs its stage on rank processes of its own (``stages.ProcessStage``)
    ar_tp: int = 1
    dit_cfg: int = 1
    dit_sp: int = 1

    @property
    def ranks(self) -> tuple[int, int]:
        """(AR ranks, DiT ranks) per replica."""
        return self.ar_tp, self.dit_cfg * self.dit_sp

    def __post_init__(self) -> None:
        for name in ("ar_gpus", "dit_gpus", "ar_cpus", "dit_cpus"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise GlmImageError(f"--{name.replace('_', '-')} {value!r}; allowed: a number >= 0")
        if self.dit_cfg not in (1, 2):
            raise GlmImageError(f"DiT CFG ranks = {self.dit_cfg!r}; allowed: 1 or 2")
        for stage, ranks in zip(("ar", "dit"), self.ranks, strict=True):
            gpus = getattr(self, f"{stage}_gpus")
            if gpus is not None and gpus > 0 and (gpus > 1 or ranks > 1) and gpus != ranks:
                raise GlmImageError(
                    f"--{stage}-gpus {gpus:g} with {ranks} rank(s) per {stage.upper() if stage == 'ar' else 'DiT'} "
                    f"replica: each rank runs on a GPU of its own; allowed: --{stage}-gpus {ranks}, or 0 "
                    "(the ranks on the CPU)"
                )
