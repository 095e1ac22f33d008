"""Train a small Hugging Face MoE model expert-parallel: AdamW, checkpoints per rank, resume.

    torchrun --nproc_per_node=2 -m epmoe train --out runs/mixtral --steps 300
    torchrun --nproc_per_node=2 -m epmoe train --out runs/mixtral --steps 400 --resume
    torchrun --nproc_per_node=2 -m epmoe train --out runs/bias --bias-update-rate 0.01

The model is a tiny random one of ``--family`` (transformers' own class, written by
``save_pretrained`` to ``OUT/init`` and loaded with :func:`epmoe.hf.from_pretrained`),
or ``--model DIR``. The task is synthetic (``a+b=c`` lines, :mod:`epmoe.text_tasks`)
or ``--text FILE``; every rank trains on its own sequences. A step: forward, the
next-token loss (plus the balancing losses' share when asked for), backward,
:func:`epmoe.training.average_gradients` (expert gradients stay on their rank),
global gradient-norm clipping, AdamW, DeepSeek-V3's bias update when asked for.

Balancing, each off by default: ``--aux-loss-coef`` (Switch/GShard), ``--z-loss-coef``
(router z-loss), ``--bias-update-rate`` (auxiliary-loss-free, a per-expert bias added
to the scores only to choose; Mixtral, Qwen and OLMoE get one, starting at 0).
``--capacity-factor`` bounds the rows per expert by dropping pairs (:mod:`epmoe.capacity`;
the history counts the dropped pairs of this rank per step).

Checkpoints, ``OUT/checkpoints/step-NNNNNN/`` every ``--save-every`` steps and at
the end: the model as a sharded Hugging Face checkpoint in which each rank wrote only
its experts (:func:`epmoe.hf.save_pretrained`; loads with ``from_pretrained`` and
``python -m epmoe generate`` at any EP size), the AdamW state per rank, and
``trainer_state.json`` (step, arguments, history) written last. ``--resume`` goes on
from the latest (or ``--resume DIR``) with the same ranks and arguments, and gives the
same losses as an uninterrupted run, bit for bit. A larger ``--steps`` on resume goes on
past the saved learning-rate schedule (``--steps-schedule``, by default the first run's
``--steps``) at the rate of its last step (about 10% of ``--lr``).

Rank 0 shows a progress bar, writes ``OUT/history.json`` (loss and tokens per expert
of every MoE layer, per step) and ``OUT/train.png`` (loss, and per-expert load over
the steps), and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import parse_dtype
from ..health import guarded
from ..parallel_state import ParallelState, destroy_distributed, init_distributed, world_barrier

FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "deepseek_v2")
EXPERTS_FIELD = {"mixtral": "num_local_experts", "qwen3_moe": "num_experts",
                 "olmoe": "num_experts", "qwen2_moe": "num_experts",
                 "deepseek_v3": "n_routed_experts", "deepseek_v2": "n_routed_experts"}
# Arguments that must be the same to resume (the others: how long, where, what to show).
RUN_ARGS = ("family", "model", "experts", "text", "batch_size", "seq_len", "lr", "warmup",
            "weight_decay", "clip", "aux_loss_coef", "z_loss_coef", "bias_update_rate",
            "capacity_factor", "seed", "dtype", "backend", "steps_schedule")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory for checkpoints, history and plot")
    p.add_argument("--family", default="mixtral", choices=FAMILIES,
                   help="the tiny model's family (ignored with --model)")
    p.add_argument("--model", default=None, help="start from this Hugging Face model directory")
    p.add_argument("--experts", type=int, default=8, help="routed experts of the tiny model")
    p.add_argument("--text", default=None, help="train on windows of this file (default: sums)")
    p.add_argument("--steps", type=int, default=300, help="train up to this step")
    p.add_argument("--steps-schedule", type=int, default=None,
                   help="steps of the learning-rate schedule (default: --steps; on --resume, "
                        "the saved run's: past its end, the rate of its last step)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank and step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps, then cosine")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    p.add_argument("--aux-loss-coef", type=float, default=0.0)
    p.add_argument("--z-loss-coef", type=float, default=0.0)
    p.add_argument("--bias-update-rate", type=float, default=0.0)
    p.add_argument("--capacity-factor", type=float, default=0.0,
                   help="drop pairs over an expert's capacity (epmoe.capacity; 0: dropless)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--backend", default="alltoall",
                   choices=["alltoall", "allgather_reducescatter"], help="dispatch backend")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every this many "
                                                               "steps (and at the end)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="go on from the latest checkpoint in --out, or from this directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="no PNG")
    p.add_argument("--force-cpu", action="store_true", help="CPU and gloo even with GPUs")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any collective may take")


def _check_args(a: dict) -> None:
    for name in ("steps", "batch_size", "seq_len", "save_every", "experts"):
        if a[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {a[name]}")
    for name in ("lr", "weight_decay", "clip", "aux_loss_coef", "z_loss_coef",
                 "bias_update_rate", "capacity_factor", "warmup"):
        if not a[name] >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {a[name]}")
    if a["steps_schedule"] is not None and a["steps_schedule"] < 1:
        raise ValueError(f"--steps-schedule must be >= 1, got {a['steps_schedule']}")
    if parse_dtype(a["dtype"]) not in (torch.float32, torch.bfloat16):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {a['dtype']!r}")


def learning_rate(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine to 10% at ``total``;
    past ``total`` steps, the rate of the last one."""
    step = min(step, total - 1)
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def main(out: str, family: str = "mixtral", model: str | None = None, experts: int = 8,
         text: str | None = None, steps: int = 300, steps_schedule: int | None = None,
         batch_size: int = 8, seq_len: int = 64, lr: float = 3e-3, warmup: int = 20,
         weight_decay: float = 0.01, clip: float = 1.0, aux_loss_coef: float = 0.0,
         z_loss_coef: float = 0.0, bias_update_rate: float = 0.0,
         capacity_factor: float = 0.0, seed: int = 0,
         dtype: str = "float32", backend: str = "alltoall", save_every: int = 100,
         resume: str | None = None, no_progress: bool = False, no_plot: bool = False,
         force_cpu: bool = False, timeout: float = 120.0) -> int:
    args = dict(family=family, model=model, experts=experts, text=text, batch_size=batch_size,
                seq_len=seq_len, lr=lr, warmup=warmup, weight_decay=weight_decay, clip=clip,
                aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef,
                bias_update_rate=bias_update_rate, capacity_factor=capacity_factor, seed=seed,
                dtype=dtype, backend=backend, steps_schedule=steps_schedule)
    _check_args({**args, "steps": steps, "save_every": save_every})
    state = init_distributed(force_cpu=force_cpu, timeout_s=timeout)
    try:
        Trainer(state, Path(out), args, resume, steps).run(steps, save_every, not no_progress,
                                                           not no_plot)
    finally:
        destroy_distributed(state)
    return 0


