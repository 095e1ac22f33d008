"""Property-based tests (hypothesis) of dispatch and combine, on 1 to 4 gloo ranks.

For random token counts per rank (0 included), expert ids and weights given
directly (not by the router), placements, and ``low_latency`` capacities, every
backend must return every token exactly once, in its place, with the weighted
sum of its experts. After ``dispatcher.start(...).wait()`` two expert
computations stand in, each combined back with ``dispatcher.combine_start``:

- **traceable experts**: global expert g maps a row x to ``(g + 1) * x + b_g``.
  Tokens, weights and ``b_g`` are multiples of small powers of two, small
  enough that every product and sum is exact in fp32 whatever the order: the
  combined output must equal the per-token sum ``sum_j w_j ((id_j + 1) x + b_id_j)``
  bit for bit. Column 0 of every token is its own number (1-based, over the EP
  group), so a token lost, sent twice to a rank, run by the wrong expert or
  returned to another place changes its output row.
- **the layer's own expert computation** (``ExpertParallelMoE._compute``, as in
  ``_one_batch``) against a plain per-token loop in fp64 on the same ids and weights.

Hypothesis runs inside every rank with the same derandomised settings, so every
rank draws the same examples (each takes its own tokens from them). Each
example's verdict is gathered over the EP group and all ranks fail it together:
an assertion on one rank alone would leave the others waiting in the next
collective. Shrinking then proceeds in step on every rank, since every rank
sees the same outcomes. An exception inside the collectives cannot be agreed on
(the other ranks may be inside a collective), so it stops the rank at once
(:class:`RankError`), and the harness reports every rank's traceback.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from multiproc import run_ranks

import epmoe
from epmoe.config import BACKENDS, PLACEMENTS
from epmoe.experts import expert_mlp, gated_activation

H, F_ = 8, 8  # hidden and intermediate size: tiny, the properties are about indices
MAX_TOKENS = 12  # per rank and example
MAX_EXPERTS = 10
EXAMPLES = {1: 25, 2: 40, 3: 30, 4: 30}  # per EP size (+3 fixed): ~25 s on 2 cores in all
SETTINGS = settings(
    derandomize=True,  # the same examples on every rank, and on every run
    database=None,  # no saved examples (ranks would not share one)
    deadline=None,  # timing differs between ranks: it must not decide anything
    suppress_health_check=list(HealthCheck),  # nor the timing-based health checks
    phases=(Phase.explicit, Phase.generate, Phase.shrink),  # no explain: only a report
    print_blob=False,
)


class RankError(BaseException):
    """An exception inside dispatch or combine on this rank. Not an ``Exception``,
    so hypothesis does not retry or shrink on it (the other ranks could not follow)."""


# ----------------------------------------------------------------- examples


@st.composite
def examples(draw, G: int) -> dict:
    """One dispatch problem for an EP group of G ranks (every rank's tokens)."""
    E = draw(st.integers(G, MAX_EXPERTS))
    k = draw(st.integers(1, min(E, 4)))
    # Tokens choose among `pool` experts (from `shift`, cyclically): pool == k sends
    # every token to the same k experts, the most skewed routing there is.
    pool = draw(st.integers(k, E))
    counts = draw(st.lists(st.integers(0, MAX_TOKENS), min_size=G, max_size=G))
    token = st.tuples(st.lists(st.integers(0, pool - 1), min_size=k, max_size=k, unique=True),
                      st.lists(st.integers(0, 16), min_size=k, max_size=k))  # weights * 8
    routing = [draw(st.lists(token, min_size=n, max_size=n)) for n in counts]
    return dict(E=E, k=k, placement=draw(st.sampled_from(PLACEMENTS)),
                shift=draw(st.integers(0, E - 1)), counts=counts, routing=routing,
                spare=draw(st.integers(0, 3)), seed=draw(st.integers(0, 2**16)))


def fixed_examples(G: int) -> list[dict]:
    """Always tried first: no tokens anywhere; every token of every rank to the last
    expert only (k=1, all on the last rank); every token to every expert (k=E)."""
    E = max(G, 4)
    none = dict(E=E, k=2, placement="linear", shift=0, counts=[0] * G,
                routing=[[] for _ in range(G)], spare=0, seed=0)
    hot = dict(E=E, k=1, placement="linear", shift=E - 1, counts=[5] * G,
               routing=[[([0], [8])] * 5 for _ in range(G)], spare=0, seed=1)
    every = dict(E=E, k=E, placement="round_robin", shift=0, counts=[3] * G,
                 routing=[[(list(range(E)), list(range(1, E + 1)))] * 3 for _ in range(G)],
                 spare=1, seed=2)
    return [none, hot, every]


def digest(ex: dict) -> int:
    """A 63-bit hash of an example, equal on every rank that drew the same one."""
    return int.from_bytes(hashlib.sha256(repr(ex).encode()).digest()[:8], "big") >> 1


def rank_inputs(ex: dict, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's ``x [T, H]`` (column 0: the token's number in the group, over 16),
    ``weights [T, k]`` (multiples of 1/8 in [0, 2]) and ``ids [T, k]``."""
    T, k, E = ex["counts"][rank], ex["k"], ex["E"]
    routing = ex["routing"][rank]
    ids_TK = (torch.tensor([ids for ids, _ in routing], dtype=torch.long).reshape(T, k)
              + ex["shift"]) % E
    weights_TK = torch.tensor([w for _, w in routing], dtype=torch.float32).reshape(T, k) / 8
    gen = torch.Generator().manual_seed(ex["seed"] * 8 + rank)
    x_TH = torch.randint(-16, 17, (T, H), generator=gen).float() / 16
    first = sum(ex["counts"][:rank])
    x_TH[:, 0] = (first + torch.arange(T) + 1).float() / 16
    return x_TH, weights_TK, ids_TK


# ----------------------------------------------------------------- experts


def trace_bias(E: int) -> torch.Tensor:
    """``b [E, H]``: small distinct integers per expert and column."""
    g, j = torch.arange(E).view(E, 1), torch.arange(H).view(1, H)
    return ((3 * g + 5 * j) % 11 - 5).float()


def traceable_experts(x_NH: torch.Tensor, local_NK: torch.Tensor, w_NK: torch.Tensor,
                      local_experts: tuple[int, ...], E: int) -> tuple[torch.Tensor, list[str]]:
    """Each received row's weighted sum over its local slots of ``(g + 1) x + b_g``
    (exact in fp32 for these inputs), and what is wrong with the received slots."""
    e = len(local_experts)
    problems = []
    if ((local_NK < -1) | (local_NK >= e)).any():
        problems.append(f"received local expert ids outside -1..{e - 1}: "
                        f"{sorted(set(local_NK.flatten().tolist()))}")
    glob_NK = torch.tensor(local_experts)[local_NK.clamp(0, e - 1)]  # [N, k]
    out_NKH = (glob_NK + 1).float().unsqueeze(2) * x_NH.unsqueeze(1) + trace_bias(E)[glob_NK]
    here_NK1 = ((local_NK >= 0) & (local_NK < e)).unsqueeze(2)
    partial_NH = torch.where(here_NK1, w_NK.unsqueeze(2) * out_NKH, 0.0).sum(1)
    return partial_NH, problems


def traceable_expected(x_TH, weights_TK, ids_TK, E: int) -> torch.Tensor:
    """The per-token weighted sum of the traceable experts, in fp64 (exact), as fp32."""
    w = weights_TK.double()
    scale_T1 = (w * (ids_TK + 1).double()).sum(1, keepdim=True)
    bias_TH = (w.unsqueeze(2) * trace_bias(E).double()[ids_TK]).sum(1)
    return (scale_T1 * x_TH.double() + bias_TH).float()


def loop_expected(x_TH, weights_TK, ids_TK, cfg: epmoe.MoEConfig) -> torch.Tensor:
    """The layer's experts (seed 0), one token and one slot at a time, in fp64."""
    _, gate, up, down = epmoe.full_weights(cfg, seed=0)
    glu = gated_activation(cfg)
    y_TH = torch.zeros(x_TH.shape, dtype=torch.float64)
    for t in range(x_TH.shape[0]):
        for w, g in zip(weights_TK[t].tolist(), ids_TK[t].tolist(), strict=True):
            w_gate_up = torch.cat([gate[g], up[g]]).double()
            y_TH[t] += w * expert_mlp(x_TH[t : t + 1].double(), w_gate_up, down[g].double(),
                                      glu)[0]
    return y_TH


# ----------------------------------------------------------------- one example


def check_example(state, ex: dict) -> list[str]:
    """Every backend on this rank's tokens of ``ex``: what is wrong here (empty: nothing)."""
    x_TH, weights_TK, ids_TK = rank_inputs(ex, state.ep_rank)
    problems = []
    want_real = None
    for backend in BACKENDS:
        cap = max(ex["counts"] + [1]) + ex["spare"] if backend == "low_latency" else 0
        cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, num_experts=ex["E"],
                              top_k=ex["k"], placement=ex["placement"], all2all_backend=backend,
                              max_tokens_per_rank=cap)
        if want_real is None:
            want_real = loop_expected(x_TH, weights_TK, ids_TK, cfg)
        try:
            with torch.no_grad():
                layer = epmoe.ExpertParallelMoE(cfg, state, seed=0)
                d = layer.dispatcher
                received, handle = d.start(x_TH, weights_TK, ids_TK).wait()
                traced_NH, bad = traceable_experts(*received, layer.local_experts, ex["E"])
                y_trace = d.combine_start(traced_NH, handle).wait()
                # The same handle serves a second combine: combine only reads it.
                partial_NH, _ = layer._compute(received)
                y_real = d.combine_start(partial_NH, handle).wait()
        except Exception as e:
            raise RankError(f"rank {state.rank}, {backend}, example {ex}: "
                            f"{type(e).__name__}: {e}") from e
        where = f"rank {state.rank} {backend}"
        problems += [f"{where}: {p}" for p in bad]
        if y_trace.shape != x_TH.shape or y_real.shape != x_TH.shape:
            problems.append(f"{where}: output shapes {tuple(y_trace.shape)}, "
                            f"{tuple(y_real.shape)}, expected {tuple(x_TH.shape)}")
            continue
        want = traceable_expected(x_TH, weights_TK, ids_TK, ex["E"])
        if not torch.equal(y_trace, want):
            rows = (y_trace != want).any(1).nonzero().flatten().tolist()
            problems.append(f"{where}: traceable experts: tokens {rows} differ; first got "
                            f"{y_trace[rows[0]].tolist()}, want {want[rows[0]].tolist()}")
        err = (y_real.double() - want_real).abs().max().item() if y_real.numel() else 0.0
        tol = 1e-5 * max(want_real.abs().max().item() if y_real.numel() else 0.0, 1e-6)
        if not err <= tol:
            problems.append(f"{where}: layer experts vs fp64 loop: max abs error {err:.3g} > "
                            f"{tol:.3g}")
    return problems


