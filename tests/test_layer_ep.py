"""EP=N against the single-device reference: every case runs on N gloo ranks, per backend.

One spawn per world size runs every case with every dispatch backend; each
test then checks one case's outputs (gathered from the ranks) against
``reference_moe`` on all ranks' tokens, and that a second forward gave bitwise
the same result.
"""

from __future__ import annotations

import functools

import pytest
import torch
from multiproc import run_ranks

import epmoe

H, F_ = 32, 48
DEEPSEEK_V3 = dict(num_experts=8, top_k=3, scoring="sigmoid", score_correction_bias=True,
                   n_group=4, topk_group=2, routed_scaling_factor=2.5, router_fp32=True,
                   shared_intermediate_size=24)
# name -> (config overrides, tokens per rank (rank r takes counts[r]), flags)
# flags: "hot" every token's first choice is the last expert; "grad" backward too;
# "frozen" (with grad) router frozen and inputs without grad: only expert gradients.
CASES: dict[str, tuple[dict, list[int], str]] = {
    "base": (dict(num_experts=8, top_k=2), [13, 7, 0, 21], ""),
    "uneven_round_robin": (dict(num_experts=7, top_k=3, placement="round_robin"),
                           [10, 10, 10, 10], ""),
    "uneven_linear": (dict(num_experts=6, top_k=2), [4, 9, 1, 6], ""),
    "top1": (dict(num_experts=4, top_k=1), [9, 0, 5, 3], ""),
    "topk_all": (dict(num_experts=5, top_k=5, renormalize=False), [6, 11, 3, 1], ""),
    "sigmoid_gelu": (dict(num_experts=6, top_k=2, scoring="sigmoid", renormalize=False,
                          activation="gelu"), [8, 8, 8, 8], ""),
    "sigmoid_renorm": (dict(num_experts=9, top_k=4, scoring="sigmoid", placement="round_robin"),
                       [5, 12, 7, 2], ""),
    "zero_tokens_everywhere": (dict(num_experts=8, top_k=2), [0, 0, 0, 0], ""),
    "one_expert_top1": (dict(num_experts=8, top_k=1), [16, 16, 16, 16], "hot"),
    "one_expert_top2": (dict(num_experts=8, top_k=2), [16, 3, 0, 16], "hot"),
    "bf16": (dict(num_experts=8, top_k=2, dtype="bfloat16"), [32, 16, 8, 24], ""),
    # the routers and experts of the model families
    "deepseek_v3": (DEEPSEEK_V3, [9, 4, 0, 14], ""),
    "deepseek_v2": (dict(num_experts=8, top_k=3, renormalize=False, n_group=4, topk_group=2,
                         group_scoring="max", routed_scaling_factor=1.5, router_fp32=True,
                         shared_intermediate_size=16), [6, 6, 11, 2], ""),
    "qwen2_shared_gate": (dict(num_experts=6, top_k=2, renormalize=False,
                               shared_intermediate_size=40, shared_expert_gate=True),
                          [5, 0, 9, 8], ""),
    "shared_not_overlapped": (dict(num_experts=6, top_k=2, shared_intermediate_size=40,
                                   overlap_shared=False), [5, 7, 9, 8], ""),
    "gpt_oss": (dict(num_experts=5, top_k=2, router_bias=True, expert_bias=True,
                     activation="clamped_swiglu", swiglu_limit=0.3), [7, 12, 3, 5], ""),
    "deepseek_v3_bf16": ({**DEEPSEEK_V3, "dtype": "bfloat16"}, [20, 8, 16, 4], ""),
    # backward
    "grad": (dict(num_experts=6, top_k=2), [7, 0, 12, 5], "grad"),
    # all tokens to one expert: every rank but the last receives nothing
    "grad_hot_top1": (dict(num_experts=4, top_k=1), [6, 3, 0, 5], "grad hot"),
    "grad_frozen_router": (dict(num_experts=5, top_k=1), [0, 4, 6, 2], "grad hot frozen"),
    "grad_deepseek_v3": (DEEPSEEK_V3, [8, 3, 0, 10], "grad"),
    "grad_gpt_oss": (dict(num_experts=5, top_k=2, router_bias=True, expert_bias=True,
                          activation="clamped_swiglu", swiglu_limit=0.3), [4, 6, 2, 0], "grad"),
    # speed options: outputs as without them
    "loop_experts": (dict(num_experts=8, top_k=2, expert_impl="loop"), [13, 7, 0, 21], ""),
    "grouped_mm_experts": (dict(num_experts=8, top_k=2, expert_impl="grouped_mm"),
                           [13, 7, 0, 21], ""),
    "microbatches": (dict(num_experts=8, top_k=2, overlap_microbatches=True,
                          shared_intermediate_size=16), [13, 1, 0, 21], ""),
    "grad_microbatches": (dict(num_experts=6, top_k=3, overlap_microbatches=True),
                          [9, 0, 4, 1], "grad"),
    # low-precision dispatch: the experts see rounded tokens, the router the originals
    "dispatch_bf16": (dict(num_experts=8, top_k=2, dispatch_dtype="bfloat16"), [9, 4, 0, 7],
                      "codec"),
    "dispatch_fp8": (dict(num_experts=8, top_k=2, dispatch_dtype="float8_e4m3"), [9, 4, 3, 7],
                     "codec"),
    "grad_dispatch_fp8": (dict(num_experts=6, top_k=2, dispatch_dtype="float8_e4m3"),
                          [5, 2, 0, 6], "grad codec"),
    # forwards in chunks (every rank takes as many as the rank with most tokens needs)
    "chunked": (dict(num_experts=8, top_k=2, max_chunk_tokens=4), [13, 7, 0, 21], ""),
    "chunked_hot": (dict(num_experts=8, top_k=1, max_chunk_tokens=3), [16, 3, 0, 16], "hot"),
    "grad_chunked": (dict(num_experts=6, top_k=2, max_chunk_tokens=3), [7, 0, 12, 5], "grad"),
    # redundant experts (12 slots: even on 1 to 4 ranks): each choice of a copied
    # expert goes to one of its copies, and the outputs stay the reference's
    "redundant": (dict(num_experts=8, top_k=2, num_redundant_experts=4), [13, 7, 0, 21], ""),
    "redundant_hot": (dict(num_experts=8, top_k=2, num_redundant_experts=4,
                           placement="round_robin"), [16, 3, 0, 16], "hot"),
    "redundant_deepseek_v3": ({**DEEPSEEK_V3, "num_redundant_experts": 4}, [9, 4, 0, 14], ""),
    "grad_redundant": (dict(num_experts=6, top_k=2, num_redundant_experts=6), [7, 0, 12, 5],
                       "grad"),
    "batch_invariant": (dict(num_experts=8, top_k=3, num_redundant_experts=4,
                             batch_invariant=True), [13, 7, 0, 40], ""),
    "grad_batch_invariant": (dict(num_experts=6, top_k=2, batch_invariant=True,
                                  shared_intermediate_size=16), [7, 0, 12, 5], "grad"),
}
BACKENDS = ["alltoall", "allgather_reducescatter", "low_latency"]
WORLDS = [1, 2, 3, 4]
EXPERT_TENSORS = ("w_gate_up", "w_down", "b_gate_up", "b_down")


