"""How a generation is spread over several devices, checked before any weights load.

``ParallelConfig`` holds the user's choice (``GlmImage.from_pretrained(ar_tp=, dit_cfg_parallel=,
dit_sp=, placement=)``, ``--ar-tp``, ``--dit-cfg-parallel``, ``--dit-sp``, ``--placement``):

- ``ar_tp``: tensor-parallel ranks of the AR decoder;
- ``dit_cfg_parallel``: the DiT's conditional and unconditional branches on two ranks;
- ``dit_sp``: Ulysses sequence-parallel ranks per DiT branch (``cfg x sp`` DiT ranks in all);
- ``placement``: ``same`` (the AR's ranks and the DiT's use the same devices, from the first
  one) or ``separate`` (the DiT's ranks on the devices after the AR's; with the stages
  overlapped in ``serve``, one request's AR runs while another's DiT runs).

A stage with one rank runs in the calling process, as without this package. On a CPU the ranks are
processes (no device count to respect); on CUDA and Ascend every rank has its own device.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GlmImageError

__all__ = ["PLACEMENTS", "ParallelConfig"]

PLACEMENTS = ("same", "separate")


@dataclass(frozen=True)
class ParallelConfig:
    ar_tp: int = 1
    dit_cfg_parallel: bool = False
    dit_sp: int = 1
    placement: str = "same"

    @property
    def dit_cfg(self) -> int:
        return 2 if self.dit_cfg_parallel else 1

    @property
    def dit_ranks(self) -> int:
        return self.dit_cfg * self.dit_sp

    @property
    def enabled(self) -> bool:
        """True when either stage runs on several ranks."""
        return self.ar_tp > 1 or self.dit_ranks > 1

    @property
    def spread(self) -> bool:
        """True when the stages do not simply share one device: several ranks, or separate devices."""
        return self.enabled or self.placement == "separate"

    def describe(self) -> str:
        parts = []
        if self.ar_tp > 1:
            parts.append(f"AR tensor parallel x{self.ar_tp}")
        if self.dit_ranks > 1:
            dit = [f"CFG x{self.dit_cfg}"] if self.dit_cfg > 1 else []
            dit += [f"Ulysses SP x{self.dit_sp}"] if self.dit_sp > 1 else []
            parts.append("DiT " + " and ".join(dit))
        if not parts:
            return "one device" if self.placement == "same" else "AR and DiT on separate devices"
        return ", ".join(parts) + f" (placement: {self.placement})"

    def check(self, config=None, device=None) -> None:
        """Raise a ``GlmImageError`` naming the field when this cannot run: bad values, sizes
        that do not split the models of ``config`` (a ``CheckpointConfig``), more ranks than
        ``device``'s type has devices. Reads config files and counts devices; loads nothing."""
        for name in ("ar_tp", "dit_sp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GlmImageError(f"{name} = {value!r}; allowed: an integer >= 1")
        if not isinstance(self.dit_cfg_parallel, bool):
            raise GlmImageError(f"dit_cfg_parallel = {self.dit_cfg_parallel!r}; allowed: true or false")
        if self.placement not in PLACEMENTS:
            raise GlmImageError(f"placement = {self.placement!r}; allowed: {', '.join(PLACEMENTS)}")
        if config is not None:
            from .layout import check_sp, check_tp

            check_tp(self.ar_tp, config.ar.text)
            check_sp(self.dit_sp, config.dit.num_attention_heads)
        if device is not None:
            self.devices(device)

    def devices(self, device) -> tuple[list[str], list[str]]:
        """The device of each AR rank and of each DiT rank, from ``device`` (a ``torch.device``:
        its index, or 0, is the first); an error when the machine has too few."""
        import torch

        device = torch.device(device)
        if device.type == "cpu":
            return ["cpu"] * self.ar_tp, ["cpu"] * self.dit_ranks
        first = device.index or 0
        ar = list(range(first, first + self.ar_tp))
        start = first + self.ar_tp if self.placement == "separate" else first
        dit = list(range(start, start + self.dit_ranks))
        needed = max(ar + dit) + 1
        count = _device_count(device.type)
        if needed > count:
            how = (
                f"{self.ar_tp} AR + {self.dit_ranks} DiT ranks on separate devices"
                if self.placement == "separate"
                else f"max({self.ar_tp} AR, {self.dit_ranks} DiT) ranks"
            )
            raise GlmImageError(
                f"{self.describe()}: {how} from {device.type}:{first} need {needed - first} devices, "
                f"but this machine has {count} {device.type} device(s); allowed: fewer ranks, "
                "placement 'same', or a lower first device"
            )
        return [f"{device.type}:{i}" for i in ar], [f"{device.type}:{i}" for i in dit]

    def check_size(self, height: int, width: int, patch: int = 16) -> None:
        """Ulysses splits the image tokens evenly: (height/16) * (width/16) must divide by dit_sp."""
        tokens = (height // patch) * (width // patch)
        if tokens % self.dit_sp:
            raise GlmImageError(
                f"size {width}x{height}: its {tokens} image tokens do not split over dit_sp = {self.dit_sp} "
                f"ranks; allowed: sizes whose (height/16) * (width/16) is a multiple of {self.dit_sp}"
            )


def _device_count(kind: str) -> int:
    import torch

    if kind == "cuda":
        return torch.cuda.device_count()
    if kind == "npu":
        from ..device import npu_module

        return torch.npu.device_count() if npu_module() is not None else 0
    return 0