class Trainer:
    """One training run on this rank (see the module docstring)."""

    def __init__(self, state: ParallelState, out: Path, args: dict, resume: str | None,
                 steps: int) -> None:
        from ..hf.loading import from_pretrained
        from ..text_tasks import make_task
        from ..training import load_optimizer

        self.state, self.out, self.args = state, out, args
        self.dtype = parse_dtype(args["dtype"])
        self.task = make_task(args["text"], args["seed"])
        self.step, self.history = 0, []
        start = self._resume_dir(resume) if resume else None
        if start is not None:
            saved = json.loads((start / "trainer_state.json").read_text())
            if args["steps_schedule"] is None:  # the saved run's schedule goes on
                args["steps_schedule"] = saved["args"].get("steps_schedule")
            self._check_resumable(saved, start)
            self.step, self.history = saved["step"], saved["history"][: saved["step"]]
            source = start
        else:
            args["steps_schedule"] = args["steps_schedule"] or steps
            source = Path(args["model"]) if args["model"] else self._write_init()
        self.source = source
        self.model = from_pretrained(source, state, dtype=self.dtype,
                                     moe_options=self._moe_options(source))
        self.model.train()
        self.layers = self.model.epmoe.layers
        vocab = self.model.config.vocab_size
        if vocab < 256:
            raise ValueError(f"the model's vocab_size is {vocab}; the byte tasks need >= 256")
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=args["lr"],
            weight_decay=args["weight_decay"])
        if start is not None:
            load_optimizer(self.optimizer, self.model, start, state)

    # --- set-up ---
    def _write_init(self) -> Path:
        from ..hf.tiny import save_tiny_checkpoint

        init = self.out / "init"
        a = self.args
        if self.state.rank == 0:
            save_tiny_checkpoint(a["family"], init, seed=a["seed"],
                                 **{EXPERTS_FIELD[a["family"]]: a["experts"]})
        world_barrier(self.state, "writing the initial model")
        return init

    def _moe_options(self, source: Path) -> dict:
        from transformers import AutoConfig

        from ..hf.families import family_of

        a = self.args
        options = dict(all2all_backend=a["backend"], load_window=1,
                       aux_loss_coef=a["aux_loss_coef"], z_loss_coef=a["z_loss_coef"],
                       capacity_factor=a["capacity_factor"])
        if a["bias_update_rate"]:
            options["bias_update_rate"] = a["bias_update_rate"]
            hf_config = AutoConfig.from_pretrained(source)
            if not family_of(hf_config).moe_fields(hf_config).get("score_correction_bias"):
                options["score_correction_bias"] = True  # 0 to start: the family's routing
        return options

    def _resume_dir(self, resume: str) -> Path:
        if resume != "latest":
            path = Path(resume)
            if not (path / "trainer_state.json").is_file():
                raise ValueError(f"--resume {path}: not a finished checkpoint (no "
                                 "trainer_state.json)")
            return path
        done = sorted(p for p in (self.out / "checkpoints").glob("step-*")
                      if (p / "trainer_state.json").is_file())
        if not done:
            raise ValueError(f"--resume: no finished checkpoint under {self.out}/checkpoints")
        return done[-1]

    def _check_resumable(self, saved: dict, path: Path) -> None:
        s = self.state
        if (saved["world_size"], saved["ep_size"]) != (s.world_size, s.ep_size):
            raise ValueError(f"--resume {path}: saved on {saved['world_size']} rank(s) with "
                             f"ep_size={saved['ep_size']}, this run has {s.world_size} with "
                             f"ep_size={s.ep_size}; resume with the same (the model itself "
                             "loads at any size with from_pretrained)")
        diff = {k: (saved["args"].get(k), self.args[k]) for k in RUN_ARGS
                if saved["args"].get(k) != self.args[k]}
        if diff:
            raise ValueError(f"--resume {path}: these arguments differ from the saved run's "
                             f"(saved, given): {diff}")

    # --- the loop ---
    def run(self, steps: int, save_every: int, progress: bool, plot: bool) -> None:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=self.step, desc="train", unit="step",
                   disable=not progress or self.state.rank != 0, dynamic_ncols=True)
        t0 = time.perf_counter()
        first = self.step
        while self.step < steps:
            record = self.train_step()
            self.history.append(record)
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}",
                            max_vio=f"{max_violation(record['load']):.2f}")
            if self.step % save_every == 0 or self.step == steps:
                self.save()
        bar.close()
        seconds = time.perf_counter() - t0
        if self.state.rank == 0:
            (self.out / "history.json").write_text(json.dumps(self.history) + "\n")
            if plot and self.history:
                plot_history(self.history, self.out / "train.png", self.args)
            print(summary(self.history, first, seconds, self.out, plot), flush=True)

    def train_step(self) -> dict:
        from ..training import average_gradients, clip_grad_norm_

        s, a = self.state, self.args
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, a["lr"], a["warmup"], a["steps_schedule"])
        ids = self.task.batch(self.step, s.rank, a["batch_size"], a["seq_len"]).to(s.device)
        lm = self.model(input_ids=ids, labels=ids).loss
        aux = self.model.epmoe.aux_loss()
        # This rank's share of the group's balancing losses, times ep_size: after the
        # mean over ranks (average_gradients), the loss is mean(lm) + the group's aux.
        loss = lm if aux is None else lm + s.ep_size * aux
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.model, s)
        norm = clip_grad_norm_(self.model, s, a["clip"]) if a["clip"] else None
        self.optimizer.step()
        if a["bias_update_rate"]:
            self.model.epmoe.update_bias()
        sums = torch.stack([lm.detach().float(),
                            (aux.detach() if aux is not None else torch.zeros(())).float()])
        if s.world_size > 1:
            with guarded(s.heartbeat, "the loss report", tuple(range(s.world_size))):
                dist.all_reduce(sums)
        return dict(step=self.step + 1, loss=float(sums[0]) / s.world_size,
                    aux=float(sums[1]) / s.dp_size, lr=self.optimizer.param_groups[0]["lr"],
                    grad_norm=None if norm is None else float(norm),
                    dropped=sum(int(layer.dropped) for layer in self.layers),
                    load=[layer.load.total().tolist() for layer in self.layers])

    # --- checkpoints ---
    def save(self) -> Path:
        from ..hf.saving import save_pretrained
        from ..training import save_optimizer

        path = self.out / "checkpoints" / f"step-{self.step:06d}"
        save_pretrained(self.model, path, self.state)  # (creates path; barriers)
        save_optimizer(self.optimizer, self.model, path, self.state)
        world_barrier(self.state, "saving the optimiser state")
        if self.state.rank == 0:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (self.source / name).is_file() and self.source != path:
                    shutil.copy(self.source / name, path / name)
            placement = [list(layer.expert_map.phy2log) for layer in self.layers]
            record = dict(step=self.step, world_size=self.state.world_size,
                          ep_size=self.state.ep_size, args=self.args, placement=placement,
                          history=self.history)
            tmp = path / "trainer_state.json.tmp"
            tmp.write_text(json.dumps(record) + "\n")
            tmp.replace(path / "trainer_state.json")  # last: the checkpoint is complete
        world_barrier(self.state, "finishing the checkpoint")
        return path


