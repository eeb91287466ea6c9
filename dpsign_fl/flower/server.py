"""The ServerApp's body: build model and strategy from the run config, run, write results.

Writes to ``results-dir`` (a relative path is taken from the directory the
ServerApp runs in; pass an absolute path to be sure where files go):

- ``metrics.json``: a list with one object per round: ``round``, ``accuracy``,
  ``loss`` (null on rounds that were not evaluated), ``epsilon`` (largest
  epsilon spent among the clients that replied), ``voters``, ``dropped``
  (error and invalid replies), ``missing`` (sampled nodes that did not reply
  before the wait ended: ``round-grace`` seconds after ``min-train-nodes``
  replies without error, at most ``round-timeout``), ``missing-nodes`` (their
  node ids, sorted), ``uplink-bytes`` (serialised sign payloads
  received that round), ``payload-bytes`` (ceil(d/8) per client),
  ``downlink-bytes`` (array bytes sent that round: votes, or models),
  ``full-syncs`` (nodes sent the whole model), ``excluded`` (valid replies
  the robust vote left out) and ``wall-seconds``;
  rewritten after every round.
- ``checkpoint.npz``: every ``checkpoint-every`` rounds (0 = never), see
  :mod:`dpsign_fl.checkpoint`. With ``resume=true`` the run continues after
  the checkpoint's round; ``resume=false`` deletes an old checkpoint first.
- ``model.pt``: the final model's ``state_dict``.
- ``accuracy_and_epsilon_by_round.png``: test accuracy (from the initial
  model on) and the epsilon spent, against rounds.
- ``run_config.json``: the validated run config.

A bad run config fails before round 1 with one :class:`ConfigError` naming
the key, logged as one ERROR line.
"""

from __future__ import annotations

import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from ..checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    python_rng_state,
    restore_python_rng_state,
    save_checkpoint,
)
from ..atomic_file import write_json_atomic
from ..data import Dataset
from ..data.features import load_run_dataset
from ..evaluation import evaluate, robust_accuracy
from ..initial_model import initial_model
from ..results import plot_metrics
from ..settings import ConfigError, FlowerOptions, RunSettings, parse_run_config, run_config_of, tuning_warnings
from ..vote.kernel import describe_kernel
from .records import arrays_to_flat, flat_to_arrays, load_arrays_into_model, model_to_arrays
from .strategy import SignMajorityVote

METRICS_FILE = "metrics.json"
MODEL_FILE = "model.pt"
PLOT_FILE = "accuracy_and_epsilon_by_round.png"
RUN_CONFIG_FILE = "run_config.json"
RESUMABLE_CHANGES = (
    "resume",
    "checkpoint-every",
    "round-timeout",
    "round-grace",
    "results-dir",
    "data-dir",
    "eval-every",
    "min-train-nodes",
    "min-available-nodes",
)
"""Run-config keys a resumed run may change; all others must equal the checkpointed run's."""


def build_strategy(settings: RunSettings, options: FlowerOptions) -> SignMajorityVote:
    """Return the strategy configured by the run config."""
    return SignMajorityVote(
        fraction_train=options.fraction_train,
        min_train_nodes=options.min_train_nodes,
        min_available_nodes=options.min_available_nodes,
        learning_rate=settings.learning_rate,
        lr_schedule=settings.lr_schedule,
        server_momentum=settings.server_momentum,
        vote=settings.vote,
        client_schedule=settings.client_schedule,
    )


