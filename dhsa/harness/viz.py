"""Pictures of sparsity (matplotlib, the ``viz`` extra).

Every function returns the matplotlib Figure (headless: the Agg backend is
used when no display is set) and never calls ``show``; save it with
``fig.savefig(path)``.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["plot_selection", "plot_boundaries_over_tokens", "plot_chunk_scores",
           "plot_recall_curves", "plot_layer_stats", "plot_niah"]


def _plt():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - exercised without the extra
        raise ImportError("dhsa.harness.viz needs matplotlib: pip install 'dhsa[viz]'") from e
    if not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend().lower():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def selection_image(selection, Lk: Optional[int] = None, batch: int = 0) -> np.ndarray:
    """(num_blocks, Lk) float: how many selection groups keep each key."""
    if Lk is None:
        Lk = int(selection.ends.max()) if selection.ends.size else 1
        if selection.boundaries:
            Lk = max(Lk, int(selection.boundaries[0][-1]))
    img = np.zeros((selection.num_blocks, Lk), dtype=np.float32)
    for g in range(selection.groups):
        for qb in range(selection.num_blocks):
            for a, e in selection.ranges(batch, g, qb):
                img[qb, a:e] += 1.0
    return img


def plot_selection(selection, *, Lk: Optional[int] = None, batch: int = 0,
                   chunk_group: int = 0, mark: Optional[Tuple[int, int]] = None,
                   title: str = "", ax=None):
    """Query blocks x keys heat map of a selection (shade: groups keeping a
    key), chunk boundaries as thin lines, an optional marked key span."""
    plt = _plt()
    img = selection_image(selection, Lk, batch)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(11, 4.5), dpi=100)
    G = selection.groups
    im = ax.imshow(img, aspect="auto", cmap="Blues", interpolation="nearest", vmin=0,
                   vmax=G, extent=(0, img.shape[1], selection.num_blocks, 0))
    cb = fig.colorbar(im, ax=ax, pad=0.01, ticks=range(0, G + 1, max(1, G // 8)))
    cb.set_label(f"groups keeping the key (of {G})")
    if selection.boundaries:
        idx = batch * selection.chunk_groups + chunk_group
        if idx < len(selection.boundaries):
            for b in selection.boundaries[idx][1:-1]:
                ax.axvline(int(b), color="0.35", lw=0.25, alpha=0.5)
    if mark is not None:
        ax.axvspan(mark[0], mark[1], color="red", alpha=0.35, lw=0)
    ax.set_xlabel("key position (lines: chunk boundaries)")
    ax.set_ylabel(f"query block ({selection.block_size} queries)")
    ax.set_title(title or f"selection ({selection.granularity}), density {_density(selection)}")
    fig.tight_layout()
    return fig


def _density(selection) -> str:
    try:
        return f"{selection.density:.3f}"
    except ValueError:
        return "?"


def plot_boundaries_over_tokens(tokens: Sequence[str], boundaries: Sequence[int], *,
                                scores: Optional[np.ndarray] = None, start: int = 0,
                                count: int = 160, per_line: int = 16, title: str = ""):
    """The text itself, token by token, with a bar before each token that
    starts a chunk; the boundary score shades each token when given."""
    plt = _plt()
    end = min(len(tokens), start + count)
    bset = set(int(b) for b in boundaries)
    lines = -(-(end - start) // per_line)
    fig, ax = plt.subplots(figsize=(13, 0.42 * lines + 0.8), dpi=100)
    ax.set_xlim(0, per_line)
    ax.set_ylim(lines, 0)
    ax.axis("off")
    smax = float(np.max(scores[start:end])) if scores is not None and end > start else 1.0
    for i in range(start, end):
        row, col = divmod(i - start, per_line)
        shade = 0.0 if scores is None else max(0.0, float(scores[i])) / (smax or 1.0)
        ax.add_patch(plt.Rectangle((col, row + 0.1), 0.98, 0.8, color=(1.0, 1 - 0.5 * shade,
                                                                        1 - 0.8 * shade)))
        text = tokens[i].replace("\n", "⏎")
        ax.text(col + 0.5, row + 0.55, text[:12], ha="center", va="center", fontsize=7)
        if i in bset:
            ax.plot([col, col], [row + 0.05, row + 0.95], color="black", lw=2.2)
    ax.set_title(title or f"chunk boundaries over tokens {start}..{end - 1} (bars: chunk starts)")
    fig.tight_layout()
    return fig


def plot_chunk_scores(selection, *, batch: int = 0, group: int = 0, title: str = ""):
    """Chunk-level similarity r_q . r_k (query blocks x chunks) of a
    selection made with ``return_scores=True``; blank where out of reach."""
    plt = _plt()
    if selection.chunk_scores is None:
        raise ValueError("selection has no chunk_scores: predict with return_scores=True")
    S = selection.chunk_scores[batch * selection.groups + group]
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    im = ax.imshow(np.ma.masked_invalid(S), aspect="auto", cmap="viridis",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, pad=0.01).set_label("r_q . r_k")
    ax.set_xlabel("key chunk")
    ax.set_ylabel("query block")
    ax.set_title(title or "chunk scores")
    fig.tight_layout()
    return fig


def plot_recall_curves(rows: Iterable[Mapping], *, x: str = "budget", y: str = "recall",
                       by: str = "method", title: str = ""):
    """Mean ``y`` vs ``x`` per ``by`` (e.g. recall vs budget per method) from
    records such as those of ``dhsa.harness.eval.run_recall``."""
    plt = _plt()
    rows = list(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    for name in sorted({r[by] for r in rows}):
        xs = sorted({r[x] for r in rows if r[by] == name})
        ys = [np.mean([r[y] for r in rows if r[by] == name and r[x] == v]) for v in xs]
        ax.plot(xs, ys, marker="o", label=str(name))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or f"{y} vs {x}")
    fig.tight_layout()
    return fig


def plot_layer_stats(values: np.ndarray, *, label: str = "recall", title: str = "",
                     rows: Optional[Sequence] = None):
    """(layers, heads) matrix (density, recall, ...) as a heat map with the
    per-layer mean beside it; ``rows`` labels the layers (default 0..n-1)."""
    plt = _plt()
    values = np.asarray(values, dtype=float)
    rows = list(range(values.shape[0])) if rows is None else list(rows)
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100,
                                 gridspec_kw={"width_ratios": [3, 1]})
    im = a0.imshow(values, aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=a0, pad=0.01).set_label(label)
    a0.set_xticks(range(values.shape[1]))
    a0.set_yticks(range(values.shape[0]), [str(r) for r in rows])
    a0.set_xlabel("head")
    a0.set_ylabel("layer")
    a1.barh(np.arange(values.shape[0]), values.mean(axis=1), color="tab:blue")
    a1.set_yticks(range(values.shape[0]), [str(r) for r in rows])
    a1.set_ylim(values.shape[0] - 0.5, -0.5)
    a1.set_xlabel(f"mean {label}")
    fig.suptitle(title or f"{label} per layer and head")
    fig.tight_layout()
    return fig


def plot_niah(cells: Iterable[Mapping], *, title: str = "NIAH", vmax: float = 10.0,
              label: str = "score (0-10)"):
    """Length x depth heat map of NIAH scores (cells with ``length`` or
    ``target_length``, ``depth`` and ``score``), mean score in the title;
    ``label`` names the colour scale."""
    plt = _plt()
    cells = list(cells)
    key = "target_length" if cells and "target_length" in cells[0] else "length"
    lengths = sorted({c[key] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c["depth"]), lengths.index(c[key])] = c["score"]
    fig, ax = plt.subplots(figsize=(1.3 * len(lengths) + 2.5, 0.55 * len(depths) + 1.8), dpi=100)
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=vmax, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(l) for l in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    fig.colorbar(im, ax=ax, pad=0.02).set_label(label)
    ax.set_title(f"{title} (mean {np.nanmean(grid):.2f})")
    fig.tight_layout()
    return fig
