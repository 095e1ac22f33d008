"""transformers 5's own Mixtral MoE block, as a peer for epmoe's benchmarks.

Two builders, both taking FULL weights in nn.Linear orientation::

    weights["router_weight"]  [E, H]
    weights["w_gate"]         [E, F, H]
    weights["w_up"]           [E, F, H]
    weights["w_down"]         [E, H, F]

* ``make_transformers_block``: ``MixtralSparseMoeBlock`` on one process. The experts
  implementation is chosen the way transformers 5 chooses it: the
  ``@use_experts_implementation`` decorator on ``MixtralExperts`` reads
  ``config._experts_implementation`` at every forward (``"eager"`` = the class's own
  per-expert loop, ``"grouped_mm"`` = ``integrations.moe.grouped_mm_experts_forward``,
  which on CPU with torch > 2.10 calls ``torch.nn.functional.grouped_mm``). A
  standalone block has ``None`` there (silently eager, with a warning), while
  ``from_pretrained`` resolves ``None`` to ``"grouped_mm"``; here it is set explicitly
  through ``MixtralConfig(experts_implementation=...)``.

* ``make_transformers_ep``: transformers' own expert parallelism on the block:
  ``transformers.distributed.expert_parallel.apply_expert_parallelism`` with Mixtral's
  ``base_model_ep_plan`` rules (``experts.gate_up_proj`` / ``experts.down_proj``:
  ``"grouped_gemm"`` = ``MoEParamShard(Shard(0))``; ``experts``:
  ``"ep_dispatch_experts"``) and ``ep_implementation="all_to_all"`` (``AllToAllEP``),
  on the meshes ``initialize_distributed_mesh`` builds for
  ``DistributedConfig(fsdp_size=world, tp_size=1, ep_size=world)``. That is the call
  ``from_pretrained(distributed_config=...)`` makes in ``maybe_distribute_model``,
  minus the checkpoint loading and the FSDP2 wrapping of the dense weights (here only
  the router, kept whole on every rank as in epmoe).

  Why this layout: with ``tp_size == 1`` the EP group is not a TP group, so
  ``EPImplementation.shares_batch`` is False, ranks may hold different (and
  differently sized) batches, and ``AllToAllEP`` sends each (token, expert) pair to
  the expert's rank: one all-to-all of the per-expert counts, a host read-back of
  the split sizes, one all-to-all of the tokens, one of the results. With
  ``tp_size == ep_size`` every rank must hold the SAME batch (``"auto"`` then picks
  ``AllReduceEP``: every rank runs its experts on the whole batch and all-reduces;
  ``"all_to_all"`` slices the shared batch over TP and all-gathers the outputs).

  ``train=True`` makes it trainable, for ``benchmarks/fwd_bwd.py``: the router and the
  local experts require gradients and forward records the graph. ``AllToAllEP``
  differentiates as it is: its token and result exchanges are
  ``torch.distributed._functional_collectives.all_to_all_single_autograd`` (backward:
  the all-to-all with the splits swapped), ``_WaitTensor`` has an identity backward,
  and the experts read their local shards through ``DTensor.to_local()``
  (differentiable: the gradient lands in the DTensor parameter's ``.grad``, sharded
  the same way). Only the count exchange runs outside autograd (integers).
"""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


_MESHES: dict = {}


def _dtype(dtype) -> torch.dtype:
    return _DTYPES[dtype] if isinstance(dtype, str) else dtype


def _mixtral_config(hidden_size, intermediate_size, num_experts, top_k, implementation):
    from transformers import MixtralConfig

    config = MixtralConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        num_hidden_layers=1,
        num_attention_heads=max(1, hidden_size // 128),
        num_key_value_heads=max(1, hidden_size // 128),
        vocab_size=128,
        hidden_act="silu",
        router_jitter_noise=0.0,
        experts_implementation=implementation,
    )
    assert config._experts_implementation == implementation, config._experts_implementation
    return config


def _gate_up(weights, experts: slice | None = None) -> torch.Tensor:
    """transformers' fused layout: gate_up_proj[e] = cat([W_gate[e], W_up[e]]) along F
    (``_default_apply_gate`` chunks the output in two: gate first, up second)."""
    sel = experts if experts is not None else slice(None)
    return torch.cat([weights["w_gate"][sel], weights["w_up"][sel]], dim=1)


def _param(t: torch.Tensor, dtype, train: bool = False) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.to(dtype).contiguous(), requires_grad=train)


def _as_2d_forward(block, hidden_size, dtype, train: bool = False):
    def forward(x: torch.Tensor) -> torch.Tensor:
        # MixtralSparseMoeBlock.forward wants [batch, seq, H]
        with torch.set_grad_enabled(train and torch.is_grad_enabled()):
            return block(x.to(dtype).reshape(1, -1, hidden_size)).reshape(-1, hidden_size)

    forward.block = block
    return forward


