"""Plots of a run's metrics (the rows of metrics.json) as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_metrics(rounds: Sequence[dict], path: str | Path, *, title: str = "") -> None:
    """Plot test accuracy and epsilon against rounds into a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    evaluated = [r for r in rounds if r.get("accuracy") is not None]
    figure, accuracy_axis = plt.subplots(figsize=(6.4, 4.0))
    accuracy_axis.plot([r["round"] for r in evaluated], [r["accuracy"] for r in evaluated], "o-", color="tab:blue", ms=3)
    accuracy_axis.set_xlabel("round")
    accuracy_axis.set_ylabel("test accuracy", color="tab:blue")
    epsilon_axis = accuracy_axis.twinx()
    epsilon_axis.plot([r["round"] for r in rounds], [r.get("epsilon") or 0.0 for r in rounds], "-", color="tab:red")
    epsilon_axis.set_ylabel("epsilon spent (largest client)", color="tab:red")
    if title:
        accuracy_axis.set_title(title)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
