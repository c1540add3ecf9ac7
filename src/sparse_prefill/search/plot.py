"""The per-layer summary of a searched config: pattern type and recall by layer x head, as a PNG."""

from __future__ import annotations

from pathlib import Path

from ..patterns import PatternConfig

__all__ = ["plot_config", "short_name"]

_KINDS = ["dense", "vertical_slash", "block_sparse", "a_shape", "block_coverage"]
_COLOURS = ["#444444", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd"]


def short_name(pattern) -> str:
    """A cell label: the kind's letter and its budget (``D``, ``V1000,6096``, ``B8``, ``A4+1024``, ``C0.99/s16``)."""
    return pattern.kind[0].upper() + ("" if pattern.kind == "dense" else pattern.label())


def plot_config(config: PatternConfig, path: str | Path) -> Path:
    """Draw the searched layers of ``config`` (its metadata holds recall and density per head)."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the search heatmap needs matplotlib: pip install 'sparse-prefill[eval]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    meta = config.metadata
    layers = meta.get("searched_layers", list(range(config.n_layers)))
    recall = meta["recall"]
    kinds = [[_KINDS.index(config[l, h].kind) for h in range(config.n_heads)] for l in layers]
    height = max(3.0, 0.28 * len(layers) + 1.6)
    fig, (left, right) = plt.subplots(1, 2, figsize=(2 * (1.2 + 0.75 * config.n_heads), height))
    left.imshow(kinds, cmap=ListedColormap(_COLOURS), vmin=-0.5, vmax=len(_KINDS) - 0.5, aspect="auto")
    image = right.imshow(recall, cmap="viridis", vmin=min(min(r) for r in recall), vmax=1.0, aspect="auto")
    for row, l in enumerate(layers):
        for h in range(config.n_heads):
            left.text(h, row, short_name(config[l, h]), ha="center", va="center", fontsize=5.5, color="white")
            right.text(h, row, f"{recall[row][h]:.2f}", ha="center", va="center", fontsize=5.5,
                       color="white" if recall[row][h] < 0.9 else "black")
    for ax, title in ((left, "pattern (V columns,slash keys, B top-k, A sink+local, C coverage/stride, D dense)"),
                      (right, "recall (dense attention mass kept)")):
        ax.set_xticks(range(config.n_heads))
        ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=6)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=right, fraction=0.04)
    summary = meta.get("summary", {})
    fig.suptitle(
        f"{Path(str(meta.get('model', ''))).name}: {meta.get('samples')} prompts of {meta.get('length')} tokens; "
        f"mean recall {summary.get('recall', float('nan')):.3f} vs uniform default {summary.get('uniform_recall', float('nan')):.3f} "
        f"at density {summary.get('density', float('nan')):.3f} vs {summary.get('uniform_density', float('nan')):.3f}",
        fontsize=8,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