@torch.no_grad()
def make_transformers_block(hidden_size, intermediate_size, num_experts, top_k, dtype,
                            weights: dict[str, torch.Tensor], implementation: str):
    """transformers' MixtralSparseMoeBlock on one process with the given full weights,
    experts implementation ``implementation`` ("eager" or "grouped_mm"). Returns
    forward(x [T, H]) -> [T, H]."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    if implementation not in ("eager", "grouped_mm"):
        raise ValueError(f"implementation must be 'eager' or 'grouped_mm', got {implementation!r}")
    dtype = _dtype(dtype)
    config = _mixtral_config(hidden_size, intermediate_size, num_experts, top_k, implementation)
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(config)
    block.gate.weight = _param(weights["router_weight"], dtype)
    block.experts.gate_up_proj = _param(_gate_up(weights), dtype)
    block.experts.down_proj = _param(weights["w_down"], dtype)
    block.eval()
    return _as_2d_forward(block, hidden_size, dtype)


@torch.no_grad()
def make_transformers_ep(hidden_size, intermediate_size, num_experts, top_k, dtype,
                         weights, rank: int, world: int, implementation: str = "grouped_mm",
                         ep_implementation: str = "all_to_all", train: bool = False):
    """transformers' own expert parallelism (``apply_expert_parallelism`` with
    ``ep_implementation="all_to_all"``) applied to a Mixtral MoE block over all
    ``world`` ranks of the default (gloo) group. Each rank holds only its
    ``E/world`` experts (contiguous: rank r owns experts [r*E/world, (r+1)*E/world))
    and passes its own tokens (T may differ per rank). Returns forward(x [T, H]) ->
    [T, H] for this rank's tokens. Collective: every rank must call forward the same
    number of times (an empty x is allowed).

    ``implementation`` is the experts implementation each rank runs on the tokens it
    received (default "grouped_mm", what ``from_pretrained`` picks by default).

    ``train=True``: the router and this rank's experts require gradients, forward
    records the graph (the block in ``train()`` mode), and the returned function
    also carries ``params`` (the tensors whose ``.grad`` backward fills),
    ``local_experts`` (their global ids) and ``grads()``: ``router_weight [E, H]``
    (this rank's tokens' part), ``w_gate``/``w_up`` ``[e, F, H]``, ``w_down [e, H, F]``
    (this rank's experts, every rank's tokens), or None where backward left none."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
    from transformers.distributed import DistributedConfig
    from transformers.distributed.expert_parallel import apply_expert_parallelism
    from transformers.distributed.utils import initialize_distributed_mesh
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised (gloo) by the caller")
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise ValueError(f"rank/world {rank}/{world} do not match the process group "
                         f"({dist.get_rank()}/{dist.get_world_size()})")
    if num_experts % world:
        raise ValueError(f"{num_experts} experts do not split over {world} ranks")
    dtype = _dtype(dtype)

    # The meshes from_pretrained would build: dense mesh (pp, dp_replicate, fsdp=world, tp=1),
    # expert mesh (pp, dp_replicate, efsdp=1, ep=world). tp_size=1 => ranks hold different batches.
    distributed_config = DistributedConfig(fsdp_size=world, tp_size=1, ep_size=world,
                                           ep_implementation=ep_implementation)
    # init_device_mesh creates new process groups on every call: build the meshes once per group.
    key = (world, dist.group.WORLD)
    if key not in _MESHES:
        _, mesh_manager = initialize_distributed_mesh(distributed_config)
        _MESHES.clear()
        _MESHES[key] = mesh_manager.get_mesh("ep"), mesh_manager.get_mesh("tp")
    ep_mesh, tp_mesh = _MESHES[key]
    assert ep_mesh.size() == world and tp_mesh.size() == 1

    config = _mixtral_config(hidden_size, intermediate_size, num_experts, top_k, implementation)
    config.distributed_config = distributed_config
    # Build on meta, as from_pretrained does, so that no rank ever allocates all experts.
    with torch.device("meta"):
        block = MixtralSparseMoeBlock(config)
    block.to(dtype)
    # Mixtral's base_model_ep_plan ("layers.*.mlp." stripped), parameters before their module,
    # in the order DistributedMixin._expand_parallel_plan lists them.
    plan = {
        "experts.gate_up_proj": "grouped_gemm",
        "experts.down_proj": "grouped_gemm",
        "experts": "ep_dispatch_experts",
    }
    apply_expert_parallelism(block, ep_mesh, tp_mesh, plan, ep_implementation=ep_implementation)
    experts = block.experts
    local = num_experts // world
    assert experts.num_experts == local and experts._is_expert_parallel

    # "Load" this rank's shard into the meta DTensors (what the DTensor shard loading does).
    mine = slice(rank * local, (rank + 1) * local)
    shards = {"gate_up_proj": _gate_up(weights, mine), "down_proj": weights["w_down"][mine]}
    for name, full in shards.items():
        meta = experts._parameters[name]
        assert isinstance(meta, DTensor) and tuple(meta.to_local().shape) == tuple(full.shape), name
        experts._parameters[name] = torch.nn.Parameter(
            # clone: a slice of the caller's full tensor would keep all experts' storage alive
            DTensor.from_local(full.to(dtype).clone(), ep_mesh, [Shard(0)], run_check=False,
                               shape=meta.shape, stride=meta.stride()),
            requires_grad=train,
        )
    # The router stays whole on every rank (no FSDP): a replicated [E, H] weight, as in epmoe.
    block.gate.weight = _param(weights["router_weight"], dtype, train)
    block.train(train)
    forward = _as_2d_forward(block, hidden_size, dtype, train)
    forward.ep_mesh = ep_mesh
    if train:
        forward.params = [block.gate.weight, experts.gate_up_proj, experts.down_proj]
        forward.local_experts = tuple(range(mine.start, mine.stop))

        def grads() -> dict[str, torch.Tensor | None]:
            gu, down = experts.gate_up_proj.grad, experts.down_proj.grad  # DTensors, Shard(0)
            gu = None if gu is None else gu.to_local()
            return {"router_weight": block.gate.weight.grad,
                    "w_gate": None if gu is None else gu[:, :intermediate_size],
                    "w_up": None if gu is None else gu[:, intermediate_size:],
                    "w_down": None if down is None else down.to_local()}

        forward.grads = grads
    return forward
