"""Forward and backward of one MoE layer (training): epmoe beside its peers, same run, bf16.

    torchrun --nproc_per_node=2 benchmarks/fwd_bwd.py --json benchmarks/results/fwd_bwd.json \
        [--reps 15] [--tokens 2048 --tokens 8]

The Mixtral-like preset (H=1024, F=2048, E=8, top-2), bf16, 2048 and 8 tokens
per rank by default; each rank holds its own tokens, every contender the same
weights (``epmoe.full_weights(cfg, seed=1)``), trainable: the router, the
experts and the input require gradients. Contenders: epmoe with each dispatch
backend (all three backpropagate), transformers 5's own EP (``AllToAllEP``, its
``grouped_mm`` and ``eager`` experts) and torchtitan's EP (``peers/``, built with
``train=True``).

Timed in the same processes, interleaved, each run after a barrier, 2 warm-up
iterations dropped, median per rank, the group's time its slowest rank's:

* fwd: the forward in grad mode (it records the graph, as in training);
* fwd+bwd: the forward, then ``y.backward(grad_y)`` with a fixed random ``grad_y``
  (gradients set to None before, untimed);
* the floor: the expert matrix products alone, on the rows per local expert that
  epmoe's alltoall routed to this rank: forward, x @ W_gate_up^T and act @ W_down^T;
  backward, the input and weight gradients of both (4 products of the same sizes,
  so the fwd+bwd floor is 3x the forward's work). No activation, routing or
  transfer. As a loop of products per expert, and as grouped_mm (its backward by
  autograd: the grouped products of ``grouped_mm``'s own derivative); the floor is
  the faster of the two.

Before timing, each contender's output (``epmoe.compare_to_reference``) and its
gradients are checked against the fp32 reference (``epmoe.reference_moe`` with
autograd over both ranks' tokens, each rank's block routed alone): the input's,
the router weight's (summed over the ranks, as DDP would) and its local experts'.
A gradient's figure is max |g - g_ref| / max |g_ref|; it passes within twice the
figure of the same reference run in bf16, plus one bf16 epsilon (the rule
``compare_to_reference`` applies per token to outputs). A token whose top-k
experts differ between fp32 and bf16 routing (a near-tie: a few of 4096) would
set every such figure by itself, in the bf16 reference too, and make the check
toothless: for the gradient check its rows of ``grad_y`` are zero, so that it
adds nothing to any gradient (the output check keeps it: it allows per token).
A contender that fails its check is reported, not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

import epmoe
from epmoe.benchmark import preset_config, slowest_rank

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import torchtitan_moe, transformers_moe  # noqa: E402

BACKENDS = ("alltoall", "allgather_reducescatter", "low_latency")
H, FI, E, K = 1024, 2048, 8, 2
GRADS = ("x", "router_weight", "w_gate", "w_up", "w_down")
EPS = torch.finfo(torch.bfloat16).eps


class Trainable(NamedTuple):
    forward: Callable[[Tensor], Tensor]  # x [T, H] -> y [T, H], collective
    params: list[Tensor]  # whose .grad backward fills
    grads: Callable[[], dict[str, Tensor | None]]  # router [E, H]; experts [e, F, H] / [e, H, F]
    local_experts: tuple[int, ...]  # global ids of the experts' rows


def _epmoe(layer: epmoe.ExpertParallelMoE) -> Trainable:
    def grads() -> dict[str, Tensor | None]:
        gu, Fi = layer.w_gate_up.grad, layer.w_down.shape[2]
        return {"router_weight": layer.router_weight.grad,
                "w_gate": None if gu is None else gu[:, :Fi],
                "w_up": None if gu is None else gu[:, Fi:], "w_down": layer.w_down.grad}

    return Trainable(layer, list(layer.parameters()), grads, tuple(layer.local_experts))


def _peer(forward) -> Trainable:
    return Trainable(forward, forward.params, forward.grads, forward.local_experts)


def build(tokens: int, state, weights: dict) -> tuple[dict[str, Trainable], dict[str, str]]:
    """Every trainable contender (name -> Trainable), and why any did not build."""
    out, notes = {}, {}
    for be in BACKENDS:
        layer = epmoe.ExpertParallelMoE(preset_config("mixtral", "bfloat16", be, tokens), state,
                                        seed=None)
        layer.load_full_weights(**weights)
        out[f"epmoe {be}"] = _epmoe(layer)
    for impl in ("grouped_mm", "eager"):
        try:
            out[f"transformers EP ({impl})"] = _peer(transformers_moe.make_transformers_ep(
                H, FI, E, K, torch.bfloat16, weights, state.rank, state.world_size,
                implementation=impl, train=True))
        except Exception as e:  # noqa: BLE001 (reported, not fatal)
            notes[f"transformers EP ({impl})"] = f"{type(e).__name__}: {e}"
    reason = torchtitan_moe.available()
    if reason is None:
        out["torchtitan EP"] = _peer(torchtitan_moe.make_torchtitan_ep(
            H, FI, E, K, torch.bfloat16, weights, state.rank, state.world_size, train=True))
    else:
        notes["torchtitan EP"] = reason
    return out, notes


def reference_grads(x_all: Tensor, gy_all: Tensor, splits: list[int], weights: dict,
                    cfg, dtype: torch.dtype) -> dict[str, Tensor]:
    """Gradients of sum(y * grad_y) over every rank's tokens: ``epmoe.reference_moe`` in
    ``dtype`` on the same (rounded) tokens and weights, each rank's block routed alone."""
    c = cfg.replace(dtype=dtype)
    leaves = {n: w.to(dtype).clone().requires_grad_(True) for n, w in weights.items()}
    x = x_all.to(dtype).clone().requires_grad_(True)
    y = torch.cat([epmoe.reference_moe(b, config=c, **leaves) for b in x.split(splits)])
    y.backward(gy_all.to(dtype))
    return {"x": x.grad, **{n: w.grad for n, w in leaves.items()}}


