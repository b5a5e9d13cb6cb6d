"""Plots shared by the evaluations: line plots (matplotlib, written without a display) for
pictures such as WER against SNR, recall@K against K or similarity against layer. Their
Markdown tables come from ``mmssl.tables``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

# colour-blind-safe palette (Okabe & Ito, 2008)
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def line_plot(
    x: Sequence[float] | Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    ylim: tuple[float | None, float | None] | None = None,
    styles: Mapping[str, str] | None = None,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """One line per entry of ``series`` (name -> y per x; None leaves a gap), saved as a PNG
    (or any format matplotlib knows from the suffix). ``styles`` maps a series name to a
    matplotlib line style (``"-"``, ``"--"``, ``":"``), e.g. one style per noise type with one
    colour per modality given by ``colors`` (series name -> matplotlib colour; by default each
    series takes the next colour of the palette). Returns the path."""
    # lazy: matplotlib takes a second to import; only plots need it
    import matplotlib

    matplotlib.use("Agg", force=False)
    # lazy: matplotlib takes a second to import; only plots need it
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    positions = list(range(len(x))) if x and isinstance(x[0], str) else list(x)
    for j, (name, ys) in enumerate(series.items()):
        values = [float("nan") if y is None else float(y) for y in ys]
        colour = (colors or {}).get(name, PALETTE[j % len(PALETTE)])
        ax.plot(
            positions,
            values,
            label=name,
            color=colour,
            marker=MARKERS[j % len(MARKERS)],
            linestyle=(styles or {}).get(name, "-"),
            linewidth=1.8,
            markersize=4,
        )
    if x and isinstance(x[0], str):
        ax.set_xticks(positions, list(x))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
