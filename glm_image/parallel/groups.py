"""The process groups of a stage's ranks: the backend of a device, the world's control group, and
the AR's tensor-parallel ``Comm`` or the DiT's CFG and Ulysses groups. Who starts the ranks
(``glm_image.stages``: rank processes or torchrun) is not this module's business.
"""

from __future__ import annotations

__all__ = ["backend", "control_group", "stage_groups"]


def backend(device) -> str:
    """The process-group backend of ``device``'s type: NCCL, HCCL or gloo."""
    if device.type == "cuda":
        return "nccl"
    if device.type == "npu":
        from ..device import npu_module

        npu_module()  # registers the hccl backend
        return "hccl"
    return "gloo"


def control_group(device, world: int, rank: int):
    """A gloo ``Comm`` over the whole world, for decisions the ranks take together on the host
    (a call's cancellation, an SPMD launch's calls and answers)."""
    import torch.distributed as dist

    from .comm import Comm

    group = dist.group.WORLD if device.type == "cpu" else dist.new_group(backend="gloo")
    return Comm(group, world, rank, range(world), None)


def stage_groups(spec, first: int, world: int, rank: int, device, stats):
    """The groups of ``spec``'s stage, whose ranks are ``first`` .. ``first + spec.size - 1`` of a
    world of ``world``: the AR's tensor-parallel ``Comm``, or the DiT's ``DitGroups`` (rank =
    first + cfg_index * sp + sp_index); None when ``rank`` is not one of them. Every rank of the
    world calls it, in the same order (creating a process group takes all of them)."""
    import torch.distributed as dist

    from .comm import Comm, DitGroups

    def comm(members: list[int]) -> Comm | None:
        if len(members) == 1:  # a group of one needs no process group (and every rank skips it)
            group = None
        else:
            group = dist.group.WORLD if len(members) == world else dist.new_group(members)
        if rank not in members:
            return None
        return Comm(group, len(members), members.index(rank), members, device, stats)

    if spec.stage == "ar":
        return comm(list(range(first, first + spec.tp)))
    sp = [comm([first + c * spec.sp + s for s in range(spec.sp)]) for c in range(spec.cfg)]
    cfg = [comm([first + c * spec.sp + s for c in range(spec.cfg)]) for s in range(spec.sp)]
    mine_sp, mine_cfg = [x for x in sp if x is not None], [x for x in cfg if x is not None]
    return DitGroups(mine_cfg[0], mine_sp[0]) if mine_sp else None
