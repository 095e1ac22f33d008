"""torchtitan's MoE layer with its all-to-all token dispatcher (expert parallelism), as a peer.

Built and checked against torchtitan 0.3.0 from PyPI, which needs (beside torch)
``spmd_types==0.2.3``, ``tyro`` and ``triton`` just to import its MoE module
(``torchtitan/distributed/minimal_async_ep/kernels.py`` does ``import triton``;
no triton kernel runs on this path). On a CPU-only machine::

    pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3 triton==3.9.0
    pip install tyro          # pulls docstring-parser and typeguard; leaves torch alone

How it is put together (no ``ParallelDims``, no trainer):

* ``set_spmd_backend("partial_dtensor")``: the default backend ("spmd_types")
  needs torchtitan's global SPMD mesh; "partial_dtensor" makes the dispatcher use
  plain functional ``all_to_all_single`` on the EP ``DeviceMesh`` (gloo works).
* ``MoE.Config(...).build()`` with an ``AllToAllTokenDispatcher`` whose
  ``GroupedExperts`` holds only this rank's ``E / world`` experts (contiguous
  block ``rank * E/world ...``, the layout the dispatcher assumes), sliced by hand
  from the full weights; then ``token_dispatcher.wire_meshes(ep_mesh=...)``, which
  is what ``RoutedExperts.parallelize`` would do.
* Router: ``score_func="softmax"``, ``route_norm=True`` (renormalise the top-k),
  ``route_scale=1.0``, no expert groups, ``load_balance_coeff=None`` (no expert
  bias), no shared experts: Mixtral's routing.

Caveats (torchtitan's behaviour, not this file's):

* torchtitan computes the router logits under ``torch.autocast(dtype=float32)``;
  CPU autocast does not support float32 and disables itself (UserWarning), so
  with bf16 tokens the logits, the softmax and the top-k would all be bf16. A
  forward hook on ``router.gate`` casts the logits to fp32, so the softmax, top-k
  and renormalisation run in fp32 on bf16 logits, exactly as Mixtral does.
* ``GroupedExperts.forward`` always runs the expert matmuls in bf16
  (``x.bfloat16()``, ``w.bfloat16()``, then ``.type_as(x)``), whatever the model
  dtype: with fp32 tokens and weights its result has bf16-level error, and each
  forward re-casts the local expert weights to bf16.
* The combine weights the expert outputs in fp32, rounds them to the token dtype,
  then ``scatter_add``s them in the token dtype (deterministic algorithms on).

Training (``train=True``, for ``benchmarks/fwd_bwd.py``): with the
"partial_dtensor" backend the dispatcher's token exchanges are
``torch.distributed._functional_collectives.all_to_all_single``, which in the
torch installed here (2.13) has an autograd formula (``register_autograd`` on
``_c10d_functional::all_to_all_single`` in that module: the all-to-all with the
splits swapped, then ``wait_tensor``, whose backward is the identity). So the layer
backpropagates as torchtitan ships it; only the count exchange runs under
``no_grad`` (integers). ``torch._grouped_mm`` has a CPU backward.
"""

from __future__ import annotations

import warnings

import torch


def available() -> str | None:
    """None if torchtitan can run here, else a one-line reason."""
    try:
        import torchtitan  # noqa: F401
    except ImportError as e:
        return f"torchtitan not installed ({e})"
    try:
        from torchtitan.distributed.utils import set_spmd_backend  # noqa: F401
        from torchtitan.models.common.moe import MoE  # noqa: F401
        from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher  # noqa: F401
    except ImportError as e:
        return f"torchtitan's MoE does not import: {e}"
    if not hasattr(torch, "_grouped_mm"):
        return "torch has no _grouped_mm (torchtitan's GroupedExperts needs it)"
    try:
        a = torch.ones(2, 16, dtype=torch.bfloat16)  # grouped_mm wants 16-byte strides
        b = torch.ones(1, 16, 8, dtype=torch.bfloat16)
        torch._grouped_mm(a, b, offs=torch.tensor([2], dtype=torch.int32))
    except Exception as e:  # noqa: BLE001
        return f"torch._grouped_mm fails on CPU: {type(e).__name__}: {e}"
    return None