def case_inputs(name: str, world: int, backend: str = "alltoall"):
    """Config, all ranks' tokens (concatenated), per-rank counts, and the full weights
    by name (what ``load_full_weights`` and ``reference_moe`` take) of a case."""
    overrides, counts, special = CASES[name]
    counts = counts[:world]
    cap = dict(max_tokens_per_rank=max(counts + [1])) if backend == "low_latency" else {}
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, all2all_backend=backend,
                          **cap, **overrides)
    gen = torch.Generator().manual_seed(1000 + sum(map(ord, name)))
    x = torch.randn(sum(counts), H, generator=gen)
    router, gate, up, down = epmoe.full_weights(cfg, seed=7)
    if "hot" in special:  # every token's first choice is the last expert (on the last rank)
        x = x.abs() + 0.1
        router = 0.01 * torch.randn(cfg.num_experts, H, generator=gen)
        router[-1] = 5.0
    weights = dict(router_weight=router.to(cfg.router_dtype), w_gate=gate, w_up=up, w_down=down,
                   **epmoe.full_optional_weights(cfg, seed=7))
    return cfg, x.to(cfg.dtype), counts, weights


def _worker(world: int) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    assert state.ep_size == world and state.backend in ("gloo", None)
    return {(backend, name): _run_case(state, world, backend, name)
            for backend in BACKENDS for name in CASES}


