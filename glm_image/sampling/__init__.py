"""Pure sampling functions: token sampling for the AR stage (flow matching joins with the DiT)."""

from .tokens import SamplingParams, apply_filters, draw, greedy, top_k_filter, top_p_filter

__all__ = ["SamplingParams", "apply_filters", "draw", "greedy", "top_k_filter", "top_p_filter"]