def near_ties(x_all: Tensor, splits: list[int], router_weight: Tensor, cfg) -> Tensor:
    """``[T]`` bool: the tokens whose top-k experts differ between routing in fp32 and in
    bf16 (each rank's block routed alone, as ``reference_grads`` does)."""
    ids = []
    for dt in (torch.float32, torch.bfloat16):
        c = cfg.replace(dtype=dt)
        ids.append(torch.cat([epmoe.route(b.to(dt), router_weight.to(dt), c)[1]
                              for b in x_all.split(splits)]).sort(dim=1).values)
    return (ids[0] != ids[1]).any(dim=1)


def _figure(got: Tensor, ref: Tensor) -> float:
    """max |got - ref| / max |ref| (0 for two empty or zero tensors)."""
    if ref.numel() == 0:
        return 0.0
    err = float((got.float() - ref.float()).abs().max())
    return err / max(float(ref.float().abs().max()), 1e-30)


def check(c: Trainable, x: Tensor, gy: Tensor, refs: tuple[dict, dict], rows: slice,
          weights: dict, cfg, state) -> dict:
    """One forward and backward of ``c``; its output and gradients against the references
    (fp32, bf16). Every rank calls it; returns this rank's verdict."""
    for p in c.params:
        p.grad = None
    x_in = x.clone().requires_grad_(True)
    y = c.forward(x_in)
    y.backward(gy)
    out = epmoe.compare_to_reference(y.detach(), x, **weights, config=cfg)
    got = {"x": x_in.grad, **c.grads()}
    router = got["router_weight"]
    router = torch.zeros(E, H) if router is None else router.detach().float().clone()
    dist.all_reduce(router)  # replicated: every rank holds its own tokens' part
    got["router_weight"] = router
    mine = torch.tensor(c.local_experts)
    figures = {}
    for name in GRADS:
        pick = (lambda t: t[rows]) if name == "x" else \
            (lambda t: t) if name == "router_weight" else (lambda t: t[mine])
        r32, r16 = pick(refs[0][name]), pick(refs[1][name])
        g = got[name] if got[name] is not None else torch.zeros_like(r32)
        fig, own = _figure(g, r32), _figure(r16, r32)
        figures[name] = dict(error=fig, bf16_reference=own, allowed=2 * own + EPS)
    ok = out.ok and all(f["error"] <= f["allowed"] for f in figures.values())
    return dict(ok=ok, output=str(out), output_ratio=out.worst_ratio, grads=figures,
                rank=state.rank)


@torch.no_grad()
def floor_loop(x_MH: Tensor, act_MF: Tensor, gy_MH: Tensor, ggu_M2F: Tensor, counts: list[int],
          w_gu: Tensor, w_d: Tensor, backward: bool) -> None:
    """The expert products alone, per local expert on its ``counts[i]`` rows (operands
    contiguous, as autograd hands them to the products): forward, gate/up and down;
    with ``backward``, each one's input gradient (g @ W) and weight gradient (g^T @ in)."""
    start = 0
    for i, n in enumerate(counts):
        x, act = x_MH[start : start + n], act_MF[start : start + n]
        x @ w_gu[i].T  # [n, 2F]
        act @ w_d[i].T  # [n, H]
        if backward:
            g_y, g_gu = gy_MH[start : start + n], ggu_M2F[start : start + n]
            g_y @ w_d[i]  # [n, F]: input gradient of down
            g_y.T @ act  # [H, F]: weight gradient of down
            g_gu @ w_gu[i]  # [n, H]: input gradient of gate/up
            g_gu.T @ x  # [2F, H]: weight gradient of gate/up
        start += n


