"""Applying a new expert placement to a live layer: which rows move, and one all-to-all.

:func:`plan_moves` is pure: from the old and the new :class:`~epmoe.placement.ExpertMap`
it lists the rows whose expert changes. A row that keeps its expert is not touched
(``epmoe.eplb.keep_slots`` makes that the common case); a row whose new expert the
rank already held elsewhere is copied locally; only the others travel, each from one
rank that held the expert (the one with the fewest rows to send so far). Every rank
computes the same plan from the same load, so the sizes of the one all-to-all that
:func:`move_rows` then runs are known everywhere without exchanging counts.

Shape legend: e rows (slots) on this rank, D numbers in one expert's weights
(all its weight and bias tensors, flattened), n rows that travel.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .collectives import all_to_all_v, gather_ints
from .eplb import keep_slots, rebalance_experts
from .health import guarded
from .placement import ExpertMap, map_of_slots

if TYPE_CHECKING:
    from .moe import ExpertParallelMoE

__all__ = ["Move", "Rebalance", "move_rows", "new_placement", "plan_moves", "rebalance_layer"]


@dataclass(frozen=True)
class Rebalance:
    """What one ``layer.rebalance()`` did, seen from one rank."""

    changed_rows: int  # rows (slots) of the whole group whose expert changed
    rows_sent: int  # rows this rank sent to other ranks
    rows_received: int  # rows it received from them (other changed rows: local copies)
    bytes_sent: int
    bytes_received: int
    seconds: float  # wall time of the call on this rank (placement, check, moves)
    balancedness_before: float  # mean / max tokens per rank for the load, old placement
    balancedness_after: float  # the same load on the new placement
    phy2log: tuple[int, ...]  # [P] the new placement


@dataclass(frozen=True)
class Move:
    """Row ``dst_row`` of rank ``dst_rank`` takes expert ``expert`` from row ``src_row`` of
    rank ``src_rank`` (the same rank: a local copy)."""

    expert: int
    src_rank: int
    src_row: int
    dst_rank: int
    dst_row: int


def plan_moves(old: ExpertMap, new: ExpertMap) -> list[Move]:
    """The rows whose expert changes, in order of ``(dst_rank, dst_row)``.

    >>> from epmoe.placement import map_of_slots
    >>> plan_moves(map_of_slots(3, 2, [0, 1, 2, 0]), map_of_slots(3, 2, [0, 1, 2, 1]))
    [Move(expert=1, src_rank=0, src_row=1, dst_rank=1, dst_row=1)]
    """
    if (old.num_experts, old.ep_size, old.num_slots) != (new.num_experts, new.ep_size,
                                                         new.num_slots):
        raise ValueError(f"plan_moves: the maps differ in shape: {old.num_experts} experts on "
                         f"{old.ep_size} ranks in {old.num_slots} slots, then "
                         f"{new.num_experts}, {new.ep_size}, {new.num_slots}")
    G = old.ep_size
    held = [dict[int, int]() for _ in range(G)]  # rank -> {expert: a row holding it}
    holders: dict[int, list[int]] = {}  # expert -> ranks holding it, ascending
    for g in range(G):
        for row, e in enumerate(old.experts_on(g)):
            held[g].setdefault(e, row)
            if g not in holders.setdefault(e, []):
                holders[e].append(g)
    sends = [0] * G
    moves = []
    for g in range(G):
        before, after = old.experts_on(g), new.experts_on(g)
        for row, e in enumerate(after):
            if before[row] == e:
                continue
            if e in held[g]:  # already on this rank: a local copy
                moves.append(Move(e, g, held[g][e], g, row))
                continue
            src = min(holders[e], key=lambda r: (sends[r], r))
            sends[src] += 1
            moves.append(Move(e, src, held[src][e], g, row))
    return moves


@torch.no_grad()
def move_rows(tensors: list[Tensor], moves: list[Move], ep_rank: int, ep_size: int,
              group) -> tuple[int, int]:
    """Carry out ``moves`` on this rank's stacked expert tensors (each ``[e, ...]``, written
    in place, so parameters stay the same objects): one all-to-all of the travelling
    rows, every expert's tensors packed into one ``[n, D]`` buffer (a copy of the rows
    that leave). Every rank of ``group`` calls it with the same ``moves``. Returns the
    rows this rank sent and received."""
    me = ep_rank
    flat = [t.view(t.shape[0], -1) for t in tensors]  # [e, D_i] views of the parameters
    if len({t.dtype for t in tensors}) > 1:  # (quantized experts: fp8 or uint8 weights,
        flat = [f.view(torch.uint8) for f in flat]  # fp32 scales): their bytes travel
    outgoing = [m for m in moves if m.src_rank == me and m.dst_rank != me]
    incoming = [m for m in moves if m.dst_rank == me and m.src_rank != me]
    local = [m for m in moves if m.src_rank == me and m.dst_rank == me]
    send = [sum(1 for m in outgoing if m.dst_rank == g) for g in range(ep_size)]
    recv = [sum(1 for m in incoming if m.src_rank == g) for g in range(ep_size)]
    dev = tensors[0].device

    def rows(idx: list[int]) -> Tensor:  # [n, D], a copy
        i = torch.tensor(idx, dtype=torch.long, device=dev)
        return torch.cat([f.index_select(0, i) for f in flat], dim=1)

    # Grouped by destination rank, in the plan's (dst_rank, dst_row) order: the order
    # in which each receiver lists its incoming rows by source rank.
    out_sorted = sorted(outgoing, key=lambda m: (m.dst_rank, m.dst_row))
    in_sorted = sorted(incoming, key=lambda m: (m.src_rank, m.dst_rank, m.dst_row))
    travels = any(m.src_rank != m.dst_rank for m in moves)  # the same on every rank
    got = all_to_all_v(rows([m.src_row for m in out_sorted]), send, recv, group) \
        if travels and ep_size > 1 else None
    copied = rows([m.src_row for m in local]) if local else None  # before anything is written
    widths = [f.shape[1] for f in flat]
    for batch, dst in ((got, [m.dst_row for m in in_sorted]),
                       (copied, [m.dst_row for m in local])):
        if batch is None or not dst:
            continue
        i = torch.tensor(dst, dtype=torch.long, device=dev)
        for f, part in zip(flat, torch.split(batch, widths, dim=1), strict=True):
            f.index_copy_(0, i, part)
    return sum(send), sum(recv)


def new_placement(old: ExpertMap, load_E: Tensor, num_slots: int, num_groups: int = 1,
                  num_nodes: int = 1) -> ExpertMap:
    """DeepSeek's placement for ``load_E [E]`` (``epmoe.eplb.rebalance_experts``, the
    hierarchical policy when ``num_groups`` divides by ``num_nodes``), with every expert
    that stays on a rank kept in its row (``keep_slots``). Pure."""
    E, G = old.num_experts, old.ep_size
    if num_groups % num_nodes or E % num_groups:
        num_groups = 1  # groups that do not fit the nodes: the global policy
    phy2log = rebalance_experts(load_E.view(1, E).double(), num_slots, num_groups, num_nodes,
                                G)[0]
    rows_now = torch.tensor([e for g in range(G) for e in old.experts_on(g)]).view(1, -1)
    return map_of_slots(E, G, keep_slots(rows_now, phy2log, G)[0])


def rebalance_layer(layer: ExpertParallelMoE, load_E: Tensor | None = None,
                    num_nodes: int = 1, min_gain: float = 0.01) -> Rebalance:
    """``layer.rebalance()``: the new placement from the load, the same on every rank
    (checked: one gather of a checksum), then :func:`move_rows`, then the switch of the
    layer's lookup tables. The placement is kept as it is (nothing moves) unless the new
    one raises the balancedness for this load by at least ``min_gain``: the greedy
    placement can reshuffle many experts for a small change of the load."""
    c, s = layer.config, layer.state
    if layer.tensor_parallel:
        raise ValueError(f"rebalance of {layer.name}: parallelism='tensor' holds every expert "
                         "on every rank; there is nothing to re-place")
    t0 = time.perf_counter()
    E, P, G = c.num_experts, c.num_physical_experts, s.ep_size
    if load_E is None:
        if layer.load is None:
            raise ValueError(f"rebalance of {layer.name}: no load to place from: set "
                             "MoEConfig.load_window > 0 (load statistics), or pass load_E")
        load_E = layer.load.total()
    if not isinstance(load_E, Tensor) or tuple(load_E.shape) != (E,):
        raise ValueError(f"rebalance of {layer.name}: load_E must be a tensor of shape ({E},) "
                         f"(tokens per expert), got "
                         f"{tuple(load_E.shape) if isinstance(load_E, Tensor) else load_E!r}")
    if P % G:
        raise ValueError(f"rebalance of {layer.name}: {P} expert slots do not divide evenly "
                         f"over {G} ranks; set MoEConfig.num_redundant_experts so that "
                         "num_experts + num_redundant_experts divides by ep_size")
    load_E = load_E.detach().double().cpu()
    if bool((load_E < 0).any()) or not bool(torch.isfinite(load_E).all()):
        raise ValueError(f"rebalance of {layer.name}: the load must be finite and >= 0")
    old = layer.expert_map
    new = new_placement(old, load_E, P, c.n_group, num_nodes)
    if new.balancedness(load_E) < old.balancedness(load_E) + min_gain:
        new = old  # not worth moving for
    moves = plan_moves(old, new)
    where = f"the rebalance of {layer.name}"
    with guarded(s.heartbeat, where, s.ep_ranks):
        if G > 1:  # a wrong plan would pair up the wrong rows: check first
            mine = zlib.crc32(repr(new.phy2log).encode())
            seen = [v[0] for v in gather_ints([mine], s.device, s.ep_group)]
            if len(set(seen)) > 1:
                raise ValueError(f"{where}: the ranks computed different placements "
                                 f"(checksums {seen}): they were given different loads; "
                                 "every rank must pass the same load_E")
        sent, received = move_rows(layer.expert_tensors(), moves, s.ep_rank, G, s.ep_group)
    row_bytes = sum(t[0].numel() * t.element_size() for t in layer.expert_tensors())
    layer._use_map(new)
    return Rebalance(
        changed_rows=len(moves),
        rows_sent=sent, rows_received=received,
        bytes_sent=sent * row_bytes, bytes_received=received * row_bytes,
        seconds=time.perf_counter() - t0,
        balancedness_before=old.balancedness(load_E),
        balancedness_after=new.balancedness(load_E),
        phy2log=new.phy2log)