def _run_case(state, world: int, backend: str, name: str) -> dict:
    cfg, x_all, counts, weights = case_inputs(name, world, backend)
    start = sum(counts[: state.rank])
    x = x_all[start : start + counts[state.rank]].clone()
    stats = "grad" not in CASES[name][2] and not cfg.overlap_microbatches and \
        (backend == "low_latency" or cfg.max_chunk_tokens >= max(counts))  # one round
    layer = epmoe.ExpertParallelMoE(cfg, state, seed=None, collect_stats=stats)
    layer.load_full_weights(**weights)
    flags = CASES[name][2]
    if "grad" in flags:
        if "frozen" in flags:  # a rank without tokens passes a plain empty tensor
            layer.router_weight.requires_grad_(False)
            x = x if x.shape[0] else torch.empty(0, H)
        else:
            x.requires_grad_(True)
        y = layer(x)
        r = torch.Generator().manual_seed(5)
        probe = torch.randn(x_all.shape, generator=r)[start : start + x.shape[0]]
        (y * probe).sum().backward()
        with torch.no_grad():  # ranks still in step after backward
            layer(torch.ones(1, H))
        return dict(y=y.detach(), x_grad=x.grad, local=layer.local_experts,
                    grads={n: p.grad for n, p in layer.named_parameters()})
    with torch.no_grad():
        y1 = layer(x)
        stats = layer.last_stats
        y2 = layer(x)
    return dict(y=y1, bitwise=torch.equal(y1, y2), stats=stats, local=layer.local_experts,
                rows_sent=layer.rows_sent)


@functools.cache
def results(world: int) -> list[dict]:
    return run_ranks(_worker, world, world, deadline_s=600)


def expected(cfg, x, weights, counts):
    """What the reference gives, as the ranks routed their own blocks; with
    low-precision dispatch the experts see the tokens after the wire's rounding
    (whose gradient is taken as the identity, as the layer's backward does)."""
    codec = epmoe.dispatch.make_codec(cfg.dispatch_dtype, cfg.dtype)
    xq = None
    if codec is not None and len(counts) > 1:
        xq = x + (codec.decode(codec.encode(x)) - x).detach()
    blocks = x.split(counts)
    qblocks = xq.split(counts) if xq is not None else [None] * len(blocks)
    return torch.cat([epmoe.reference_moe(b, **weights, config=cfg, expert_input=q)
                      for b, q in zip(blocks, qblocks, strict=True)])


PLAIN = [n for n in CASES if "grad" not in CASES[n][2]]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PLAIN)
def test_ep_matches_reference(world: int, backend: str, name: str):
    cfg, x, counts, weights = case_inputs(name, world, backend)
    per_rank = [r[(backend, name)] for r in results(world)]
    y = torch.cat([r["y"] for r in per_rank])
    assert y.shape == x.shape and y.dtype == cfg.dtype
    if "codec" in CASES[name][2]:  # fp32 arithmetic on rounded expert inputs
        ref = expected(cfg, x, weights, counts)
        assert (y - ref).abs().max() <= 1e-5 * max(ref.abs().max(), 1e-6)
    else:
        # The reference routes each rank's block of tokens as that rank did.
        result = epmoe.compare_to_reference(y, x, **weights, config=cfg, splits=counts)
        assert result.ok, str(result)
        if cfg.dtype == torch.float32 and y.numel():  # the same bound, spelled out
            ref = expected(cfg, x, weights, counts)
            assert (y - ref).abs().max() <= 1e-5 * max(ref.abs().max(), 1e-6)
    assert all(r["bitwise"] for r in per_rank), "second forward differs"
    # Each rank holds exactly its placement's experts, and counted what it sent.
    emap = epmoe.expert_map(cfg.num_experts, world, cfg.placement, cfg.num_redundant_experts)
    for rank, r in enumerate(per_rank):
        assert r["local"] == emap.experts_on(rank)
        s = r["stats"]
        if s is None:  # micro-batches run without statistics
            continue
        assert r["rows_sent"] == [2 * n for n in s.send_rows]  # two forwards
        assert s.tokens == counts[rank] and sum(s.tokens_per_expert) == counts[rank] * cfg.top_k
        assert [per_rank[j]["stats"].send_rows[rank] for j in range(world)] == s.recv_rows
        assert all(a >= b for a, b in zip(s.send_rows, s.needed_rows, strict=True))
        if backend == "alltoall":  # exactly the rows needed, no more
            assert s.send_rows == s.needed_rows