def floor_grouped(x_MH: Tensor, act_MF: Tensor, gy_MH: Tensor, ggu_M2F: Tensor, offs: Tensor,
                  w_gu: Tensor, w_d: Tensor, backward: bool) -> None:
    """:func:`floor_loop` as two grouped products (``offs``: int32 row ends per expert);
    with ``backward``, their gradients for all four operands by autograd (not accumulated
    into ``.grad``). The operands are leaves that require gradients."""
    with torch.set_grad_enabled(backward):
        gu = torch.nn.functional.grouped_mm(x_MH, w_gu.transpose(1, 2), offs=offs)
        y = torch.nn.functional.grouped_mm(act_MF, w_d.transpose(1, 2), offs=offs)
        if backward:
            torch.autograd.grad([gu, y], [x_MH, act_MF, w_gu, w_d], [ggu_M2F, gy_MH])


def measure(tokens: int, reps: int, state) -> dict:
    cfg = preset_config("mixtral", "bfloat16", "alltoall", tokens)
    router, gate, up, down = epmoe.full_weights(cfg, seed=1)
    weights = dict(router_weight=router, w_gate=gate, w_up=up, w_down=down)
    gen = torch.Generator().manual_seed(100 + state.rank)
    x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16)
    gy = torch.randn(tokens, H, generator=gen).to(torch.bfloat16)  # the fixed grad_y
    with torch.no_grad():  # (every rank's tokens, for the reference)
        x_all, splits = epmoe.all_gather_v(x, state.ep_group)
        gy_all, _ = epmoe.all_gather_v(gy, state.ep_group)
    start = sum(splits[: state.rank])
    rows = slice(start, start + tokens)
    ties = near_ties(x_all, splits, router, cfg)
    gy_all = gy_all.masked_fill(ties.unsqueeze(1), 0.0)  # (for the check only)
    refs = tuple(reference_grads(x_all, gy_all, splits, weights, cfg, dt)
                 for dt in (torch.float32, torch.bfloat16))
    contenders, notes = build(tokens, state, weights)

    checks, ok = {}, {}
    for name, c in contenders.items():
        try:
            verdict = check(c, x, gy_all[rows], refs, rows, weights, cfg, state)
        except Exception as e:  # noqa: BLE001 (a peer that cannot backpropagate: reported)
            verdict = dict(ok=False, output=f"{type(e).__name__}: {e}", output_ratio=None,
                           grads={}, rank=state.rank)
        both = [None] * state.world_size
        dist.all_gather_object(both, verdict)
        ok[name] = all(v["ok"] for v in both)
        checks[name] = both

    alltoall = contenders["epmoe alltoall"].forward
    alltoall.collect_stats = True
    with torch.no_grad():
        alltoall(x)
    counts = alltoall.last_stats.recv_per_local_expert
    alltoall.collect_stats = False
    M = sum(counts)
    x_MH, act_MF, gy_MH, ggu_M2F = (torch.randn(M, n, generator=gen).to(torch.bfloat16)
                                    for n in (H, FI, H, 2 * FI))
    w_gu, w_d = alltoall.w_gate_up.detach(), alltoall.w_down.detach()
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    leaves = [t.clone().requires_grad_(True) for t in (x_MH, act_MF)]
    w_leaves = [t.clone().requires_grad_(True) for t in (w_gu, w_d)]
    floors = {
        "floor (loop)": lambda b: floor_loop(x_MH, act_MF, gy_MH, ggu_M2F, counts, w_gu, w_d, b),
        "floor (grouped_mm)": lambda b: floor_grouped(*leaves, gy_MH, ggu_M2F, offs, *w_leaves,
                                                      b),
    }

    runs = {n: c for n, c in contenders.items() if ok[n]}
    fwd: dict[str, list[float]] = {n: [] for n in [*runs, *floors]}
    fwd_bwd: dict[str, list[float]] = {n: [] for n in fwd}
    x_in = x.clone().requires_grad_(True)

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        result = fn()  # (a forward's graph is freed after the clock stops)
        ms = 1e3 * (time.perf_counter() - t0)
        del result
        return ms

    for i in range(reps + 2):
        for name, c in runs.items():
            f = timed(lambda c=c: c.forward(x_in))
            for p in c.params:
                p.grad = None
            x_in.grad = None
            fb = timed(lambda c=c: c.forward(x_in).backward(gy))
            if i >= 2:
                fwd[name].append(f)
                fwd_bwd[name].append(fb)
        for name, fn in floors.items():
            f = timed(lambda fn=fn: fn(False))
            fb = timed(lambda fn=fn: fn(True))
            if i >= 2:
                fwd[name].append(f)
                fwd_bwd[name].append(fb)
    fwd_ms, fwd_every = slowest_rank(fwd)
    fwd_bwd_ms, fwd_bwd_every = slowest_rank(fwd_bwd)
    everyone = [{n: (a[n], b[n]) for n in a} for a, b in zip(fwd_every, fwd_bwd_every,
                                                            strict=True)]
    return dict(tokens_per_rank=tokens, fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms,
                floor_fwd_ms=min(fwd_ms[n] for n in floors),
                floor_fwd_bwd_ms=min(fwd_bwd_ms[n] for n in floors),
                per_rank_ms=everyone, rows_per_local_expert=counts,
                near_ties=int(ties.sum()), checks=checks,
                passed=ok, notes=notes)


