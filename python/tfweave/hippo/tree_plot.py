"""Draws a stage tree: one horizontal bar per stage over its epochs, forks as vertical links."""

from __future__ import annotations

from tfweave.hippo.stage_tree import StageTree


def _layout(tree: StageTree) -> dict[str, float]:
    """Leaves on consecutive rows (depth-first order), parents centred on their children."""
    rows: dict[str, float] = {}
    next_row = [0]

    def place(node_id: str) -> float:
        node = tree.nodes[node_id]
        if not node.children:
            rows[node_id] = next_row[0]
            next_row[0] += 1
        else:
            children = sorted(node.children, key=lambda c: str(tree.nodes[c].config))
            ys = [place(c) for c in children]
            rows[node_id] = sum(ys) / len(ys)
        return rows[node_id]

    for root in (n for n in tree.nodes.values() if n.is_root):
        place(root.id)
    return rows


def plot_stage_tree(tree: StageTree, path: str, *, title: str = "Stage tree",
                    color_by: str = "learning_rate") -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    rows = _layout(tree)
    values = [n.config.get(color_by) for n in tree.nodes.values() if not n.is_root]
    numeric = [v for v in values if isinstance(v, (int, float)) and v > 0]
    norm = colors.LogNorm(min(numeric), max(numeric)) if len(set(numeric)) > 1 else None
    cmap = cm.viridis
    height = max(3.0, 0.18 * (max(rows.values(), default=0) + 1) + 1.5)
    fig, ax = plt.subplots(figsize=(8, min(height, 30)), dpi=110)
    for node in tree.nodes.values():
        if node.is_root:
            continue
        y, parent_y = rows[node.id], rows[node.parent]
        value = node.config.get(color_by)
        color = cmap(norm(value)) if norm and isinstance(value, (int, float)) and value > 0 \
            else "tab:blue"
        style = {"done": "-", "pending": ":", "running": "-", "failed": "--",
                 "cancelled": ":"}.get(node.status, "-")
        alpha = 0.35 if node.status in ("cancelled", "failed") else 1.0
        ax.plot([node.start, node.end], [y, y], style, color=color, lw=2.2, alpha=alpha,
                solid_capstyle="butt")
        ax.plot([node.start, node.start], [parent_y, y], "-", color="0.6", lw=0.8)
        if node.status == "failed":
            ax.plot([node.end], [y], "x", color="tab:red")
    if norm:
        mappable = cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(mappable, ax=ax, label=color_by)
    ax.set_xlabel("epoch")
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlim(0, max((n.end for n in tree.nodes.values()), default=1) * 1.02)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def describe(tree: StageTree) -> str:
    stages = [n for n in tree.nodes.values() if not n.is_root]
    leaves = [n for n in stages if not n.children]
    depth = max((len(tree.path(n.id)) - 1 for n in leaves), default=0)
    return (f"{len(stages)} stages, {len(leaves)} leaves, depth {depth}, "
            f"{tree.unique_epochs()} unique epochs" if stages else "empty tree")

