"""Draw the concept figures of the docs into ``docs/img/`` (matplotlib, no GPU, ~2 s).

    python scripts/draw_figures.py            # writes docs/img/{four_steps,groups,placement}.png

The layouts come from epmoe itself: ``epmoe.group_layout`` for the groups and
``epmoe.expert_map`` for the placements, so a figure shows what the code does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository's epmoe, wherever this runs from
import epmoe  # noqa: E402

OUT = ROOT / "docs" / "img"
RANK_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52")


def _box(ax, x, y, w, h, text, colour, fontsize=9, text_colour="white"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=colour, edgecolor="none"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize,
            color=text_colour)


def _arrow(ax, start, end, colour="#444444", style="-|>", rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12,
                                 color=colour, linewidth=1.2,
                                 connectionstyle=f"arc3,rad={rad}"))


def four_steps(path: Path) -> None:
    """Two ranks, 8 experts (linear placement): router, dispatch, experts, combine."""
    emap = epmoe.expert_map(8, 2, "linear")
    fig, ax = plt.subplots(figsize=(10, 4.0))
    ax.set_xlim(0, 10.4)
    ax.set_ylim(0, 4.4)
    ax.axis("off")
    # columns: (x, title); every box is 1.1 wide
    cols = [(0.1, "tokens [T, H]"), (1.8, "1. router\ntop-k per token"),
            (3.5, "2. dispatch\nall-to-all"), (5.5, "3. experts\nlocal only"),
            (7.5, "4. combine\nall-to-all back"), (9.2, "output [T, H]")]
    w = 1.1
    for x, title in cols:
        ax.text(x + w / 2, 4.15, title, ha="center", va="center", fontsize=9, weight="bold")
    ys = (2.5, 0.5)
    for rank, y in enumerate(ys):
        colour = RANK_COLOURS[rank]
        held = ", ".join(str(e) for e in range(8) if emap.owner[e] == rank)
        texts = [f"rank {rank}\ntokens", "router\n(replicated)", "rows per\nrank", f"experts\n{held}",
                 "sum per\ntoken", f"rank {rank}\noutput"]
        for (x, _), text in zip(cols, texts):
            grey = text.startswith(("rows", "sum"))
            _box(ax, x, y, w, 1.0, text, "#999999" if grey else colour)
        for (x0, _), (x1, _) in zip(cols, cols[1:]):
            _arrow(ax, (x0 + w, y + 0.5), (x1, y + 0.5))
    # the all-to-alls: rows to the other rank's experts, results back to the token's rank
    for (x0, _), (x1, _) in ((cols[2], cols[3]), (cols[3], cols[4])):
        _arrow(ax, (x0 + w, ys[0] + 0.4), (x1, ys[1] + 0.6), RANK_COLOURS[0])
        _arrow(ax, (x0 + w, ys[1] + 0.6), (x1, ys[0] + 0.4), RANK_COLOURS[1])
    ax.text(5.2, 0.1, "a token goes once to each rank that holds one of its top-k experts; "
            "the only collectives are the two all-to-alls", ha="center", fontsize=8,
            color="#444444")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def groups(path: Path, world_size: int = 8, ep_size: int = 4) -> None:
    """The DP x EP world: EP groups are consecutive ranks, DP groups the same EP position."""
    ep_groups, dp_groups = epmoe.group_layout(world_size, ep_size)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.set_xlim(-1.6, ep_size + 0.2)
    ax.set_ylim(-0.9, len(ep_groups) + 0.1)
    ax.axis("off")
    for row, group in enumerate(ep_groups):
        y = len(ep_groups) - 1 - row
        ax.add_patch(FancyBboxPatch((-0.05, y + 0.05), ep_size - 0.1 + 0.1, 0.9,
                                    boxstyle="round,pad=0.03", facecolor="none",
                                    edgecolor="#333333", linestyle="--"))
        ax.text(-0.25, y + 0.5, f"EP group {row}\n{group}", ha="right", va="center", fontsize=9)
        for col, rank in enumerate(group):
            _box(ax, col + 0.1, y + 0.15, 0.8, 0.7, f"rank {rank}", RANK_COLOURS[col])
    for col, group in enumerate(dp_groups):
        ax.text(col + 0.5, -0.45, f"DP group {col}\n{group}", ha="center", va="center",
                fontsize=9, color=RANK_COLOURS[col])
    ax.set_title(f"init_distributed(ep_size={ep_size}) on {world_size} ranks", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def placement(path: Path, num_experts: int = 10, ep_size: int = 4) -> None:
    """Which rank holds which expert: linear, round_robin, and linear with 2 redundant slots."""
    maps = [("linear", epmoe.expert_map(num_experts, ep_size, "linear")),
            ("round_robin", epmoe.expert_map(num_experts, ep_size, "round_robin")),
            ("linear, num_redundant=2",
             epmoe.expert_map(num_experts, ep_size, "linear", num_redundant=2))]
    fig, axes = plt.subplots(1, len(maps), figsize=(11, 3.0))
    for ax, (title, emap) in zip(axes, maps):
        rows = max(emap.local_index) + 1
        ax.set_xlim(0, ep_size)
        ax.set_ylim(0, rows + 0.2)
        ax.axis("off")
        ax.set_title(f"{title}\n{num_experts} experts on {ep_size} ranks", fontsize=9)
        copies = {e: emap.phy2log.count(e) for e in set(emap.phy2log)}
        for expert, owner, row in zip(emap.phy2log, emap.owner, emap.local_index):
            label = f"expert {expert}" + ("\n(2 copies)" if copies[expert] > 1 else "")
            _box(ax, owner + 0.1, rows - 1 - row + 0.1, 0.8, 0.8, label,
                 "#888888" if copies[expert] > 1 else RANK_COLOURS[owner], fontsize=8)
        for rank in range(ep_size):
            ax.text(rank + 0.5, -0.05, f"rank {rank}", ha="center", va="top", fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "four_steps.png", out / "groups.png", out / "placement.png"]
    four_steps(paths[0])
    groups(paths[1])
    placement(paths[2])
    return paths


if __name__ == "__main__":
    for p in main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(p)
