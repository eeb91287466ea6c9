"""Plots of a run's metrics (the rows of metrics.json) as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_metrics(rounds: Sequence[dict], path: str | Path, *, title: str = "", start: dict | None = None) -> None:
    """Plot test accuracy and the epsilon spent against rounds into a PNG at ``path``.

    Args:
        rounds: rows with ``round``, ``accuracy`` (None when not evaluated) and ``epsilon``.
        path: the PNG file.
        title: the figure's title.
        start: the evaluation of the model before round 1 (``round`` 0, ``accuracy``),
            drawn as the first point, at epsilon 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    points = ([start] if start else []) + [r for r in rounds if r.get("accuracy") is not None]
    figure, accuracy_axis = plt.subplots(figsize=(6.4, 4.0))
    accuracy_line = accuracy_axis.plot(
        [r["round"] for r in points], [r["accuracy"] for r in points], "o-", color="tab:blue", ms=3, label="test accuracy"
    )
    accuracy_axis.set_xlabel("round")
    accuracy_axis.set_ylabel("test accuracy", color="tab:blue")
    accuracy_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    epsilon_axis = accuracy_axis.twinx()
    epsilon_rounds = ([{"round": start["round"], "epsilon": 0.0}] if start else []) + list(rounds)
    epsilon_line = epsilon_axis.plot(
        [r["round"] for r in epsilon_rounds], [r.get("epsilon") or 0.0 for r in epsilon_rounds], "-", color="tab:red",
        label="epsilon spent (largest client)",
    )
    epsilon_axis.set_ylabel("epsilon spent (largest client)", color="tab:red")
    epsilon_axis.set_ylim(bottom=0)
    lines = accuracy_line + epsilon_line
    accuracy_axis.legend(lines, [line.get_label() for line in lines], loc="lower right", fontsize=8)
    if title:
        accuracy_axis.set_title(title, fontsize=10)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
