"""Writing run results: metrics.json (one object per round) and a PNG plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence


def write_json_atomic(path: str | Path, data) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(_json_safe(data), handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


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


def _json_safe(value):
    """Replace non-finite floats by None so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value