# --- reporting ---
def max_violation(load: list[list[int]]) -> float:
    """DeepSeek's MaxVio of one step, the mean over MoE layers of max / mean - 1 of the
    tokens per expert (0: even)."""
    vio = []
    for counts in load:
        t = torch.tensor(counts, dtype=torch.float64)
        vio.append(float(t.max() / t.mean()) - 1.0 if float(t.sum()) > 0 else 0.0)
    return sum(vio) / len(vio) if vio else 0.0


def balance_figures(history: list[dict], last: float = 0.5) -> dict:
    """Mean MaxVio over all steps and over the last ``last`` share of them."""
    vio = [max_violation(r["load"]) for r in history]
    tail = vio[int(len(vio) * (1 - last)):] or vio
    return dict(max_vio_mean=sum(vio) / len(vio), max_vio_last=sum(tail) / len(tail))


def summary(history: list[dict], first: int, seconds: float, out: Path, plot: bool) -> str:
    if not history:
        return "no steps run"
    h, b = history, balance_figures(history)
    done = len(h) - first
    lines = [f"steps {h[0]['step']}-{h[-1]['step']}: loss {h[0]['loss']:.4f} -> "
             f"{h[-1]['loss']:.4f} (mean of the last 10: "
             f"{sum(r['loss'] for r in h[-10:]) / len(h[-10:]):.4f})",
             f"load balance, MaxVio (max/mean tokens per expert - 1, mean over MoE layers): "
             f"{b['max_vio_mean']:.3f} over all steps, {b['max_vio_last']:.3f} over the "
             "last half",
             f"{done} step(s) in {seconds:.1f} s this run; checkpoints in {out}/checkpoints"]
    if plot:
        lines.append(f"plot: {out}/train.png; history: {out}/history.json")
    return "\n".join(lines)