def make_torchtitan_ep(hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                       dtype: torch.dtype, weights: dict[str, torch.Tensor], rank: int, world: int,
                       train: bool = False):
    """torchtitan's MoE with all-to-all expert parallelism over all ``world`` ranks.

    ``weights`` are the FULL weights, nn.Linear orientation: ``router_weight``
    [E, H], ``w_gate`` [E, F, H], ``w_up`` [E, F, H], ``w_down`` [E, H, F]. This
    rank keeps experts ``rank * E/world`` to ``(rank + 1) * E/world - 1``.
    Returns ``forward(x[T, H]) -> [T, H]`` for this rank's own tokens (collective:
    every rank must call it, T may differ between ranks).

    ``train=True``: the router and this rank's experts require gradients, the module
    is in ``train()`` mode (it then counts tokens per expert, as in training) and
    forward records the graph; the returned function also carries ``params``,
    ``local_experts`` (global ids) and ``grads()``: ``router_weight [E, H]`` (this
    rank's tokens' part), ``w_gate``/``w_up`` ``[e, F, H]``, ``w_down [e, H, F]``.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.distributed.utils import set_spmd_backend
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import (
        GroupedExperts,
        MoE,
        RoutedExperts,
        TokenChoiceTopKRouter,
    )
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

    H, F, E = hidden_size, intermediate_size, num_experts
    if E % world:
        raise ValueError(f"num_experts {E} not divisible by world {world}")
    assert dist.is_initialized() and dist.get_world_size() == world and dist.get_rank() == rank
    e = E // world
    set_spmd_backend("partial_dtensor")

    config = MoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=H, hidden_dim=F, num_experts=e),
            token_dispatcher=AllToAllTokenDispatcher.Config(num_experts=E, top_k=top_k),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=E,
            gate=Linear.Config(in_features=H, out_features=E, bias=False),
            top_k=top_k,
            score_func="softmax",
            route_norm=True,
            route_scale=1.0,
        ),
        load_balance_coeff=None,
        shared_experts=None,
    )
    moe = config.build()
    lo, hi = rank * e, (rank + 1) * e
    experts = moe.routed_experts.inner_experts
    with torch.no_grad():
        moe.router.gate.weight.copy_(weights["router_weight"])
        experts.w1_EFD.copy_(weights["w_gate"][lo:hi])  # silu branch
        experts.w3_EFD.copy_(weights["w_up"][lo:hi])
        experts.w2_EDF.copy_(weights["w_down"][lo:hi])
    moe = moe.to(dtype).train(train)
    for p in moe.parameters():
        p.requires_grad_(train)
    # fp32 softmax / top-k / renormalisation on the (token-dtype) logits, as Mixtral.
    moe.router.gate.register_forward_hook(lambda mod, args, out: out.float())

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    moe.routed_experts.token_dispatcher.wire_meshes(ep_mesh=mesh)

    def forward(x_TH: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(train and torch.is_grad_enabled()), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*CPU autocast.*")
            warnings.filterwarnings("ignore", message="In CPU autocast.*")
            return moe(x_TH.to(dtype).unsqueeze(0)).squeeze(0)

    forward.module = moe  # for inspection
    if train:
        gate = moe.router.gate.weight
        forward.params = [gate, experts.w1_EFD, experts.w3_EFD, experts.w2_EDF]
        forward.local_experts = tuple(range(lo, hi))
        forward.grads = lambda: {"router_weight": gate.grad, "w_gate": experts.w1_EFD.grad,
                                 "w_up": experts.w3_EFD.grad, "w_down": experts.w2_EDF.grad}
    return forward
