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


def plot(results: Sequence[SimResult], path: str | Path, title: str, unique_blocks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for p in dict.fromkeys(r.policy for r in results):
        pts = sorted((r.capacity_blocks / unique_blocks, r.hit_ratio) for r in results if r.policy == p)
        style = {"linestyle": "--", "color": "black"} if p == "belady" else {}
        ax.plot([x * 100 for x, _ in pts], [y for _, y in pts], marker="o", label=p, **style)
    ax.set_xscale("log")
    ax.set_xlabel("capacity (% of the trace's unique blocks)")
    ax.set_ylabel("block hit ratio (prefix-contiguous)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
