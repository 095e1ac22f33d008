"""Tensor parallelism of the same layer (``parallelism="tensor"``) against the reference.

Every rank holds a slice of every expert's F. TP = 1 to 4 ranks, with each rank's own
tokens (uneven counts, a rank without any; gathered, then reduce-scattered) and with
the same tokens on every rank (one all-reduce); outputs and gradients equal
``reference_moe``'s (fp32: max abs error at most 1e-5 of the scale).
"""

from __future__ import annotations

import functools

import pytest
import torch
from multiproc import run_ranks

import epmoe
from epmoe.placement import f_slices

H = 32
CASES: dict[str, tuple[dict, list[int]]] = {
    "base": (dict(num_experts=8, top_k=2, intermediate_size=48), [13, 7, 0, 21]),
    "uneven_f": (dict(num_experts=5, top_k=3, intermediate_size=50), [6, 11, 3, 9]),
    "fewer_experts_than_ranks": (dict(num_experts=2, top_k=1, renormalize=False,
                                      intermediate_size=40),
                                 [5, 0, 8, 3]),
    "gpt_oss": (dict(num_experts=5, top_k=2, intermediate_size=36, router_bias=True,
                     expert_bias=True, activation="clamped_swiglu", swiglu_limit=0.3),
                [7, 12, 3, 5]),
    "deepseek_v3": (dict(num_experts=8, top_k=3, intermediate_size=40, scoring="sigmoid",
                         score_correction_bias=True, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, router_fp32=True,
                         shared_intermediate_size=24), [9, 4, 0, 14]),
    "chunked": (dict(num_experts=6, top_k=2, intermediate_size=48, max_chunk_tokens=4),
                [13, 7, 0, 21]),
    "bf16": (dict(num_experts=8, top_k=2, intermediate_size=64, dtype="bfloat16"),
             [16, 8, 0, 24]),
}
MODES = ["own", "replicated"]
EXPERT = {"w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"}


def inputs(name: str, world: int, mode: str):
    overrides, counts = CASES[name]
    cfg = epmoe.MoEConfig(hidden_size=H, parallelism="tensor", tp_tokens=mode, **overrides)
    counts = counts[:world]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x = torch.randn(sum(counts), H, generator=gen).to(cfg.dtype)
    router, gate, up, down = epmoe.full_weights(cfg, seed=7)
    weights = dict(router_weight=router, w_gate=gate, w_up=up, w_down=down,
                   **epmoe.full_optional_weights(cfg, seed=7))
    return cfg, x, counts, weights


def _worker(world: int) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    out = {}
    for mode in MODES:
        for name in CASES:
            cfg, x_all, counts, weights = inputs(name, world, mode)
            start = sum(counts[: state.rank])
            x = x_all if mode == "replicated" else x_all[start : start + counts[state.rank]]
            layer = epmoe.ExpertParallelMoE(cfg, state, seed=None, collect_stats=True)
            layer.load_full_weights(**weights)
            seeded = epmoe.ExpertParallelMoE(cfg, state, seed=7)  # reset_parameters slices
            same_init = all(torch.equal(a, b) for a, b in
                            zip(layer.parameters(), seeded.parameters(), strict=True))
            x = x.clone().requires_grad_(cfg.dtype == torch.float32)
            y = layer(x)
            grads = {}
            if x.requires_grad:
                probe = torch.randn(x_all.shape, generator=torch.Generator().manual_seed(5))
                if mode == "own":  # this rank's rows of the reference's probe
                    probe = probe[start : start + counts[state.rank]]
                (y * probe).sum().backward()
                grads = {n: p.grad for n, p in layer.named_parameters()}
                grads.update(w_gate=layer.w_gate_up.grad[:, : layer.w_down.shape[2]],
                             w_up=layer.w_gate_up.grad[:, layer.w_down.shape[2] :])
                if cfg.expert_bias:
                    Fl = layer.w_down.shape[2]
                    grads.update(b_gate=layer.b_gate_up.grad[:, :Fl],
                                 b_up=layer.b_gate_up.grad[:, Fl:])
            out[(mode, name)] = dict(y=y.detach(), x_grad=x.grad, grads=grads,
                                     same_init=same_init, f_slice=layer.f_slice,
                                     bytes=layer.expert_weight_bytes(),
                                     stats=layer.last_stats)
    return out


@functools.cache
def results(world: int) -> list[dict]:
    return run_ranks(_worker, world, world, deadline_s=600)


def reference(cfg, x, counts, weights, mode):
    """Outputs and gradients of the reference, as the ranks split the tokens."""
    leaves = {n: w.clone().float().requires_grad_(n != "score_correction_bias")
              for n, w in weights.items()}
    xr = x.float().clone().requires_grad_(True)
    fcfg = cfg.replace(dtype="float32")
    blocks = [xr] if mode == "replicated" else xr.split(counts)
    y = torch.cat([epmoe.reference_moe(b, **leaves, config=fcfg) for b in blocks])
    probe = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * probe).sum().backward()
    return y.detach(), xr.grad, {n: w.grad for n, w in leaves.items()}


