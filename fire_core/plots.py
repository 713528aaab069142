"""Every figure goes through :func:`save`, so a reviewer can trace it back.

    fig = ...matplotlib figure...
    plots.save(fig, run.dir / "world_examples", sources=[stats_csv], cfg=cfg)

writes ``world_examples.png`` and ``world_examples.pdf`` with fixed metadata (a rerun gives
identical bytes) and ``world_examples.json``, a sidecar naming the results files (with their
hashes), the stage, scale, seed and overrides that made the figure. Paths in the sidecar are
relative to the results root (``<run>/<stage>/...``), so the same run made under another root
gives the same bytes.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("agg")  # headless and deterministic; set before pyplot is imported

from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fire_core.config import REPO_ROOT, FireConfig  # noqa: E402
from fire_core.provenance import git_state, sha256_tree, write_json_atomic  # noqa: E402

# No dates or software versions in the files: identical inputs give identical bytes.
_PNG_META = {"Software": None}
_PDF_META = {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None}


def _rel(p: Path, root: Path) -> str:
    p, root = Path(p).absolute(), Path(root).absolute()
    for base in (root, REPO_ROOT):
        if p.is_relative_to(base):
            return p.relative_to(base).as_posix()
    return str(p)


def save(fig: Figure, stem: Path, sources: list[Path], cfg: FireConfig, dpi: int = 150,
         close: bool = True) -> list[Path]:
    """Write ``stem.png``, ``stem.pdf`` and the ``stem.json`` sidecar; return the figure paths."""
    stem = Path(stem)
    png, pdf, side = stem.with_suffix(".png"), stem.with_suffix(".pdf"), stem.with_suffix(".json")
    clash = [s for s in sources if Path(s).absolute() in {png.absolute(), pdf.absolute(), side.absolute()}]
    if clash:
        raise ValueError(f"figure {stem.name}: its own files would overwrite its source {clash[0]}; give the data "
                         "file another name")
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=dpi, metadata=_PNG_META, bbox_inches="tight")
    fig.savefig(pdf, metadata=_PDF_META, bbox_inches="tight")
    root = cfg.run_dir().parent
    sidecar = {
        "figure": [_rel(png, root), _rel(pdf, root)],
        "sources": {_rel(s, root): sha256_tree(s) for s in sources},
        "stage": cfg.stage,
        "scale": cfg.scale,
        "seed": cfg.seed,
        "overrides": [o for o in cfg.overrides if not o.startswith("paths.")],
        "git_commit": git_state()["commit"],
    }
    write_json_atomic(side, sidecar)
    if close:
        plt.close(fig)
    return [png, pdf]


# Message boxes of a conversation figure: (x position, face colour) per kind of message
_BOXES = {"question": (0.0, "#eeeeee"), "left": (0.0, "#e8f0fb"), "right": (0.42, "#fdf1e3")}


def conversations(panels: list[dict], columns: int = 2, width: int = 58) -> Figure:
    """A figure of conversations, one panel each, nothing cut off: the image top left, a title,
    then every message wrapped in full in its own box. ``panels``: dicts with ``image`` (PIL or
    None), ``title``, ``colour`` (the title's) and ``messages``, a list of ``(kind, header, text)``
    with kind 'question', 'left' (the model) or 'right' (the feedback)."""
    import textwrap

    def block(text: str) -> list[str]:
        return sum((textwrap.wrap(p, width) or [""] for p in text.split("\n")), [])

    if not panels:
        raise ValueError("conversations needs at least one panel")
    lines = [sum(len(block(t)) + 2 for _, _, t in p["messages"]) + 8 for p in panels]
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, (max(lines) * 0.16 + 0.4) * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, panel, total in zip(axes.flat, panels, lines, strict=False):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, total)
        if panel.get("image") is not None:
            ax.imshow(panel["image"], extent=(0.0, 0.16, total - 7, total - 0.5), aspect="auto", interpolation="nearest")
        ax.text(0.19, total - 1, panel["title"], fontsize=9, weight="bold", va="top", color=panel.get("colour", "black"))
        y = total - 8
        for kind, header, text in panel["messages"]:
            body = block(text)
            x, face = _BOXES[kind]
            ax.text(x, y, f"{header}\n" + "\n".join(body), fontsize=7.2, va="top", ha="left", family="DejaVu Sans",
                    bbox={"boxstyle": "round,pad=0.3", "facecolor": face, "edgecolor": "#999999", "linewidth": 0.5})
            y -= len(body) + 2
    fig.tight_layout()
    return fig
