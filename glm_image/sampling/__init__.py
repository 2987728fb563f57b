"""Pure sampling functions: AR token sampling and the DiT's flow-matching schedule."""

from .flow import FlowSchedule, euler_step, flow_schedule, guidance, image_seq_len, resolution_shift
from .seeds import MAX_SEED, image_seeds
from .tokens import (
    SamplingParams,
    apply_filters,
    draw_with_noise,
    exponential_noise,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "MAX_SEED",
    "FlowSchedule",
    "SamplingParams",
    "apply_filters",
    "draw_with_noise",
    "euler_step",
    "exponential_noise",
    "flow_schedule",
    "guidance",
    "image_seeds",
    "image_seq_len",
    "resolution_shift",
    "top_k_filter",
    "top_p_filter",
]