def close(got, want, what):
    assert got is not None and got.shape == want.shape, what
    if want.numel():
        tol = 1e-5 * max(want.abs().max().item(), 1e-6)
        assert (got - want).abs().max().item() <= tol, what


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_tensor_parallel_matches_reference(world, mode, name):
    cfg, x, counts, weights = inputs(name, world, mode)
    per_rank = [r[(mode, name)] for r in results(world)]
    slices = f_slices(cfg.intermediate_size, world)
    assert [r["f_slice"] for r in per_rank] == slices
    assert all(r["same_init"] for r in per_rank)
    if cfg.dtype != torch.float32:  # bf16: the project's bf16 criterion, token by token
        ys = [r["y"] for r in per_rank]
        if mode == "replicated":
            for y in ys:
                assert epmoe.compare_to_reference(y, x, **weights, config=cfg).ok
        else:
            got = epmoe.compare_to_reference(torch.cat(ys), x, **weights, config=cfg,
                                             splits=counts)
            assert got.ok, str(got)
        return
    ref_y, ref_xg, ref_g = reference(cfg, x, counts, weights, mode)
    for g, r in enumerate(per_rank):
        a, b = slices[g]
        want = ref_y if mode == "replicated" else ref_y.split(counts)[g]
        close(r["y"], want, f"rank {g} output")
        want_xg = ref_xg if mode == "replicated" else ref_xg.split(counts)[g]
        close(r["x_grad"], want_xg, f"rank {g} input gradient")
        for n, want_g in ref_g.items():
            if n == "score_correction_bias":
                continue
            if n in EXPERT:  # this rank's columns of F (b_down: rank 0 holds its gradient)
                if n == "b_down":
                    want_n = want_g if g == 0 else torch.zeros_like(want_g)
                    got_n = r["grads"]["b_down"]
                    got_n = torch.zeros_like(want_g) if got_n is None else got_n
                else:
                    want_n = want_g[:, :, a:b] if n == "w_down" else want_g[:, a:b]
                    got_n = r["grads"][n]
                close(got_n, want_n, f"rank {g} {n} gradient")
    for n, want_g in ref_g.items():  # replicated weights
        if n in EXPERT or n == "score_correction_bias":
            continue
        if mode == "replicated":  # the same tokens everywhere: each rank has it all
            for g, r in enumerate(per_rank):
                close(r["grads"][n], want_g, f"rank {g} {n} gradient")
        else:  # each rank's tokens: the ranks' parts add up (as DDP would average)
            close(sum(r["grads"][n] for r in per_rank), want_g, f"{n} gradient")


@pytest.mark.parametrize("world", [2, 4])
def test_expert_memory_is_split_and_wire_counted(world):
    one = results(1)[0][("own", "base")]["bytes"]
    cfg, _, counts, _ = inputs("base", world, "own")
    for mode in MODES:
        per_rank = [r[(mode, "base")] for r in results(world)]
        assert sum(r["bytes"] for r in per_rank) == one  # every weight once over the group
        assert max(r["bytes"] for r in per_rank) == one // world
        s = per_rank[0]["stats"]
        row = H * 4
        if mode == "own":  # every token to every rank, the results back by reduce-scatter
            assert s.combine_bytes == [n * row for n in counts]
        else:  # a ring all-reduce: 2 (G - 1) / G of the [T, H] output per rank
            T = sum(counts)
            assert sum(s.combine_bytes) == 2 * (world - 1) * (T * row // world)


def _different_tokens() -> str:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=20)
    cfg = epmoe.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4,
                          parallelism="tensor", tp_tokens="replicated")
    layer = epmoe.ExpertParallelMoE(cfg, state)
    try:
        layer(torch.randn(3 + state.rank, 8))
    except ValueError as e:
        return str(e)
    return "no error"


def test_replicated_tokens_must_be_the_same_count():
    for msg in run_ranks(_different_tokens, 2):
        assert "tp_tokens='replicated' needs the same tokens on every rank" in msg
        assert "[3, 4]" in msg


def test_tensor_config_errors():
    with pytest.raises(ValueError, match="parallelism must be one of"):
        epmoe.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4, parallelism="data")
    with pytest.raises(ValueError, match="unset \\['num_redundant_experts'\\]"):
        epmoe.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4,
                        parallelism="tensor", num_redundant_experts=4)
    cfg = epmoe.MoEConfig(hidden_size=8, intermediate_size=3, num_experts=4,
                          parallelism="tensor")
    with pytest.raises(ValueError, match="intermediate_size=3 must be >= the 4 ranks"):
        cfg.check_ep_size(4)


def _bad_input(mode: str) -> str:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=20)
    cfg = epmoe.MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4,
                          parallelism="tensor", tp_tokens=mode)
    layer = epmoe.ExpertParallelMoE(cfg, state, name="layer 2")
    x = torch.randn(4, 7 if state.rank == 1 else 8)
    try:
        layer(x)
    except ValueError as e:
        out = f"{type(e).__name__}: {e}"
    else:
        out = "no error"
    with torch.no_grad():  # and the next forward works
        y = layer(torch.ones(4, 8))
    return out + f" | next forward {tuple(y.shape)}"


@pytest.mark.parametrize("mode", MODES)
def test_bad_input_on_one_rank_raises_on_every_rank(mode):
    r0, r1 = run_ranks(_bad_input, 2, mode)
    assert r1.startswith("InputError: layer 2 on rank 1 expects x of shape [T, 8]"), r1
    assert r0.startswith("PeerInputError: EP rank 1 could not run the dispatch of layer 2"), r0
    assert r0.endswith("next forward (4, 8)") and r1.endswith("next forward (4, 8)")
