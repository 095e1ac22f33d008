"""Expert-parallel load balancing: where to put redundant copies of hot experts (pure).

The shape of DeepSeek's EPLB (and vLLM's and SGLang's copies of it):
``rebalance_experts(load [L, E], num_replicas, num_groups, num_nodes, num_gpus)``
returns, per layer, which logical expert each physical slot holds. Physical
slots are numbered GPU by GPU: GPU ``g`` holds slots ``g * S .. (g + 1) * S - 1``
with ``S = num_replicas // num_gpus``.

Two policies, as DeepSeek's:

- hierarchical (``num_groups % num_nodes == 0``): expert groups are packed onto
  nodes so that nodes get equal load (a group never spans nodes, so group-limited
  routing keeps its traffic inside few nodes), hot experts are replicated within
  each node, and the node's physical experts are packed onto its GPUs;
- global (otherwise): the same with one node and one group, over all GPUs.

Packing is greedy (heaviest item first, onto the lightest pack that still has
room); replication gives the next copy to the expert with the most load per copy.
``keep_slots`` then reorders each GPU's slots so that an expert that stays on a
GPU keeps the slot it had: a rebalance moves only what changed.

Shape legend: L layers, E logical experts, P physical experts (``num_replicas``),
N nodes, G GPUs, R the most replicas of one expert.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["balancedness", "keep_slots", "rebalance_experts", "replicate_experts",
           "balanced_packing", "rank_loads"]


def balanced_packing(weight_XN: Tensor, num_packs: int) -> tuple[Tensor, Tensor]:
    """Pack each row's ``N`` items into ``num_packs`` packs of ``N // num_packs`` items each,
    balancing the packs' summed weight. Returns ``(pack_XN, rank_in_pack_XN)``."""
    X, N = weight_XN.shape
    if num_packs < 1 or N % num_packs:
        raise ValueError(f"balanced_packing: {N} items do not split into {num_packs} equal "
                         "packs")
    per_pack = N // num_packs
    pack = torch.full((X, N), -1, dtype=torch.int64)
    rank = torch.full((X, N), -1, dtype=torch.int64)
    w = weight_XN.double().cpu()
    for x in range(X):
        loads = [0.0] * num_packs
        counts = [0] * num_packs
        # Heaviest first; ties by item id, so the result is deterministic.
        for i in sorted(range(N), key=lambda j: (-float(w[x, j]), j)):
            p = min((q for q in range(num_packs) if counts[q] < per_pack),
                    key=lambda q: (loads[q], q))
            pack[x, i], rank[x, i] = p, counts[p]
            loads[p] += float(w[x, i])
            counts[p] += 1
    return pack, rank


def replicate_experts(weight_XE: Tensor, num_phy: int) -> tuple[Tensor, Tensor, Tensor]:
    """``num_phy >= E`` physical copies of each row's ``E`` experts: every expert once, then
    each further copy to the expert with the most load per copy. Returns ``(phy2log_XP,
    replica_XP, logcnt_XE)``: the logical expert of each copy, which copy of it this is,
    and how many copies each expert has."""
    X, E = weight_XE.shape
    if num_phy < E:
        raise ValueError(f"replicate_experts: {num_phy} physical experts cannot hold {E} "
                         "logical ones")
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(X, 1)
    replica = torch.zeros((X, num_phy), dtype=torch.int64)
    logcnt = torch.ones((X, E), dtype=torch.int64)
    w = weight_XE.double().cpu()
    for i in range(E, num_phy):
        best = (w / logcnt).argmax(dim=1)  # [X]; ties: the lowest id
        phy2log[:, i] = best
        replica[:, i] = logcnt[torch.arange(X), best]
        logcnt[torch.arange(X), best] += 1
    return phy2log, replica, logcnt