def plot_history(history: list[dict], path: Path, args: dict) -> None:
    """Loss over the steps, and each MoE layer's share of tokens per expert over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    n_layers = len(history[0]["load"])
    fig, axes = plt.subplots(2 + n_layers, 1, figsize=(8, 2.4 * (2 + n_layers)),
                             sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r["loss"] for r in history], lw=1)
    ax.set_ylabel("loss (next byte)")
    ax.set_title(_title(args))
    ax.grid(alpha=0.3)
    ax = axes[1][0]
    ax.plot(steps, [max_violation(r["load"]) for r in history], lw=1, color="tab:red")
    ax.set_ylabel("MaxVio\n(max/mean - 1)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    for i in range(n_layers):
        load = torch.tensor([r["load"][i] for r in history], dtype=torch.float64)
        share = load / load.sum(1, keepdim=True).clamp(min=1)
        ax = axes[2 + i][0]
        im = ax.imshow(share.T.numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, share.shape[1] - 0.5, -0.5),
                       vmin=0.0, vmax=max(2.0 / share.shape[1], float(share.max())))
        ax.set_ylabel(f"MoE layer {i}\nexpert")
        fig.colorbar(im, ax=ax, label="share of tokens")
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _title(args: dict) -> str:
    parts = [f"{k}={args[k]}" for k in ("aux_loss_coef", "z_loss_coef", "bias_update_rate")
             if args[k]]
    return f"{args['model'] or args['family']}, {args['dtype']}: " + \
        (", ".join(parts) if parts else "no balancing")
