"""epmoe: expert-parallel Mixture-of-Experts layers for PyTorch.

Public API::

    state = epmoe.init_distributed()            # reads torchrun's environment
    layer = epmoe.ExpertParallelMoE(epmoe.MoEConfig(hidden_size=..., ...), state)
    y = layer(x)                                 # x: this rank's tokens [T, H]
    epmoe.destroy_distributed()
"""

from .config import MoEConfig, parse_dtype
from .dispatch import DispatchHandle, combine, dispatch
from .moe import ExpertParallelMoE
from .parallel_state import (
    ParallelState,
    all_gather_v,
    all_to_all_v,
    destroy_distributed,
    exchange_counts,
    group_layout,
    init_distributed,
    single_process_state,
)
from .placement import ExpertMap, expert_map
from .reference import Comparison, compare_to_reference, full_weights, reference_moe
from .router import route
from .stats import MoEStats

__all__ = [
    "Comparison",
    "compare_to_reference",
    "DispatchHandle",
    "ExpertMap",
    "ExpertParallelMoE",
    "MoEConfig",
    "MoEStats",
    "ParallelState",
    "all_gather_v",
    "all_to_all_v",
    "combine",
    "destroy_distributed",
    "dispatch",
    "exchange_counts",
    "expert_map",
    "full_weights",
    "group_layout",
    "init_distributed",
    "parse_dtype",
    "reference_moe",
    "route",
    "single_process_state",
]
__version__ = "0.1.0"
