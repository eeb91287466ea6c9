"""The ServerApp's body: build model and strategy from the run config, run, write results.

Writes to ``results-dir`` (a relative path is taken from the directory the
ServerApp runs in; pass an absolute path to be sure where files go):

- ``metrics.json``: a list with one object per round: ``round``, ``accuracy``,
  ``loss`` (null on rounds that were not evaluated), ``epsilon`` (largest
  epsilon spent among the clients that replied), ``voters``, ``dropped``,
  ``uplink-bytes`` (serialised sign payloads received that round) and
  ``payload-bytes`` (ceil(d/8) per client); rewritten after every round.
- ``model.pt``: the final model's ``state_dict``.
- ``accuracy_epsilon.png``: test accuracy and epsilon against rounds.
- ``run_config.json``: the validated run config.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from ..config import RunConfig, parse_run_config
from ..data import load_dataset
from ..models import build_model, default_model
from ..results import plot_metrics, write_json_atomic
from ..training import evaluate
from .records import load_arrays_into_model, model_to_arrays
from .strategy import SignMajorityVote

METRICS_FILE = "metrics.json"
MODEL_FILE = "model.pt"
PLOT_FILE = "accuracy_epsilon.png"


def build_strategy(config: RunConfig) -> SignMajorityVote:
    """Return the strategy configured by the run config."""
    return SignMajorityVote(
        fraction_train=config.fraction_train,
        min_train_nodes=config.min_train_nodes,
        min_available_nodes=config.min_available_nodes,
        learning_rate=config.learning_rate,
        lr_schedule=config.lr_schedule,
        server_momentum=config.server_momentum,
    )


def run_server(grid: Grid, context: Context) -> list[dict]:
    """Train with DP-SignSGD for ``num-server-rounds`` rounds; return the per-round records."""
    config = parse_run_config(context.run_config)
    results_dir = Path(config.results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results_dir / "run_config.json", config.to_run_config())
    dataset = load_dataset(config.dataset, data_dir=config.data_dir or None)
    model = build_model(
        config.model or default_model(config.dataset),
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        seed=config.seed_value,
    )
    strategy = build_strategy(config)
    records: list[dict] = []
    started = time.monotonic()

    def evaluate_and_record(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        accuracy = loss = None
        last = server_round == config.num_server_rounds
        if server_round == 0 or server_round % config.eval_every == 0 or last:
            load_arrays_into_model(model, arrays)
            loss, accuracy = evaluate(model, dataset.test_inputs, dataset.test_targets)
        if server_round == 0:
            log(INFO, "round 0: accuracy %.4f, loss %.4f (initial model)", accuracy, loss)
            return MetricRecord({"accuracy": accuracy, "loss": loss})
        train = strategy.round_metrics.get(server_round, {})
        record = {
            "round": server_round,
            "accuracy": accuracy,
            "loss": loss,
            "epsilon": train.get("epsilon"),
            "voters": train.get("voters", 0),
            "dropped": train.get("dropped", 0),
            "uplink-bytes": train.get("uplink-bytes", 0),
            "payload-bytes": train.get("payload-bytes"),
            "wall-seconds": round(time.monotonic() - started, 3),
        }
        records.append(record)
        write_json_atomic(results_dir / METRICS_FILE, records)
        if accuracy is None:
            return None
        log(
            INFO,
            "round %d: accuracy %.4f, loss %.4f, epsilon %.4f, voters %d, dropped %d",
            server_round,
            accuracy,
            loss,
            record["epsilon"] or 0.0,
            record["voters"],
            record["dropped"],
        )
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    result = strategy.start(
        grid=grid,
        initial_arrays=model_to_arrays(model),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        evaluate_fn=evaluate_and_record,
    )
    load_arrays_into_model(model, result.arrays if len(result.arrays) else model_to_arrays(model))
    torch.save(model.state_dict(), results_dir / MODEL_FILE)
    plot_metrics(records, results_dir / PLOT_FILE, title=f"DP-SignSGD on {config.dataset}, target epsilon {config.target_epsilon:g}")
    log(INFO, "results written to %s", results_dir)
    return records
