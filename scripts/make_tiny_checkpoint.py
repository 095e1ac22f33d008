"""Write a tiny random Hugging Face checkpoint of a supported MoE family (no download).

    python scripts/make_tiny_checkpoint.py --family deepseek_v3 --out tiny-deepseek
    torchrun --nproc_per_node=2 -m epmoe generate --model tiny-deepseek --prompt "Hello"

The model is transformers' own class with random weights, saved with
``save_pretrained``, with a byte-level tokenizer beside it.
"""

from __future__ import annotations

import argparse

from epmoe.config import parse_dtype
from epmoe.hf.tiny import TINY_FAMILIES, save_tiny_checkpoint


def main(family: str, out: str, seed: int = 0, dtype: str = "float32",
         max_shard_size: str | None = None) -> None:
    path = save_tiny_checkpoint(family, out, seed=seed, dtype=parse_dtype(dtype),
                                max_shard_size=max_shard_size)
    print(f"wrote a tiny random {family} checkpoint to {path}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", required=True, choices=sorted(TINY_FAMILIES))
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--max-shard-size", default=None, help='e.g. "200KB": a sharded checkpoint')
    main(**vars(p.parse_args()))