def run_server(grid: Grid, context: Context, *, experiments: Any | None = None) -> list[dict]:
    """Train with DP-SignSGD until round ``num-server-rounds``; return the per-round records.

    ``experiments``: the experiments' seam the app installs
    (:data:`dpsign_fl.experiments.hooks.FLOWER_EXPERIMENTS`): its
    ``options(run_config)`` checks the experiment-only keys before round 1
    and they are recorded with the run config. None: no experiment keys.

    Raises:
        ConfigError: before round 1, for a bad run-config value, a missing
            ``data-dir``, or a checkpoint that does not fit (``resume=true``).
    """
    try:
        groups = () if experiments is None else (experiments.options(context.run_config),)
        settings, options, dataset, results_dir = prepare_run(context.run_config, recorded_groups=groups)
        # A run that goes on from its checkpoint takes every weight and statistic from it: no pretraining first.
        resuming = options.resume and (results_dir / CHECKPOINT_FILE).exists()
        model = build_server_model(settings, dataset, with_pretraining=not resuming)
        strategy = build_strategy(settings, options)
        recorder = RoundRecorder(settings, options, results_dir, model, dataset, run_config=run_config_of(settings, options, *groups))
        arrays = recorder.resume_or_start(strategy)
    except ConfigError as error:
        log(ERROR, "run config rejected before round 1: %s", error)
        raise
    _poll_simulation_often(grid)
    if recorder.first_round <= settings.num_rounds:
        result = strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=settings.num_rounds,
            timeout=options.round_timeout,
            grace=options.round_grace,
            evaluate_fn=recorder.evaluate,
            first_round=recorder.first_round,
            round_end_fn=lambda *args: recorder.record(strategy, *args),
        )
        arrays = result.arrays
    write_final_results(settings, results_dir, model, arrays, recorder.records, start=recorder.start)
    return recorder.records


def _poll_simulation_often(grid: Grid) -> None:
    """Let Flower's in-memory simulation grid look for replies every 10 ms instead of 100 ms.

    ``InMemoryGrid(pull_interval=0.1)`` is how ``flwr run`` builds the grid of a
    simulation; polling an in-memory state is cheap, and a round of small models
    was measured to spend about a third of its time in this wait. A deployment's
    grid, which polls a SuperLink over the network, is left as it is.
    """
    if type(grid).__name__ == "InMemoryGrid" and getattr(grid, "pull_interval", 0) > 0.01:
        grid.pull_interval = 0.01


def prepare_run(run_config, *, recorded_groups: tuple = ()) -> tuple[RunSettings, FlowerOptions, Dataset, Path]:
    """Validate the run config, load the test data and create ``results-dir``.

    ``recorded_groups``: further settings groups written to run_config.json.

    Raises:
        ConfigError: naming the key (``data-dir`` for data that cannot be read).
    """
    settings, options = parse_run_config(run_config)
    for warning in tuning_warnings(settings, options):
        log(WARNING, "%s", warning)
    if settings.data_dir and not Path(settings.data_dir).expanduser().is_absolute():
        raise ConfigError(
            f"data-dir must be an absolute path, got {settings.data_dir!r}: the ServerApp and the ClientApps run "
            f"from the SuperLink's directory ({Path.cwd()}), not from where flwr run was typed"
        )
    if settings.data_dir and not Path(settings.data_dir).is_dir():
        raise ConfigError(
            f"data-dir must be an existing folder, got {settings.data_dir!r} "
            f"(resolved to {Path(settings.data_dir).resolve()})"
        )
    try:
        dataset = load_run_dataset(settings)
    except ImportError as error:
        raise ConfigError(f"model {settings.model_name!r}: {error}") from None
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"data-dir {settings.data_dir!r} (empty = built-in or Hugging Face hub) did not give dataset "
            f"{settings.dataset!r}: {error}"
        ) from None
    results_dir = Path(options.results_dir).resolve()
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"results-dir {str(results_dir)!r} could not be created: {error}") from None
    write_json_atomic(results_dir / RUN_CONFIG_FILE, run_config_of(settings, options, *recorded_groups))
    log(INFO, "results go to %s", results_dir)
    try:
        kernel, fallback = describe_kernel()  # compiles the vote kernel now (once per machine), not in round 1
    except (ValueError, RuntimeError) as error:
        raise ConfigError(str(error)) from None
    log(WARNING if fallback else INFO, "votes are counted by the %s kernel%s", kernel, f"; {fallback}" if fallback else "")
    return settings, options, dataset, results_dir


def build_server_model(settings: RunSettings, dataset: Dataset, *, with_pretraining: bool = True) -> torch.nn.Module:
    """Return the initial global model (:func:`dpsign_fl.initial_model.initial_model`): drawn with
    ``model-seed``, public statistics fitted and public pretraining done where the settings ask
    (and ``with_pretraining``: a resumed run takes its weights from the checkpoint).

    Raises:
        ConfigError: if ``model`` does not fit the dataset's inputs, or its public data is missing.
    """
    try:
        return initial_model(settings, dataset, log=lambda line: log(INFO, "%s", line), with_pretraining=with_pretraining)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"model {settings.model_name!r} for dataset {settings.dataset!r}: {error}") from None


