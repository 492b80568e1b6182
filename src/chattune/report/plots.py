"""PNG figures with matplotlib (the `report` extra): overlaid loss curves and a token-length histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from chattune.errors import MissingDependencyError, extra_pip
from chattune.files import atomic_path
from chattune.report.runs import RunData

CJK_FONTS = ("Noto Sans CJK SC", "WenQuanYi Micro Hei", "Source Han Sans SC", "SimHei", "Microsoft YaHei")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        # An ImportError too: `sweep` and `data check` skip their PNGs and say why.
        raise MissingDependencyError("matplotlib", pip=extra_pip("report"), needed_for="PNG plots") from None
    matplotlib.use("Agg")  # files only: no display needed, and no GUI toolkit gets imported
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    # Chinese run names and titles need a CJK font after the default one; use those that are installed.
    installed = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [f for f in CJK_FONTS if f in installed]
    if cjk:
        plt.rcParams["font.sans-serif"] = ["DejaVu Sans", *cjk]
    return plt


def loss_curves_png(runs: Sequence[RunData], path: Path, *, title: str = "training loss") -> Path:
    """One line per run (train loss by step), eval loss as dashed lines with markers in the same colour."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    try:
        for i, run in enumerate(runs):
            colour = f"C{i % 10}"
            steps, losses = run.series("loss")
            if steps:
                ax.plot(steps, losses, color=colour, linewidth=1.6, label=run.name)
            e_steps, e_losses = run.series("eval_loss")
            if e_steps:
                ax.plot(e_steps, e_losses, color=colour, linestyle="--", marker="o", linewidth=1.2,
                        label=f"{run.name} (eval)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


def length_histogram_png(lengths: Sequence[int], max_length: int, path: Path, *, title: str = "tokens per sample",
                         bins: int = 40) -> Path:
    """Histogram of sample lengths with max_length marked and the samples past it in red."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    try:
        inside = [v for v in lengths if v <= max_length]
        over = [v for v in lengths if v > max_length]
        lo, hi = min(lengths, default=0), max(lengths, default=1)
        edges = [lo + (hi - lo + 1) * k / bins for k in range(bins + 1)]
        ax.hist([inside, over], bins=edges, stacked=True, color=["#3b82f6", "#dc2626"],
                label=[f"≤ max_length ({len(inside)})", f"truncated ({len(over)})"])
        ax.axvline(max_length, color="#dc2626", linestyle="--", linewidth=1.2)
        ax.set_xlabel("tokens (whole sample, before max_length)")
        ax.set_ylabel("samples")
        ax.set_title(f"{title}; max_length = {max_length}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:  # the temporary name hides the suffix: name the format
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png")
