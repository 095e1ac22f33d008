"""Memory bandwidth of this machine, and the decode-step floor it sets for the serving model.

    python benchmarks/membw.py                    # writes benchmarks/results/membw_<date>.json
    python benchmarks/membw.py --size-mb 256 --reps 5 --batch 32 --context 160

Measured (median of ``reps`` runs, each over a ``size_mb`` buffer, far larger
than the caches):

* read bandwidth: ``x.sum()`` of an fp32 tensor (bytes read / time), and copy
  bandwidth: ``dst.copy_(src)`` (bytes read + written / time); in one process
  with 1 and with 2 threads, and in 2 processes of 1 thread each reading at once
  (the 2-rank server's case: each rank is one process on one core);
* the time of one all-to-all over gloo between 2 local processes, "empty"
  (one element per peer: the latency) and with a decode step's payload.

The floor of one decode step per rank (EP=2, attention data-parallel, so each
rank holds ``batch/2`` sequences and every dense weight):

    bytes read / per-rank read bandwidth (2 processes at once)
      + MoE layers x 2 all-to-alls (dispatch, combine)

bytes read = the rank's experts that the batch activates (all 4 of its 8
when ``batch`` tokens pick top-2 among 8; the expected number at batch 1)
+ attention, router, norms and lm_head + KV cache of its sequences. Weights are
bf16 as the checkpoint is. A floor, not a prediction: it ignores compute,
activations and the host's Python per step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _median_s(fn, reps: int) -> float:
    fn()  # warm: page faults, thread pool
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidth_gbs(size_mb: int, reps: int) -> dict:
    """Read (sum) and copy bandwidth in GB/s (1e9 bytes/s) with the current thread count."""
    n = size_mb * 2**20 // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    t_read = _median_s(lambda: src.sum(), reps)
    t_copy = _median_s(lambda: dst.copy_(src), reps)
    return {"read_gbs": nbytes / t_read / 1e9, "copy_gbs": 2 * nbytes / t_copy / 1e9}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, size_mb: int, reps: int, payload: int,
               out: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        dist.barrier()
        bw = bandwidth_gbs(size_mb, reps)  # both ranks read at once
        dist.barrier()

        def a2a(numel: int) -> float:
            x = torch.zeros(world * numel, dtype=torch.bfloat16)
            y = torch.empty_like(x)

            def step():
                dist.all_to_all_single(y, x)

            step()
            times = []
            for _ in range(max(reps, 20) * 5):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        result = {**bw, "a2a_empty_s": a2a(1), "a2a_payload_s": a2a(payload)}
        out[rank] = result
    finally:
        dist.destroy_process_group()


def two_rank_measure(size_mb: int, reps: int, payload: int) -> dict:
    """Per-rank bandwidth with both ranks reading at once, and all-to-all times (slowest rank)."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(2, _free_port(), size_mb, reps, payload, out), nprocs=2)
        ranks = [dict(out[r]) for r in range(2)]
    return {"read_gbs_per_rank": min(r["read_gbs"] for r in ranks),
            "copy_gbs_per_rank": min(r["copy_gbs"] for r in ranks),
            "a2a_empty_s": max(r["a2a_empty_s"] for r in ranks),
            "a2a_payload_s": max(r["a2a_payload_s"] for r in ranks)}


def model_shape(model_dir: str | None) -> dict:
    """The Qwen3-MoE fields that size a decode step: the checkpoint's config.json when
    given and present, else benchmarks/serving_model.py's constants."""
    path = Path(model_dir) / "config.json" if model_dir else None
    if path and path.exists():
        cfg = json.loads(path.read_text())
        cfg.setdefault("num_experts", cfg.get("num_local_experts"))
        return cfg
    from serving_model import MODEL, VOCAB

    return {**MODEL, "vocab_size": VOCAB}


