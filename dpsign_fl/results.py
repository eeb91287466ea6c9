"""Writing run results: metrics.json (one object per round) and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic_file import write_atomic


def write_json_atomic(path: str | Path, data) -> None:
    """Write ``data`` as strict JSON to ``path`` atomically (:func:`write_atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(json_safe(data), indent=2).encode("utf-8"))


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


def json_safe(value):
    """Return ``value`` as strict JSON data: numpy scalars as Python numbers,
    non-finite floats as None, dict keys as strings, tuples as lists."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value
