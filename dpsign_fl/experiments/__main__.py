"""Command line: ``python -m dpsign_fl.experiments RECIPE --data-dir DIR --out DIR``.

Writes ``OUT/results.json`` (a list of run records, rewritten after each run),
``OUT/accuracy.png`` (test accuracy against rounds, one line per run),
``OUT/runs/LABEL.png`` (accuracy and epsilon of one run) and prints a table.
Runs already in ``OUT/results.json`` under another label are kept, so a recipe
can be run piecewise with ``--only``; ``--resume`` also keeps those of this
invocation's labels that were run with the same settings (:func:`resume_runs`).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch

from ..atomic_file import json_safe, write_json_atomic
from ..results import plot_metrics
from ..settings import ConfigError, tuning_warnings
from .loop import Experiment, experiment_from_fields, run_experiment
from .recipes import RECIPES, RecipeOptions, get_recipe

RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy.png"
RESUME_IGNORED_KEYS = ("data-dir",)
"""Run-config keys that ``--resume`` lets differ: where the data lives, not which run
(the Flower app's resume lets ``data-dir`` change too)."""
TABLE_COLUMNS = (
    ("label", "run", "{}"),
    ("method", "method", "{}"),
    ("noise", "noise", "{}"),
    ("dataset", "dataset", "{}"),
    ("partitioner", "partition", "{}"),
    ("target_epsilon", "target eps", "{:g}"),
    ("epsilon", "eps", "{:.3f}"),
    ("noise_multiplier", "sigma", "{:.3f}"),
    ("sample_rate", "q", "{:g}"),
    ("rounds", "T", "{}"),
    ("learning_rate", "lr", "{:.3g}"),
    ("test_accuracy", "accuracy", "{:.4f}"),
    ("test_robust_accuracy", "robust accuracy", "{:.4f}"),
    ("wall_seconds", "wall s", "{:.1f}"),
)


def main(argv: list[str] | None = None) -> int:
    """Run a recipe; return the exit status."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = get_recipe(args.recipe)
    runs = recipe.runs(RecipeOptions(rounds=args.rounds, quick=args.quick, seed=args.seed))
    first_run = runs[0]
    floor = recipe.floor
    if args.only:  # first: --set must only be valid for the runs that will run
        patterns = [p for p in args.only.split(",") if p]
        runs = [run for run in runs if any(fnmatch.fnmatchcase(run.name(), p) for p in patterns)]
        if floor is not None and not any(fnmatch.fnmatchcase(floor[0], p) for p in patterns):
            floor = None
        if not runs and floor is None:
            print(f"--only {args.only!r} matches no run of recipe {recipe.name}", file=sys.stderr)
            return 2
    try:
        changes = _overrides(args.set)
        if args.data_dir is not None:
            changes["data_dir"] = args.data_dir
        runs = [experiment_from_fields(changes, run) for run in runs]
        first_run = experiment_from_fields({"data_dir": args.data_dir} if args.data_dir is not None else {}, first_run)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in _tuning_warnings(runs):
        print(f"warning: {line}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume:
        stored = _load_previous(out / RESULTS_FILE, set())
        kept, runs = resume_runs(runs, stored, log=lambda line: print(f"--resume: {line}", file=sys.stderr))
        rerun = {run.name() for run in runs}
        records = [record for record in stored if record.get("label") not in rerun]
        if kept:
            print(f"--resume: {len(kept)} run(s) already in {out / RESULTS_FILE} with the same settings, "
                  f"{len(runs)} to go", file=sys.stderr)
    else:
        records = _load_previous(out / RESULTS_FILE, {run.name() for run in runs})
    cache: dict = {}
    if floor is not None:
        label, fit = floor
        records = [record for record in records if record.get("label") != label]
        record = {**fit(_cached_dataset(cache, first_run)), "recipe": recipe.name}
        records.append(record)
        write_json_atomic(out / RESULTS_FILE, records)
        print(_format_row(record), file=sys.stderr, flush=True)
    for experiment in runs:
        dataset = _cached_dataset(cache, experiment)
        record = run_experiment(experiment, dataset=dataset, progress=not args.no_progress)
        record["recipe"] = recipe.name
        record["command"] = " ".join(["python -m dpsign_fl.experiments"] + sys.argv[1:]) if argv is None else None
        records.append(record)
        write_json_atomic(out / RESULTS_FILE, records)
        print(_format_row(record), file=sys.stderr, flush=True)
        if not args.no_plots:
            plot_metrics(_plottable(record["history"]), out / "runs" / f"{record['label']}.png", title=record["label"])
    if not args.no_plots:
        plot_accuracy(records, out / PLOT_FILE, title=f"{recipe.name}: {recipe.description}")
    print(format_table(records))
    return 0


def _tuning_warnings(runs: list[Experiment]) -> list[str]:
    """The settings checker's warnings (:func:`dpsign_fl.settings.tuning_warnings`) for ``runs``.

    Each text once, after the labels of the runs it concerns.
    """
    labels: dict[str, list[str]] = {}
    for run in runs:
        for text in tuning_warnings(run.run):
            labels.setdefault(text, []).append(run.name())
    return [f"{', '.join(names)}: {text}" for text, names in labels.items()]


def resume_runs(
    runs: list[Experiment], stored: list[dict], *, log: Callable[[str], None]
) -> tuple[list[str], list[Experiment]]:
    """Split this invocation's runs into those already done and those still to run.

    A stored record counts as done only when its ``run_config`` equals the run's
    (:meth:`Experiment.run_config`, after ``--set``, ``--rounds``, ``--quick`` and
    ``--seed``), keys in :data:`RESUME_IGNORED_KEYS` aside. A run stored with other
    settings, or without a ``run_config`` (results.json written by an older
    version: nothing shows its settings were the same), is run again, and the
    caller drops its old record, with a log line naming the label and, when
    known, each key that differs (``old -> new``).

    Rerun rather than refuse: without ``--resume`` the same command already
    replaces the records of the labels it runs, so a changed ``--set`` means
    "these settings now"; ``--resume`` only spares the runs that are truly done.
    Keeping the old record would report results under settings never asked for;
    refusing would make the user delete results by hand for the same outcome.

    Args:
        runs: the runs this invocation would make.
        stored: the records already in results.json.
        log: called with one line per run that is run again.

    Returns:
        (labels of the runs already done, the runs still to run), in ``runs`` order.
    """
    by_label = {record.get("label"): record for record in stored}
    done, to_run = [], []
    for run in runs:
        record = by_label.get(run.name())
        if record is None:
            to_run.append(run)
            continue
        if "run_config" not in record:
            log(f"{run.name()} in {RESULTS_FILE} has no run config (written by an older version), running it again")
            to_run.append(run)
            continue
        changes = _config_changes(record["run_config"], json_safe(run.run_config()))
        if changes:
            log(f"{run.name()} in {RESULTS_FILE} was run with other settings, running it again: {', '.join(changes)}")
            to_run.append(run)
        else:
            done.append(run.name())
    return done, to_run


def _config_changes(old: dict, new: dict) -> list[str]:
    """``key old -> new`` for each run-config key that differs; a key that one side lacks differs."""
    changes = []
    for key in {**old, **new}:
        if key in RESUME_IGNORED_KEYS or (key in old and key in new and old[key] == new[key]):
            continue
        changes.append(f"{key} {_shown_setting(old, key)} -> {_shown_setting(new, key)}")
    return changes


def _shown_setting(config: dict, key: str) -> str:
    return repr(config[key]) if key in config else "absent"


def format_table(records: list[dict]) -> str:
    """Return a Markdown table of the runs' main numbers."""
    header = "| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "---|" * len(TABLE_COLUMNS)
    return "\n".join([header, rule] + [_format_row(record) for record in records])


def plot_accuracy(records: list[dict], path: Path, *, title: str = "") -> None:
    """Plot test accuracy against rounds for every run (one line each) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(7.0, 4.5))
    for record in records:
        history = record["history"]
        axis.plot([h["round"] for h in history], [h["accuracy"] for h in history], "-", lw=1.2, label=record["label"])
    axis.set_xlabel("round (one release per client)")
    axis.set_ylabel("test accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6, ncol=2)
    if title:
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpsign_fl.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=tuple(RECIPES), help="experiment to run")
    parser.add_argument("--data-dir", default=None, help="directory holding the dataset (read only)")
    parser.add_argument("--out", required=True, help="directory for results.json and the PNG plots")
    parser.add_argument("--rounds", type=int, default=None, help="replace every run's number of rounds")
    parser.add_argument("--quick", action="store_true", help="tiny configuration (tests, smoke runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data partition, model init and clients")
    parser.add_argument("--only", default="", help="comma-separated run labels or shell patterns ('*eps3*') of the runs to run")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a setting of every run (a RunSettings or Experiment field, or its run-config key), "
        "e.g. --set learning-rate=0.02 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip the runs already in OUT/results.json with the same settings (an interrupted grid goes on "
        "where it stopped); a label stored with other settings is run again",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--no-plots", action="store_true", help="write results.json only")
    return parser


def _overrides(items: list[str]) -> dict[str, str]:
    changes = {}
    for item in items:
        name, equals, text = item.partition("=")
        if not equals:
            raise ConfigError(f"--set takes FIELD=VALUE, got {item!r}")
        changes[name.strip()] = None if text.strip().lower() == "none" else text.strip()
    return changes


def _cached_dataset(cache: dict, experiment: Experiment):
    """Load each dataset once per invocation, not once per run."""
    from ..data.features import load_run_dataset

    run = experiment.run
    key = (run.dataset, run.data_dir, run.data_seed, run.model_name)
    if key not in cache:
        cache[key] = load_run_dataset(run)
    return cache[key]


def _load_previous(path: Path, replaced: set[str]) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        previous = json.load(handle)
    return [record for record in previous if record.get("label") not in replaced]


def _plottable(history: list[dict]) -> list[dict]:
    return [{**h, "epsilon": h["epsilon"] if h["epsilon"] is not None and math.isfinite(h["epsilon"]) else None} for h in history]


def _format_row(record: dict) -> str:
    cells = []
    for key, _, pattern in TABLE_COLUMNS:
        value = record.get(key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            cells.append("inf" if key == "epsilon" else "-")
        else:
            cells.append(pattern.format(value))
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