def check_resumable(saved: dict, current: dict) -> None:
    """Check that the run config equals the checkpointed run's, except :data:`RESUMABLE_CHANGES`.

    Raises:
        ConfigError: naming the first key that differs.
    """
    for key, value in current.items():
        if key in RESUMABLE_CHANGES or saved.get(key) == value:
            continue
        raise ConfigError(
            f"resume=true continues the checkpointed run, so {key} must stay {saved.get(key)!r}, got {value!r} "
            f"(only {', '.join(RESUMABLE_CHANGES)} may change)"
        )


def write_final_results(
    settings: RunSettings, results_dir: Path, model: torch.nn.Module, arrays: ArrayRecord, records: list[dict],
    *, start: dict | None = None,
) -> None:
    """Write ``model.pt`` and the accuracy/epsilon plot."""
    load_arrays_into_model(model, arrays)
    torch.save(model.state_dict(), results_dir / MODEL_FILE)
    clients = max((r["voters"] + r["dropped"] + r["missing"] for r in records), default=0)
    title = (
        f"DP-SignSGD on {settings.dataset}: target epsilon {settings.target_epsilon:g} at delta "
        f"{settings.target_delta:g}, {clients} clients per round"
    )
    plot_metrics(records, results_dir / PLOT_FILE, title=title, start=start)
    log(INFO, "results written to %s", results_dir)


