"""`cso-dist mcts draw`: a searched tree as a PNG, for inspection.

Generated nodes only (unvisited children are left out), laid out by leaf order, coloured by Q;
the gold path is drawn in gold, finished nodes are squares, labels give the strategy's
initials with Q and N.
"""

from __future__ import annotations

import json
from pathlib import Path

from cso_dist.util.errors import CsoError
from cso_dist.mcts.search import Tree


def _initials(strategy: str | None) -> str:
    return "".join(w[0] for w in (strategy or "root").replace("-", " ").split() if w[0].isalnum()).upper()


def draw_tree(checkpoint: str | Path, out: str | Path, max_depth: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = Path(checkpoint)
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CsoError(f"mcts draw: {p}: not a tree checkpoint ({e})") from None
    tree = Tree.from_dict(state["tree"] if "tree" in state else state)
    pos: dict[int, tuple[float, int]] = {}
    edges: list[tuple[object, object]] = []
    next_x = [0.0]

    def place(node, depth: int) -> float:
        kids = [c for c in node.children if c.generated]
        if max_depth and depth >= max_depth:
            kids = []
        if not kids:
            x = next_x[0]
            next_x[0] += 1.0
        else:
            xs = [place(c, depth + 1) for c in kids]
            edges.extend((node, c) for c in kids)
            x = sum(xs) / len(xs)
        pos[id(node)] = (x, depth)
        return x

    place(tree.root, 0)
    nodes = {id(n): n for e in edges for n in e} or {id(tree.root): tree.root}
    width = max(6.0, min(60.0, 0.6 * next_x[0]))
    depth = max(d for _, d in pos.values()) + 1
    fig, ax = plt.subplots(figsize=(width, max(3.0, 1.1 * depth)))
    cmap = plt.get_cmap("RdYlGn")
    for a, b in edges:
        (x0, y0), (x1, y1) = pos[id(a)], pos[id(b)]
        gold = getattr(b, "gold", False)
        ax.plot([x0, x1], [-y0, -y1], color="goldenrod" if gold else "0.6", lw=2.5 if gold else 0.8, zorder=1)
    for nid, n in nodes.items():
        x, y = pos[nid]
        q = max(-1.0, min(1.0, float(getattr(n, "q", 0.0))))
        ax.scatter(
            [x],
            [-y],
            s=260,
            c=[cmap((q + 1) / 2)],
            marker="s" if getattr(n, "finished", False) else "o",
            edgecolors="goldenrod" if getattr(n, "gold", False) else "k",
            linewidths=1.2,
            zorder=2,
        )
        label = _initials(getattr(n, "strategy", None)) if n is not tree.root else "root"
        ax.annotate(
            f"{label}\nQ {q:.2f} N {int(getattr(n, 'n', 0))}",
            (x, -y),
            xytext=(0, -17),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=6,
        )
    ax.set_title(f"{tree.seed_id}: {tree.iterations} iterations (gold path in gold; squares: finished)")
    ax.axis("off")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out