def _hierarchical(weight_LE: Tensor, num_phy: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> Tensor:
    """``phy2log [L, P]`` by the hierarchical policy (see the module docstring)."""
    L, E = weight_LE.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_node = num_phy // num_nodes
    w = weight_LE.double().cpu()

    # 1. expert groups onto nodes: node_of_group [L, num_groups]
    group_load = w.view(L, num_groups, group_size).sum(-1)
    node_of_group, rank_in_node = balanced_packing(group_load, num_nodes)
    # logical experts in node order: node n holds its groups in pack order
    group_slot = node_of_group * groups_per_node + rank_in_node  # [L, num_groups]
    log_in_node_order = torch.empty((L, E), dtype=torch.int64)  # position -> logical
    for layer in range(L):
        for g in range(num_groups):
            pos = int(group_slot[layer, g]) * group_size
            log_in_node_order[layer, pos : pos + group_size] = torch.arange(
                g * group_size, (g + 1) * group_size)

    # 2. replicate within each node: rows = (layer, node)
    per_node_w = w.gather(1, log_in_node_order).view(L * num_nodes, E // num_nodes)
    phy2mid, _, cnt = replicate_experts(per_node_w, phy_per_node)  # mid: index within node

    # 3. the node's physical experts onto its GPUs, balancing load per copy
    copy_load = per_node_w.gather(1, phy2mid) / cnt.gather(1, phy2mid)
    gpu, rank = balanced_packing(copy_load, gpus_per_node)
    slot = gpu * (phy_per_node // gpus_per_node) + rank  # [L * N, phy_per_node]
    mid_of_slot = torch.empty_like(phy2mid).scatter_(1, slot, phy2mid)
    # back to logical ids
    node_base = (torch.arange(num_nodes) * (E // num_nodes)).repeat(L).view(-1, 1)
    pos_in_order = (mid_of_slot + node_base).view(L, num_phy)
    return log_in_node_order.gather(1, pos_in_order)


def rebalance_experts(load_LE: Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[Tensor, Tensor, Tensor]:
    """Place ``num_replicas`` physical experts for every layer's logical experts.

    ``load_LE``: tokens per logical expert (any non-negative weights), per layer.
    Returns ``(phy2log [L, P], log2phy [L, E, R], logcnt [L, E])``: the logical
    expert in each physical slot; each logical expert's slots (``-1`` padded); its
    number of copies. Hierarchical when ``num_groups % num_nodes == 0``, global
    otherwise (DeepSeek's EPLB)."""
    if load_LE.dim() != 2:
        raise ValueError(f"rebalance_experts: load must be [layers, experts], got shape "
                         f"{tuple(load_LE.shape)}")
    L, E = load_LE.shape
    for name, v in (("num_replicas", num_replicas), ("num_groups", num_groups),
                    ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"rebalance_experts: {name} must be a positive int, got {v!r}")
    if num_replicas < E or num_replicas % num_gpus:
        raise ValueError(f"rebalance_experts: num_replicas={num_replicas} must be >= the "
                         f"{E} experts and a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes or E % num_groups:
        raise ValueError(f"rebalance_experts: num_gpus={num_gpus} must be a multiple of "
                         f"num_nodes={num_nodes}, and the {E} experts of num_groups="
                         f"{num_groups}")
    if bool((load_LE < 0).any()) or not bool(torch.isfinite(load_LE).all()):
        raise ValueError("rebalance_experts: loads must be finite and >= 0")
    if num_groups % num_nodes == 0 and (E // num_nodes) * num_nodes == E:
        phy2log = _hierarchical(load_LE, num_replicas, num_groups, num_nodes, num_gpus)
    else:  # global: one node, one group
        phy2log = _hierarchical(load_LE, num_replicas, 1, 1, num_gpus)
    logcnt = torch.zeros((L, E), dtype=torch.int64)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    return phy2log, log2phy_of(phy2log, E), logcnt


def log2phy_of(phy2log_LP: Tensor, num_experts: int) -> Tensor:
    """Each logical expert's physical slots, ascending, ``-1`` padded: ``[L, E, R]``."""
    L, P = phy2log_LP.shape
    cnt = torch.zeros((L, num_experts), dtype=torch.int64)
    cnt.scatter_add_(1, phy2log_LP, torch.ones_like(phy2log_LP))
    R = int(cnt.max()) if cnt.numel() else 1
    out = torch.full((L, num_experts, R), -1, dtype=torch.int64)
    for layer in range(L):
        seen = [0] * num_experts
        for p in range(P):
            e = int(phy2log_LP[layer, p])
            out[layer, e, seen[e]] = p
            seen[e] += 1
    return out


def keep_slots(old_LP: Tensor, new_LP: Tensor, num_gpus: int) -> Tensor:
    """``new_LP`` with each GPU's slots reordered so that every logical expert that the
    GPU held before and still holds keeps its old slot. The set of experts on each GPU
    is unchanged: only the slots within a GPU move, so outputs are the same."""
    L, P = new_LP.shape
    S = P // num_gpus
    out = new_LP.clone()
    for layer in range(L):
        for g in range(num_gpus):
            a, b = g * S, (g + 1) * S
            old, new = old_LP[layer, a:b].tolist(), new_LP[layer, a:b].tolist()
            placed: list[int | None] = [None] * S
            left = list(new)
            for s, e in enumerate(old):  # an expert that stays keeps its slot
                if e in left:
                    placed[s] = e
                    left.remove(e)
            free = [s for s in range(S) if placed[s] is None]
            for s, e in zip(free, left, strict=True):
                placed[s] = e
            out[layer, a:b] = torch.tensor(placed)
    return out


def rank_loads(load_LE: Tensor, phy2log_LP: Tensor, num_gpus: int) -> Tensor:
    """Tokens per GPU ``[L, G]`` when each expert's load is shared evenly by its copies."""
    L, P = phy2log_LP.shape
    cnt = torch.zeros(load_LE.shape, dtype=torch.float64)
    cnt.scatter_add_(1, phy2log_LP, torch.ones_like(phy2log_LP, dtype=torch.float64))
    per_copy = load_LE.double().gather(1, phy2log_LP) / cnt.gather(1, phy2log_LP)
    return per_copy.view(L, num_gpus, P // num_gpus).sum(-1)


def balancedness(rank_load_LG: Tensor) -> Tensor:
    """Mean over max of the tokens per GPU, per layer (1 is perfect balance)."""
    mx = rank_load_LG.max(dim=1).values
    return torch.where(mx > 0, rank_load_LG.mean(dim=1) / mx.clamp(min=1e-30), 1.0)