class RoundRecorder:
    """Evaluates the global model, writes ``metrics.json`` and checkpoints, round by round.

    ``evaluate`` is the strategy's ``evaluate_fn``; ``record`` its
    ``round_end_fn``, called after each round with that round's train metrics.
    The checkpoint is written before the round's row, so a row in
    ``metrics.json`` for a checkpoint round means the checkpoint is on disk.
    """

    def __init__(
        self,
        settings: RunSettings,
        options: FlowerOptions,
        results_dir: Path,
        model: torch.nn.Module,
        dataset: Dataset,
        *,
        run_config: dict[str, Any],
    ):
        self.run_config = run_config  # what checkpoints record and a resumed run must match
        self.settings = settings
        self.options = options
        self.results_dir = results_dir
        self.model = model
        self.dataset = dataset
        self.records: list[dict] = []
        self.start: dict | None = None
        self.first_round = 1
        self._started = time.monotonic()

    @property
    def checkpoint_path(self) -> Path:
        return self.results_dir / CHECKPOINT_FILE

    def resume_or_start(self, strategy: SignMajorityVote) -> ArrayRecord:
        """Return the model to start from: the checkpoint's with ``resume=true``, else the initial one.

        Raises:
            ConfigError: if the checkpoint is corrupt or from a different run config.
        """
        initial = model_to_arrays(self.model)
        if not self.options.resume:
            if self.checkpoint_path.exists():
                self.checkpoint_path.unlink()
                log(INFO, "resume=false: deleted the checkpoint of an earlier run in %s", self.results_dir)
            return initial
        if not self.checkpoint_path.exists():
            log(WARNING, "resume=true but no %s in %s: starting at round 1", CHECKPOINT_FILE, self.results_dir)
            return initial
        try:
            checkpoint = load_checkpoint(self.checkpoint_path)
            check_resumable(checkpoint.run_config, self.run_config)
            arrays = flat_to_arrays(checkpoint.weights, initial)
        except (CheckpointError, ValueError) as error:
            raise ConfigError(f"resume=true: {error}") from None
        strategy.load_state_dict(
            {"updater": checkpoint.updater_state, "epsilon-seen": checkpoint.epsilon_seen, "draws": checkpoint.draws}
        )
        restore_python_rng_state(checkpoint.rng_state)
        self.records = [dict(row) for row in checkpoint.metrics]
        self.first_round = checkpoint.server_round + 1
        last_wall = self.records[-1].get("wall-seconds", 0.0) if self.records else 0.0
        self._started = time.monotonic() - float(last_wall or 0.0)
        log(INFO, "resume=true: continuing after round %d from %s", checkpoint.server_round, self.checkpoint_path)
        log(
            WARNING,
            "resume: clients' privacy ledgers are not in the server checkpoint. In simulation they live in "
            "context.state and restart empty in this new run, so the epsilon clients report restarts and the "
            "rounds before the interruption add to it; deploy with per-client ledger files for a budget that "
            "survives a restart (docs/robustness.md).",
        )
        return arrays

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate the model after ``server_round`` when due (round first_round - 1: the start model)."""
        last = server_round == self.settings.num_rounds
        start = server_round < self.first_round
        if not (start or last or server_round % self.settings.eval_every == 0):
            return None
        load_arrays_into_model(self.model, arrays)
        loss, accuracy = evaluate(self.model, self.dataset.test_inputs, self.dataset.test_targets)
        if start:
            which = "initial model" if server_round == 0 else "model from the checkpoint"
            log(INFO, "round %d: accuracy %.4f, loss %.4f (%s)", server_round, accuracy, loss, which)
            if server_round == 0:
                self.start = {"round": 0, "accuracy": accuracy, "loss": loss}
        metrics = {"accuracy": accuracy, "loss": loss}
        attack = self.settings.robust_evaluation
        if attack is not None:
            # The server's own test set and random starts: nothing here is private.
            generator = torch.Generator().manual_seed(self.settings.model_seed * 1_000_003 + server_round)
            metrics["robust-accuracy"] = robust_accuracy(
                self.model, self.dataset.test_inputs, self.dataset.test_targets, attack, generator=generator
            )
            log(INFO, "round %d: robust accuracy %.4f (PGD-20 at adv-epsilon %g)", server_round,
                metrics["robust-accuracy"], attack.epsilon)
        return MetricRecord(metrics)

    def record(
        self,
        strategy: SignMajorityVote,
        server_round: int,
        arrays: ArrayRecord,
        train: MetricRecord,
        evaluated: MetricRecord | None,
    ) -> None:
        """Append the round's row to ``metrics.json`` (and checkpoint first when due)."""
        row = {
            "round": server_round,
            "accuracy": evaluated["accuracy"] if evaluated is not None else None,
            "robust-accuracy": (
                evaluated["robust-accuracy"] if evaluated is not None and "robust-accuracy" in evaluated else None
            ),
            "loss": evaluated["loss"] if evaluated is not None else None,
            "epsilon": train["epsilon"],
            "voters": train["voters"],
            "dropped": train["dropped"],
            "missing": train["missing"],
            "missing-nodes": list(train["missing-nodes"]),
            "uplink-bytes": train["uplink-bytes"],
            "payload-bytes": train["payload-bytes"],
            "downlink-bytes": train["downlink-bytes"],
            "full-syncs": train["full-syncs"],
            "excluded": train["excluded"],
            "wall-seconds": round(time.monotonic() - self._started, 3),
        }
        self.records.append(row)
        if self.options.checkpoint_every and server_round % self.options.checkpoint_every == 0:
            self._save_checkpoint(strategy, server_round, arrays)
        write_json_atomic(self.results_dir / METRICS_FILE, self.records)
        if evaluated is not None:
            log(
                INFO,
                "round %d: accuracy %.4f, loss %.4f, epsilon %.4f, voters %d, dropped %d, missing %d, excluded %d",
                server_round, row["accuracy"], row["loss"], row["epsilon"], row["voters"], row["dropped"], row["missing"],
                row["excluded"],
            )

    def _save_checkpoint(self, strategy: SignMajorityVote, server_round: int, arrays: ArrayRecord) -> None:
        state = strategy.state_dict()
        checkpoint = Checkpoint(
            server_round=server_round,
            weights=arrays_to_flat(arrays),
            updater_state=state["updater"],
            epsilon_seen=state["epsilon-seen"],
            draws=state["draws"],
            rng_state=python_rng_state(),
            metrics=self.records,
            run_config=self.run_config,
        )
        save_checkpoint(self.checkpoint_path, checkpoint)
        log(INFO, "round %d: checkpoint written to %s", server_round, self.checkpoint_path)
