"""``pareto.png``: accuracy against MACs of every evaluated subnet, the front drawn
as a step line, the largest and smallest subnets marked, over-budget points hollow."""

from __future__ import annotations

from typing import List


def plot_pareto(
    candidates: List[dict], front: List[int], path: str, metric: str = "accuracy", title: str = "", dpi: int = 110
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def y(c):
        return c["metrics"]["bpb"] if metric == "bpb" else 100.0 * c["metrics"]["acc"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    feas = [c for c in candidates if c["feasible"]]
    over = [c for c in candidates if not c["feasible"]]
    ax.scatter(
        [c["cost"]["macs"] / 1e6 for c in feas],
        [y(c) for c in feas],
        s=14,
        c="tab:blue",
        alpha=0.45,
        label=f"evaluated ({len(candidates)})",
    )
    if over:
        ax.scatter(
            [c["cost"]["macs"] / 1e6 for c in over],
            [y(c) for c in over],
            s=14,
            facecolors="none",
            edgecolors="tab:gray",
            label="over budget",
        )
    pts = [candidates[i] for i in front]
    ax.step([c["cost"]["macs"] / 1e6 for c in pts], [y(c) for c in pts], where="post", c="tab:red", lw=1.2)
    ax.scatter(
        [c["cost"]["macs"] / 1e6 for c in pts],
        [y(c) for c in pts],
        s=28,
        c="tab:red",
        label=f"Pareto front ({len(pts)})",
        zorder=3,
    )
    for role, marker in (("largest", "^"), ("smallest", "v")):
        for c in candidates:
            if c.get("role") == role:
                ax.scatter([c["cost"]["macs"] / 1e6], [y(c)], marker=marker, s=80, c="black", zorder=4, label=role)
    ax.set_xlabel("MACs (millions, one sample)")
    ax.set_ylabel("bits per byte (lower is better)" if metric == "bpb" else "accuracy (%)")
    ax.set_title(title or "subnets found by dtrain-search")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if metric != "bpb" else "upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
