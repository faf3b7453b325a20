"""Presenting simulation results: a fixed-width table and a plot of hit ratio against capacity."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rdmapool.sim.replay import SimResult


def table(results: Sequence[SimResult], shares: dict[int, str] | None = None) -> str:
    """One row per policy, one column per capacity: block hit ratio / token hit ratio / compute saved."""
    caps = sorted({r.capacity_blocks for r in results})
    policies = list(dict.fromkeys(r.policy for r in results))
    by = {(r.policy, r.capacity_blocks): r for r in results}
    shares = shares or {}
    head = ["policy"] + [f"{shares.get(c, '')} {c} blk".strip() for c in caps]
    rows = [head]
    for p in policies:
        row = [p]
        for c in caps:
            r = by.get((p, c))
            row.append("-" if r is None else
                       f"{r.hit_ratio:.3f} / {r.token_hit_ratio:.3f} / {r.compute_saved_ratio:.3f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n(each cell: block hit ratio / token hit ratio / prefill compute saved)"


def markdown(results: Sequence[SimResult], shares: dict[int, str] | None = None) -> str:
    """The same grid as a Markdown table of block hit ratios."""
    caps = sorted({r.capacity_blocks for r in results})
    by = {(r.policy, r.capacity_blocks): r for r in results}
    shares = shares or {}
    out = ["| policy | " + " | ".join(f"{shares.get(c, '')} ({c} blocks)" for c in caps) + " |",
           "| --- |" + " --- |" * len(caps)]
    for p in dict.fromkeys(r.policy for r in results):
        out.append(f"| {p} | " + " | ".join(f"{by[(p, c)].hit_ratio:.3f}" if (p, c) in by else "-"
                                           for c in caps) + " |")
    return "\n".join(out)


def plot(results: Sequence[SimResult], path: str | Path, title: str, unique_blocks: int,
         highlight: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    names = list(dict.fromkeys(r.policy for r in results))
    colors = plt.get_cmap("tab20").colors
    for i, p in enumerate(names):
        pts = sorted((r.capacity_blocks / unique_blocks, r.hit_ratio) for r in results if r.policy == p)
        style = {"color": colors[i % len(colors)], "linewidth": 1.2, "marker": "o", "markersize": 3}
        if p.startswith("prefix-"):
            style.update(linestyle=":")
        if p == "belady":
            style.update(color="black", linestyle="--", linewidth=2)
        elif p == "lru":
            style.update(color="black", linewidth=2)
        elif p == highlight:
            style.update(color="red", linewidth=2.5, markersize=5)
        ax.plot([x * 100 for x, _ in pts], [y for _, y in pts], label=p, **style)
    ax.set_xscale("log")
    ax.set_xlabel("capacity (% of the trace's unique blocks)")
    ax.set_ylabel("block hit ratio (prefix-contiguous)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