def main(reps: int = 15, out: str | None = None, tokens: list[int] | None = None) -> list[dict]:
    state = epmoe.init_distributed(force_cpu=True)
    torch.set_num_threads(1)
    results = [measure(t, reps, state) for t in tokens or [2048, 8]]
    if state.rank == 0:
        for r in results:
            print(table(r))
            print(check_table(r))
        if out:
            Path(out).write_text(json.dumps(results, indent=1) + "\n")
    epmoe.destroy_distributed()
    return results


def _ms(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def table(r: dict) -> str:
    """The times of one token count as a markdown table, fastest fwd+bwd first."""
    fwd, fb = r["fwd_ms"], r["fwd_bwd_ms"]
    best = min(v for n, v in fb.items() if n.startswith("epmoe"))
    lines = [f"\n{r['tokens_per_rank']} tokens per rank, bf16, Mixtral-like; median ms "
             "(slowest rank)", "",
             "| contender | fwd ms | fwd+bwd ms | bwd ms (difference) | bwd / fwd | "
             "fwd+bwd relative to the fastest epmoe |",
             "| --- | --- | --- | --- | --- | --- |"]
    for n, v in sorted(fb.items(), key=lambda kv: kv[1]):
        lines.append(f"| {n} | {_ms(fwd[n])} | {_ms(v)} | {_ms(v - fwd[n])} | "
                     f"{(v - fwd[n]) / fwd[n]:.2f} | {v / best:.2f}x |")
    for n, ok in r["passed"].items():
        if not ok:
            lines.append(f"| {n} | failed its check, not timed | | | | |")
    for n, why in r["notes"].items():
        lines.append(f"| {n} | not run: {why} | | | | |")
    return "\n".join(lines)


def check_table(r: dict) -> str:
    """The checks of one token count: per contender, each gradient's worst figure over the
    ranks against its allowance, and the output check."""
    lines = [f"\nChecks against the fp32 reference, {r['tokens_per_rank']} tokens per rank: "
             "max |g - g_ref| / max |g_ref| (allowed: 2x the bf16 reference's + eps), "
             f"worst rank; {r['near_ties']} near-tie token(s) of "
             f"{r['tokens_per_rank'] * len(r['per_rank_ms'])} left out of the gradients", "",
             "| contender | " + " | ".join(GRADS) + " | output | passed |",
             "| --- | " + " | ".join("---" for _ in GRADS) + " | --- | --- |"]
    for n, per_rank in r["checks"].items():
        cells = []
        for g in GRADS:
            figs = [v["grads"][g] for v in per_rank if g in v["grads"]]
            if not figs:
                cells.append("-")
                continue
            worst = max(figs, key=lambda f: f["error"] / f["allowed"])
            cells.append(f"{worst['error']:.2g} ({worst['allowed']:.2g})")
        ratios = [v["output_ratio"] for v in per_rank]
        output = (f"worst token at {max(ratios):.2f} of its allowance" if None not in ratios
                  else "; ".join(v["output"] for v in per_rank))
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {output} | "
                     f"{'yes' if r['passed'][n] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", dest="out", default=None)
    p.add_argument("--tokens", type=int, action="append")
    main(**vars(p.parse_args()))
