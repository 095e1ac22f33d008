"""Peak memory of one huge, pathological forward, with and without chunks.

    python benchmarks/chunk_memory.py [--tokens 32768]

The Mixtral-like layer in bf16 on one process; every token routed to experts 0
and 1 (the router weight is zero but for their rows, the tokens positive). Each
setting of ``max_chunk_tokens`` runs in a fresh process, which reports its peak
resident memory (VmHWM) before and after the forward.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch, epmoe
from epmoe.benchmark import preset_config
torch.set_num_threads(1)
T, chunk = int(sys.argv[1]), int(sys.argv[2])
cfg = preset_config("mixtral", "bfloat16", "alltoall", T).replace(max_chunk_tokens=chunk)
layer = epmoe.ExpertParallelMoE(cfg, epmoe.single_process_state("cpu"))
with torch.no_grad():
    layer.router_weight.zero_()
    layer.router_weight[0], layer.router_weight[1] = 1.0, 0.5
x = torch.rand(T, cfg.hidden_size).bfloat16()
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
before = hwm()
with torch.no_grad():
    layer(x)
print(json.dumps(dict(tokens=T, max_chunk_tokens=chunk, chunks=layer.chunks,
                      peak_rows=layer.peak_rows, before_mib=before, after_mib=hwm())))
"""


def main(tokens: int, json_out: str | None) -> None:
    rows = []
    for chunk in (8192, tokens):  # the default, and one chunk of everything
        out = subprocess.run([sys.executable, "-c", CHILD, str(tokens), str(chunk)],
                             capture_output=True, text=True, check=True, timeout=600)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"max_chunk_tokens={chunk}: {tokens} tokens, all to experts 0 and 1: "
              f"{r['chunks']} chunk(s), at most {r['peak_rows']} rows at once; the forward "
              f"raised the peak resident memory by {r['after_mib'] - r['before_mib']:.0f} MiB "
              f"({r['before_mib']:.0f} -> {r['after_mib']:.0f} MiB)")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--json", dest="json_out", default=None)
    main(**vars(p.parse_args()))