def decode_bytes_per_rank(cfg: dict, ranks: int, batch: int, context: int,
                          dtype_bytes: int = 2) -> dict:
    """Bytes one rank reads in one decode step; see the module docstring."""
    h, layers, e, k = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_experts"],
                       cfg["num_experts_per_tok"])
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    expert = 3 * h * cfg["moe_intermediate_size"]  # gate, up, down
    local = e // ranks
    # Expected distinct local experts hit by t tokens, each choosing k of e at random.
    def hit(t: int) -> float:
        p_miss_one = 1 - k / e
        return local * (1 - p_miss_one ** t)

    attn = h * (2 * q + 2 * kv) + 2 * hd + 2 * h  # q,k,v,o; q/k norms; 2 RMSNorms
    dense = layers * (attn + e * h) + h + cfg["vocab_size"] * h  # + router; final norm; lm_head
    seqs = -(-batch // ranks)  # sequences on this rank (attention data-parallel)
    kv_cache = layers * 2 * kv * context * seqs
    experts_batch = layers * hit(batch) * expert
    experts_one = layers * hit(1) * expert
    return {"dense_bytes": dense * dtype_bytes,
            "experts_bytes_all_local": layers * local * expert * dtype_bytes,
            "experts_bytes_batch": experts_batch * dtype_bytes,
            "experts_bytes_batch1": experts_one * dtype_bytes,
            "kv_bytes_batch": kv_cache * dtype_bytes,
            "kv_bytes_batch1": layers * 2 * kv * context * dtype_bytes,
            "moe_layers": layers, "local_experts": local, "sequences_per_rank": seqs}


def main(size_mb: int = 512, reps: int = 7, batch: int = 32, context: int = 160,
         model_dir: str | None = str(HERE / ".serving_model"), out: str | None = None) -> dict:
    """Measure, compute the floor, print and write JSON (``out`` or benchmarks/results/)."""
    result: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    threads0 = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        result[f"one_process_{threads}_threads"] = bandwidth_gbs(size_mb, reps)
    torch.set_num_threads(threads0)
    cfg = model_shape(model_dir)
    payload = (-(-batch // 2)) * cfg["num_experts_per_tok"] * cfg["hidden_size"]  # bf16 elems
    two = two_rank_measure(size_mb, reps, payload)
    result["two_processes_1_thread_each"] = two
    b = decode_bytes_per_rank(cfg, ranks=2, batch=batch, context=context)
    bw = two["read_gbs_per_rank"] * 1e9
    a2a = b["moe_layers"] * 2
    floor = {}
    for name, experts, kv, t_a2a in (
            (f"batch_{batch}", b["experts_bytes_batch"], b["kv_bytes_batch"],
             two["a2a_payload_s"]),
            ("batch_1", b["experts_bytes_batch1"], b["kv_bytes_batch1"], two["a2a_empty_s"])):
        read_s = (b["dense_bytes"] + experts + kv) / bw
        floor[name] = {"bytes_per_rank": b["dense_bytes"] + experts + kv,
                       "memory_s": read_s, "all_to_all_s": a2a * t_a2a,
                       "step_s": read_s + a2a * t_a2a}
    step = floor[f"batch_{batch}"]["step_s"]
    floor[f"batch_{batch}"]["output_tok_s_ceiling"] = batch / step
    result.update(bytes=b, floor=floor, config=dict(size_mb=size_mb, reps=reps, batch=batch,
                                                    context=context, model_dir=model_dir,
                                                    a2a_payload_elems=payload))

    print(f"bandwidth GB/s (read sum / copy), {size_mb} MiB, median of {reps}:")
    for key in ("one_process_1_threads", "one_process_2_threads"):
        print(f"  {key:<28} {result[key]['read_gbs']:7.2f} / {result[key]['copy_gbs']:7.2f}")
    print(f"  {'2 processes, per rank':<28} {two['read_gbs_per_rank']:7.2f} / "
          f"{two['copy_gbs_per_rank']:7.2f}")
    print(f"gloo all-to-all, 2 ranks: empty {two['a2a_empty_s'] * 1e6:.0f} us, "
          f"{payload * 2 / 1024:.0f} KiB/peer {two['a2a_payload_s'] * 1e6:.0f} us")
    for name, f in floor.items():
        print(f"decode floor per rank, {name}: {f['bytes_per_rank'] / 1e6:.1f} MB read "
              f"-> {f['memory_s'] * 1e3:.2f} ms + {a2a} all-to-alls {f['all_to_all_s'] * 1e3:.2f}"
              f" ms = {f['step_s'] * 1e3:.2f} ms/step")
    print(f"  => at most {floor[f'batch_{batch}']['output_tok_s_ceiling']:.0f} output tok/s "
          f"for {batch} sequences decoding on 2 ranks")
    path = Path(out) if out else HERE / "results" / f"membw_{datetime.date.today()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=512, help="buffer size per measurement")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--batch", type=int, default=32, help="sequences decoding together")
    p.add_argument("--context", type=int, default=160, help="tokens in each sequence's KV cache")
    p.add_argument("--model-dir", default=str(HERE / ".serving_model"),
                   help="checkpoint whose config.json sizes the step")
    p.add_argument("--out", default=None)
    main(**vars(p.parse_args()))