def agree(state, problems: list[str], ex_digest: int) -> list[str]:
    """Every rank's problems with this example, the same list on every rank (a
    collective: every rank calls it once per example)."""
    mine = torch.tensor([int(bool(problems)), ex_digest], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(state.ep_size)]
    try:
        dist.all_gather(everyone, mine, group=state.ep_group)
    except Exception as e:  # a peer gone: nothing left to agree with
        raise RankError(f"rank {state.rank}: verdict exchange: {type(e).__name__}: {e}") from e
    flags, digests = zip(*(t.tolist() for t in everyone), strict=True)
    if len(set(digests)) != 1:  # cannot happen with derandomize; would desynchronise
        raise RankError(f"ranks drew different examples: digests {digests}")
    if not any(flags):
        return []
    texts: list = [None] * state.ep_size
    dist.all_gather_object(texts, problems, group=state.ep_group)
    return [p for t in texts for p in t]


# ----------------------------------------------------------------- ranks


def _property_worker(max_examples: int) -> dict:
    # Hypothesis mixes constants from the local source files into its draws, and caches
    # them on disk. Each rank keeps its own cache: ranks writing one file at once could
    # read each other's half-written copy, and then draw different examples.
    with tempfile.TemporaryDirectory(prefix="epmoe-hypothesis-") as home:
        os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = home
        return _properties(max_examples)