@pytest.mark.parametrize("world", [2, 4])
def test_token_sent_once_per_rank(world: int):
    """top_k = E: every token needs every rank, and goes to each exactly once."""
    cfg, x, counts, _ = case_inputs("topk_all", world)
    for rank, r in enumerate(results(world)):
        assert r[("alltoall", "topk_all")]["stats"].send_rows == [counts[rank]] * world


GRAD_CASES = [n for n in CASES if "grad" in CASES[n][2]]
FUSED = {"w_gate_up": ("w_gate", "w_up"), "b_gate_up": ("b_gate", "b_up")}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", GRAD_CASES)
def test_ep_gradients_match_reference(world: int, backend: str, name: str):
    cfg, x, counts, weights = case_inputs(name, world, backend)
    frozen = "frozen" in CASES[name][2]
    per_rank = [r[(backend, name)] for r in results(world)]
    leaves = {n: w.clone().requires_grad_(n != "score_correction_bias"
                                          and not (frozen and n == "router_weight"))
              for n, w in weights.items()}
    xr = x.clone().requires_grad_(not frozen)
    y = expected(cfg, xr, leaves, counts)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    if y.requires_grad:  # (no token at all reaches an expert: nothing to differentiate)
        (y * probe).sum().backward()
    grads = {n: w.grad if w.grad is not None else torch.zeros_like(w) for n, w in leaves.items()}
    for fused, (a, b) in FUSED.items():  # the layer holds gate and up as one tensor
        if a in grads:
            grads[fused] = torch.cat([grads.pop(a), grads.pop(b)], dim=1)

    def close(got, want, what):
        assert got is not None and got.shape == want.shape, what
        if want.numel():
            tol = 1e-5 * max(want.abs().max().item(), 1e-6)
            assert (got - want).abs().max().item() <= tol, what

    close(torch.cat([r["y"] for r in per_rank]), y.detach(), "output")
    if frozen:
        assert all(r["x_grad"] is None and r["grads"]["router_weight"] is None for r in per_rank)
    else:
        close(torch.cat([r["x_grad"] for r in per_rank]), xr.grad, "input gradient")
    for n in grads:
        if n == "score_correction_bias" or (frozen and n == "router_weight"):
            continue
        if n in EXPERT_TENSORS and cfg.num_redundant_experts:  # copies: theirs add up
            summed = torch.zeros_like(grads[n])
            for r in per_rank:
                summed.index_add_(0, torch.tensor(r["local"]), r["grads"][n])
            close(summed, grads[n], f"{n} gradient summed over copies")
        elif n in EXPERT_TENSORS:  # local: each rank's slice of the reference's gradient
            for r in per_rank:
                close(r["grads"][n], grads[n][list(r["local"])], f"{n} gradient")
        else:  # replicated and not yet averaged: the ranks' gradients add up
            close(sum(r["grads"][n] for r in per_rank), grads[n], f"{n} gradient")


def _overflow_worker() -> str:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=20)
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, num_experts=4,
                          all2all_backend="low_latency", max_tokens_per_rank=4)
    layer = epmoe.ExpertParallelMoE(cfg, state)
    try:
        layer(torch.randn(5, H))
    except ValueError as e:
        return str(e)
    return "no error"


def test_low_latency_refuses_more_tokens_than_its_buffers():
    out = run_ranks(_overflow_worker, 1)
    assert "5 tokens on rank 0 exceed max_tokens_per_rank=4" in out[0]
