"""The command line: ``python -m epmoe <command> ...``, one module per command.

    torchrun --nproc_per_node=2 -m epmoe generate --model DIR --prompt "Hello" --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import RankFailure
from ..health import hard_exit

COMMANDS = {
    "serve": "serve a Hugging Face MoE checkpoint over an OpenAI-compatible API, expert-parallel",
    "generate": "generate from a Hugging Face MoE checkpoint, all prompts batched, expert-parallel",
    "bench": "benchmark the MoE layer: presets, modes, dtypes, dispatch backends",
    "check": "check the EP layer against the reference on this world (also across hosts)",
    "eplb": "simulate expert placement (EPLB) for a deployment: balance and memory per rank",
    "train": "train a small MoE model expert-parallel: AdamW, checkpoints per rank, resume",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m epmoe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f".{name}", __name__)
        module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    module = importlib.import_module(f".{args.command}", __name__)
    kwargs = {k: v for k, v in vars(args).items() if k != "command"}
    # Under torchrun with peers, leave without the interpreter's teardown (health.hard_exit).
    leave = hard_exit if int(os.environ.get("WORLD_SIZE", "1")) > 1 else sys.exit
    try:
        code = module.main(**kwargs)
    except ValueError as e:  # bad input: say what and why, without a traceback
        print(f"python -m epmoe {args.command}: error: {e}", file=sys.stderr)
        leave(2)
    except RankFailure as e:  # another rank died, stalled or became unreachable
        print(f"python -m epmoe {args.command}: {e}", file=sys.stderr)
        hard_exit(3)  # (not sys.exit: the broken process group aborts at exit)
    leave(code or 0)
