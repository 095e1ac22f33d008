"""Expert parallelism, step by step, on a small MoE layer.

    torchrun --nproc_per_node=2 demo.py              # GPUs if there are 2, else CPU
    torchrun --nproc_per_node=2 demo.py --force-cpu  # CPU (gloo) even with GPUs
    torchrun --nproc_per_node=4 demo.py --experts 10 --top-k 3 --dtype bfloat16
    python demo.py                                   # one process: EP=1
    torchrun --nproc_per_node=2 demo.py --compare    # then EP beside TP, measured

Every rank routes its own tokens, sends them to the ranks that hold their
experts, computes its local experts and sends the results back. Rank 0 prints
what all ranks saw, then checks the EP output against ``epmoe.reference_moe``
on all ranks' tokens and prints PASS or FAIL (exit code 1 on FAIL). With
``--compare`` it then runs the same layer tensor-parallel too and prints the
EP-vs-TP table (``epmoe.tp_compare``) for prefill and decode batches.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

import epmoe
from epmoe.collectives import gather_objects
from epmoe.stats import PHASES


def print0(state: epmoe.ParallelState, *args) -> None:
    if state.rank == 0:
        print(*args, flush=True)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("    " + line for line in lines)


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(
    experts: int = 8,
    top_k: int = 2,
    tokens: int = 16,
    hidden: int = 64,
    intermediate: int = 128,
    dtype: str = "float32",
    placement: str = "linear",
    seed: int = 0,
    show_tokens: int = 4,
    force_cpu: bool = False,
    compare: bool = False,
    prefill_tokens: int = 512,
    decode_tokens: int = 8,
    reps: int = 9,
) -> bool:
    """Run the demo; True when the EP output matches the reference. Bad options raise ValueError."""
    cfg = epmoe.MoEConfig(hidden_size=hidden, intermediate_size=intermediate, num_experts=experts,
                          top_k=top_k, dtype=dtype, placement=placement)
    if tokens < 0 or show_tokens < 0:
        raise ValueError(f"--tokens and --show-tokens must be >= 0, got {tokens}, {show_tokens}")
    if compare and min(prefill_tokens, decode_tokens, reps) < 1:
        raise ValueError("--prefill-tokens, --decode-tokens and --reps must be >= 1")
    if compare and intermediate < 1:
        raise ValueError("--intermediate must be >= 1")
    state = epmoe.init_distributed(force_cpu=force_cpu)
    try:
        ok = _run(state, cfg, tokens, seed, show_tokens)
        if compare:
            _compare(state, cfg, prefill_tokens, decode_tokens, reps, seed)
        return ok
    finally:
        epmoe.destroy_distributed()


def _run(state: epmoe.ParallelState, cfg: epmoe.MoEConfig, tokens: int, seed: int,
         show_tokens: int) -> bool:
    experts, top_k, hidden = cfg.num_experts, cfg.top_k, cfg.hidden_size
    layer = epmoe.ExpertParallelMoE(cfg, state, seed=seed, collect_stats=True)
    gen = torch.Generator().manual_seed(seed * 1000 + state.rank)  # each rank its own tokens
    x = torch.randn(tokens, hidden, generator=gen).to(cfg.dtype).to(state.device)
    with torch.no_grad():
        y = layer(x)
        weights, ids = epmoe.route(x, layer.router_weight, cfg)  # to show the routing
    s = layer.last_stats
    owner = layer.expert_map.owner
    G, W = state.ep_size, state.world_size

    print0(state, f"epmoe demo: {W} rank(s), EP groups of {G} (DP={state.dp_size}), "
                  f"backend {state.backend or 'none'}, device {state.device.type}")
    dtype = str(cfg.dtype).removeprefix("torch.")
    print0(state, f"  layer: {experts} experts, top-{top_k}, hidden {hidden}, intermediate "
                  f"{cfg.intermediate_size}, {dtype}, {cfg.placement} placement; "
                  f"{tokens} tokens per rank\n")

    print0(state, "Expert map: each rank holds only its own experts")
    for r in range(G):
        held = ", ".join(map(str, layer.expert_map.experts_on(r)))
        print0(state, f"    rank {r}: experts {held}")

    # Step 1: routing, first tokens of every rank
    n = min(show_tokens, tokens)
    mine = [(t, ids[t].tolist(), weights[t].tolist()) for t in range(n)]
    everyone = gather_objects(mine, dist.group.WORLD)
    print0(state, "\nStep 1 - router: every rank scores its own tokens and picks top-k experts")
    for r, routed in enumerate(everyone):
        for t, eids, ws in routed:
            picks = ", ".join(f"Expert {e} (rank {owner[e]}, w={w:.2f})"
                              for e, w in zip(eids, ws, strict=True))
            print0(state, f"    rank {r} token {t} -> {picks}")

    # Step 2: dispatch
    choices = [0] * G  # (token, expert) choices per destination rank
    for e, c in enumerate(s.tokens_per_expert):
        choices[owner[e]] += c
    rows = gather_objects(dict(send=s.send_rows, choices=choices, recv=s.recv_rows,
                              dispatch=s.dispatch_bytes, combine=s.combine_bytes,
                              local=s.recv_per_local_expert, experts=layer.local_experts,
                              mem=layer.expert_weight_bytes(), seconds=s.seconds),
                          dist.group.WORLD)
    print0(state, "\nStep 2 - dispatch (all-to-all): token rows sent, from rank (row) to rank")
    print0(state, table(["from \\ to"] + [f"rank {j}" for j in range(G)] + ["choices", "bytes out"],
                        [[f"rank {r}"] + o["send"] + [sum(o["choices"]),
                         sum(b for j, b in enumerate(o["dispatch"]) if j != r % G)]
                         for r, o in enumerate(rows)]))
    n_rows = sum(sum(o["send"]) for o in rows)
    n_choices = sum(sum(o["choices"]) for o in rows)
    print0(state, f"    {n_choices} (token, expert) choices travel as {n_rows} token rows: a token "
                  "goes once to each rank holding any of its experts.")
    print0(state, "    (the diagonal stays on its rank; 'bytes out' counts the other ranks)")

    print0(state, "\nStep 3 - experts: each rank runs its local experts on the rows it received")
    for r, o in enumerate(rows):
        per = ", ".join(f"expert {e}: {c}" for e, c in zip(o["experts"], o["local"], strict=True))
        print0(state, f"    rank {r}: received {sum(o['recv'])} rows -> {per}")

    print0(state, "\nStep 4 - combine (all-to-all back): each rank returns one partial sum per "
                  "row it received,\n    and each token's partial sums are added in token order")
    print0(state, table(["rank", "rows returned", "bytes out", "router ms", "dispatch ms",
                         "experts ms", "combine ms"],
                        [[r, sum(o["recv"]), sum(b for j, b in enumerate(o["combine"])
                                                 if j != r % G)]
                         + [f"{1e3 * o['seconds'][p]:.2f}" for p in PHASES]
                         for r, o in enumerate(rows)]))

    # Memory and the check against the reference, on rank 0.
    with torch.no_grad():
        x_all, splits = epmoe.all_gather_v(x, state.ep_group)
        y_all, _ = epmoe.all_gather_v(y, state.ep_group)
    verdict = [None]
    if state.rank == 0:
        full = epmoe.full_weights(cfg, seed)
        full_bytes = sum(w.numel() * w.element_size() for w in full[1:])
        print0(state, "\nMemory: expert weights held per rank (measured parameter bytes)")
        for r, o in enumerate(rows[:G]):
            print0(state, f"    rank {r}: {mib(o['mem'])} ({len(o['experts'])} of {experts} "
                          f"experts)")
        most = max(o["mem"] for o in rows)
        print0(state, f"    full replica: {mib(full_bytes)} -> {full_bytes / most:.2f}x less "
                      f"on the fullest rank (EP={G})")
        verdict = [check(cfg, x_all.cpu(), y_all.cpu(), full, splits)]
    if W > 1:
        dist.broadcast_object_list(verdict, src=0)
    return verdict[0]


def _compare(state: epmoe.ParallelState, cfg: epmoe.MoEConfig, prefill: int, decode: int,
             reps: int, seed: int) -> None:
    from epmoe.tp_compare import compare, text_table

    sizes = {f"prefill {prefill}/rank": prefill, f"decode {decode}/rank": decode}
    cfg.replace(parallelism="tensor").check_ep_size(state.ep_size)
    results = compare(state, cfg, sizes, reps=reps, seed=seed)
    print0(state, f"\nEP beside TP on the same tokens ({state.ep_size} rank(s); the same "
                  "layer and weights; TP, replicated: every rank passes the whole batch):")
    print0(state, text_table(results, sizes))
    print0(state, "    bytes: tokens, routing and results a rank sends (headers aside); ms: "
                  f"median of {reps} interleaved forwards, the slower rank; error: max abs "
                  "against reference_moe on the whole batch (check: compare_to_reference)."
                  "\n    Collectives as "
                  "counted in one forward: the first all-gather or all-to-all carries sizes "
                  "and error headers;\n    TP's reduce-scatter runs as an all-to-all and a "
                  "local sum (gloo has no uneven reduce-scatter).")


def check(cfg: epmoe.MoEConfig, x, y, weights, splits: list[int] | None = None) -> bool:
    result = epmoe.compare_to_reference(y, x, *weights, cfg, splits=splits)
    print(f"\nCheck: EP output vs reference_moe on all {x.shape[0]} tokens of the EP group: "
          f"{result}", flush=True)
    return result.ok


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=8, help="number of experts (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--tokens", type=int, default=16, help="tokens per rank (default 16)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--intermediate", type=int, default=128, help="expert MLP size (default 128)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--placement", default="linear", choices=["linear", "round_robin"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-tokens", type=int, default=4, help="tokens per rank in the routing "
                                                              "table (default 4)")
    p.add_argument("--force-cpu", action="store_true", help="use CPU and gloo even with GPUs")
    p.add_argument("--compare", action="store_true",
                   help="then run the layer tensor-parallel too and print EP beside TP")
    p.add_argument("--prefill-tokens", type=int, default=512,
                   help="--compare: tokens per rank of the prefill batch (default 512)")
    p.add_argument("--decode-tokens", type=int, default=8,
                   help="--compare: tokens per rank of the decode batch (default 8)")
    p.add_argument("--reps", type=int, default=9, help="--compare: timed forwards (default 9)")
    try:
        ok = main(**vars(p.parse_args()))
    except ValueError as e:  # a bad option: say which, without a traceback
        p.error(str(e))
    sys.exit(0 if ok else 1)
