"""Print Markdown tables (one row per run, with its exact command) from results.json files.

Usage: python scripts/results_tables.py OUT_DIR [OUT_DIR ...]

Used to write docs/results.md from measured runs; it prints, it never edits docs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

COLUMNS = (
    ("label", "run", "{}"),
    ("partitioner", "partition", "{}"),
    ("noise", "gradient noise", "{}"),
    ("target_epsilon", "target eps", "{:g}"),
    ("epsilon", "eps spent", "{:.3f}"),
    ("target_delta", "delta", "{:.2e}"),
    ("noise_multiplier", "sigma", "{:.3f}"),
    ("sample_rate", "q", "{:g}"),
    ("rounds", "T", "{}"),
    ("learning_rate", "lr", "{:.3g}"),
    ("test_accuracy", "accuracy", "{:.2%}"),
    ("test_accuracy_tail_average", "acc. (mean of last 10%)", "{:.2%}"),
    ("wall_seconds", "wall s", "{:.0f}"),
)


def format_cell(record: dict, key: str, pattern: str) -> str:
    """Format one cell; missing values are '-', infinite epsilon is 'inf (not private)'."""
    value = record.get(key)
    if key in ("target_epsilon", "target_delta", "noise_multiplier") and not _private(record):
        return "-"
    if key == "epsilon" and (value is None or (isinstance(value, float) and not math.isfinite(value))):
        return "inf (not private)"
    if value is None:
        return "-"
    return pattern.format(value).replace("%", " %") if pattern.endswith("%}") else pattern.format(value)


def _private(record: dict) -> bool:
    epsilon = record.get("epsilon")
    return epsilon is not None and math.isfinite(epsilon)


def main(paths: list[str]) -> None:
    """Print one table per results.json found under the given folders."""
    for folder in paths:
        records = json.loads((Path(folder) / "results.json").read_text())
        print(f"\n<!-- {folder} -->")
        print("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for record in records:
            print("| " + " | ".join(format_cell(record, key, pattern) for key, _, pattern in COLUMNS) + " |")
        print()
        commands = {record.get("command") for record in records}
        if len(commands) == 1:
            print(f"Every row: `{commands.pop()}`")
            continue
        for record in records:
            print(f"- `{record['label']}`: `{record.get('command')}`")


if __name__ == "__main__":
    main(sys.argv[1:])