def _properties(max_examples: int) -> dict:
    state = epmoe.init_distributed(force_cpu=True, timeout_s=30)
    G = state.ep_size
    seen = {"examples": 0, "digests": hashlib.sha256(), "rank_without_tokens": 0,
            "no_tokens_at_all": 0, "one_rank_receives_all": 0}

    def record(ex: dict) -> None:
        seen["examples"] += 1
        seen["digests"].update(repr(ex).encode())
        seen["rank_without_tokens"] += 0 in ex["counts"]
        seen["no_tokens_at_all"] += sum(ex["counts"]) == 0
        emap = epmoe.expert_map(ex["E"], G, ex["placement"])
        owners = {emap.owner[(i + ex["shift"]) % ex["E"]] for r in ex["routing"]
                  for ids, _ in r for i in ids}
        seen["one_rank_receives_all"] += len(owners) == 1 and G > 1

    @settings(SETTINGS, max_examples=max_examples)
    @given(ex=examples(G))
    def dispatch_and_combine(ex: dict) -> None:
        record(ex)
        problems = agree(state, check_example(state, ex), digest(ex))
        assert not problems, "\n".join(problems)

    for fixed in reversed(fixed_examples(G)):  # run first to last, like stacked @example
        dispatch_and_combine = example(ex=fixed)(dispatch_and_combine)
    dispatch_and_combine()
    return {**seen, "digests": seen["digests"].hexdigest()}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_token_returns_once_with_its_weighted_sum(world: int):
    per_rank = run_ranks(_property_worker, world, EXAMPLES[world], deadline_s=240)
    first = per_rank[0]
    # Every rank ran the same examples, in the same order.
    assert all(r["digests"] == first["digests"] for r in per_rank)
    assert all(r["examples"] == first["examples"] for r in per_rank)
    assert first["examples"] >= EXAMPLES[world]  # the fixed ones come on top
    # The cases that matter came up (the draws are derandomised: stable).
    assert first["no_tokens_at_all"] >= 1
    if world > 1:
        assert first["rank_without_tokens"] >= 2
        assert first["one_rank_receives_all"] >= 1
