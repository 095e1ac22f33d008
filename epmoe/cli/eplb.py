"""Simulate expert placement for a deployment, without processes: balance and memory per rank.

    python -m epmoe eplb --experts 256 --ranks 64 --redundant 64 --load zipf
    python -m epmoe eplb --experts 64 --ranks 4 --redundant 8 --load hot --nodes 1
    python -m epmoe eplb --load-file load.json      # a recorded [layers, experts] load

Runs ``epmoe.eplb.rebalance_experts`` on a synthetic load (``uniform``; ``zipf``
with ``--zipf-s``, expert ids shuffled per layer; ``hot``: one expert with
``--hot-share`` of all tokens) or a recorded one, and prints per layer the
balancedness (mean over max of tokens per rank) with the plain linear placement
and after rebalancing, and the expert-weight memory per rank.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..config import parse_dtype
from ..eplb import balancedness, rank_loads, rebalance_experts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", type=int, default=256, help="logical experts per layer")
    p.add_argument("--ranks", type=int, default=64, help="EP ranks (GPUs)")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--groups", type=int, default=8, help="expert groups (DeepSeek-V3: 8)")
    p.add_argument("--redundant", type=int, default=64, help="redundant (extra) experts")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--load", choices=["uniform", "zipf", "hot"], default="zipf")
    p.add_argument("--zipf-s", type=float, default=1.0)
    p.add_argument("--hot-share", type=float, default=0.25)
    p.add_argument("--load-file", help="JSON list of per-layer lists of tokens per expert")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens per layer (synthetic)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)


def synthetic_load(kind: str, layers: int, experts: int, tokens: int, zipf_s: float,
                   hot_share: float, seed: int) -> torch.Tensor:
    """Tokens per expert ``[layers, experts]``; the hot ids differ per layer."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty((layers, experts), dtype=torch.float64)
    for layer in range(layers):
        if kind == "uniform":
            w = torch.ones(experts, dtype=torch.float64)
        elif kind == "zipf":
            w = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** zipf_s
        else:
            w = torch.full((experts,), (1 - hot_share) / (experts - 1), dtype=torch.float64)
            w[0] = hot_share
        out[layer] = (w / w.sum() * tokens)[torch.randperm(experts, generator=g)]
    return out


def main(**kwargs) -> int:
    a = argparse.Namespace(**kwargs)
    if a.load_file:
        with open(a.load_file) as f:
            load = torch.tensor(json.load(f), dtype=torch.float64)
        if load.dim() != 2:
            raise ValueError(f"--load-file must hold [layers][experts] numbers, got shape "
                             f"{tuple(load.shape)}")
    else:
        if not 0 < a.hot_share < 1:
            raise ValueError(f"--hot-share must be in (0, 1), got {a.hot_share}")
        load = synthetic_load(a.load, a.layers, a.experts, a.tokens, a.zipf_s, a.hot_share,
                              a.seed)
    L, E = load.shape
    P = E + a.redundant
    if E % a.ranks:
        raise ValueError(f"--experts {E} must be a multiple of --ranks {a.ranks} for the "
                         "plain placement to compare with")
    phy2log, _, cnt = rebalance_experts(load, P, a.groups, a.nodes, a.ranks)
    before = balancedness(rank_loads(load, torch.arange(E).repeat(L, 1), a.ranks))
    after = balancedness(rank_loads(load, phy2log, a.ranks))
    dtype = parse_dtype(a.dtype)
    expert_bytes = 3 * a.hidden * a.intermediate * torch.empty((), dtype=dtype).element_size()
    policy = "hierarchical" if a.groups % a.nodes == 0 else "global"
    print(f"{L} layer(s), {E} experts, {a.ranks} ranks on {a.nodes} node(s), {a.groups} "
          f"groups, {a.redundant} redundant ({P} physical), {policy} policy, load "
          f"{'from ' + a.load_file if a.load_file else a.load}")
    print("layer  balancedness linear  after rebalance  most copies of one expert")
    for layer in range(L):
        print(f"{layer:5d}  {float(before[layer]):19.3f}  {float(after[layer]):15.3f}  "
              f"{int(cnt[layer].max()):25d}")
    print(f"mean   {float(before.mean()):19.3f}  {float(after.mean()):15.3f}")
    print(f"expert weights per rank and layer: {E // a.ranks} x {expert_bytes / 2**20:.1f} MiB "
          f"= {E // a.ranks * expert_bytes / 2**20:.1f} MiB linear, {P // a.ranks} x "
          f"{expert_bytes / 2**20:.1f} MiB = {P // a.ranks * expert_bytes / 2**20:.1f} MiB "
          f"with the redundant experts "
          f"({a.hidden}x{a.intermediate}, {a.dtype})")
    return 0
