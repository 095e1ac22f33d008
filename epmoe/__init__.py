"""epmoe: expert-parallel Mixture-of-Experts layers for PyTorch.

Public API::

    state = epmoe.init_distributed()            # reads torchrun's environment
    layer = epmoe.ExpertParallelMoE(epmoe.MoEConfig(hidden_size=..., ...), state)
    y = layer(x)                                 # x: this rank's tokens [T, H]
    epmoe.destroy_distributed()

    model = epmoe.from_pretrained("path/to/hf-model", state)   # transformers' model, EP blocks
"""

from .config import MoEConfig, parse_dtype
from .dispatch import Dispatcher, make_dispatcher
from .errors import InputError, PeerInputError, RankFailure
from .moe import ExpertParallelMoE, optional_weight_shapes
from .parallel_state import (
    ParallelState,
    PendingAllToAll,
    all_gather_v,
    all_to_all_v,
    all_to_all_v_start,
    destroy_distributed,
    exchange_counts,
    group_layout,
    init_distributed,
    single_process_state,
)
from .placement import ExpertMap, choose_replicas, expert_map, map_of_slots
from .rebalance import Rebalance
from .reference import (
    Comparison,
    compare_to_reference,
    full_optional_weights,
    full_weights,
    reference_moe,
)
from .router import route
from .stats import MoEStats

__all__ = [
    "Comparison",
    "compare_to_reference",
    "Dispatcher",
    "ExpertMap",
    "ExpertParallelMoE",
    "InputError",
    "MoEConfig",
    "MoEStats",
    "ParallelState",
    "PeerInputError",
    "PendingAllToAll",
    "RankFailure",
    "Rebalance",
    "all_gather_v",
    "all_to_all_v",
    "all_to_all_v_start",
    "choose_replicas",
    "destroy_distributed",
    "exchange_counts",
    "expert_map",
    "full_optional_weights",
    "from_pretrained",
    "full_weights",
    "group_layout",
    "init_distributed",
    "make_dispatcher",
    "map_of_slots",
    "optional_weight_shapes",
    "parse_dtype",
    "reference_moe",
    "route",
    "single_process_state",
]
__version__ = "0.1.0"


def from_pretrained(path, state: ParallelState, dtype=None, **kwargs):
    """Load a Hugging Face MoE model expert-parallel: see :func:`epmoe.hf.from_pretrained`.

    Needs the ``hf`` extra (``pip install -e '.[hf]'``: transformers, safetensors).
    """
    from .hf.loading import from_pretrained as load

    return load(path, state, dtype=dtype, **kwargs)
