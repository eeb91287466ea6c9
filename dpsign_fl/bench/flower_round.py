"""A Flower simulation round against the in-process loop on the same work.

Runs the app in this repository with the real ``flwr run`` (a private
``FLWR_HOME``, free ports, its own local SuperLink, stopped by PID), the same
app's ServerApp and ClientApp logic without the simulation engine
(:func:`dpsign_fl.flower.inprocess.run_in_process`: the strategy, the
records, the replicas and ledgers in ``context.state``, no Ray and no
SuperLink), and the research loop with the same dataset, clients, sample rate
and rounds, one after the other. Per round: the median difference of
consecutive rows' ``wall-seconds`` (the app; evaluation every round) and of
the loop's round end times (the loop also evaluates every round).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..flower.local_superlink import LocalSuperLink

REPOSITORY = Path(__file__).resolve().parents[2]

ROUNDS = 30
"""Rounds of each timed run (the per-round figure is the median of its 29 intervals)."""
SUBMITTED_LINE = "Successfully started run"
"""What ``flwr run`` prints once it has packaged the app folder and the SuperLink accepted the run."""


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def app_available() -> bool:
    """True when the Flower app (pyproject.toml with [tool.flwr.app]) is next to this package."""
    pyproject = REPOSITORY / "pyproject.toml"
    return pyproject.exists() and "[tool.flwr.app]" in pyproject.read_text()


def measure_flower_round(*, num_clients: int = 10, num_rounds: int = ROUNDS, run_config: str = "", timeout: float = 900.0) -> dict:
    """Time a real ``flwr run`` simulation: per round, and from ``flwr run`` to round 1's row.

    ``seconds_to_submit`` is the part of the latter until the SuperLink accepted
    the run: ``flwr`` walks every file under the app folder to package it, a
    virtual environment inside the folder included (None if the line
    :data:`SUBMITTED_LINE` never came).

    Raises:
        RuntimeError: if the run wrote no metrics (its output is quoted).
    """
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as results:
        env = dict(os.environ)
        env.update(
            FLWR_HOME=home, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=_free_port(), FLWR_LOCAL_CONTROL_API_PORT=_free_port(),
        )
        started = time.monotonic()
        with LocalSuperLink(env) as superlink:
            command = [
                str(Path(sys.executable).parent / "flwr"), "run", str(REPOSITORY), "--stream", "--federation-config",
                f"num-supernodes={num_clients} client-resources-num-cpus=1", "--run-config",
                f"num-server-rounds={num_rounds} eval-every=1 reproducible-noise=true results-dir='{results}' {run_config}",
            ]  # fmt: skip
            launched = time.monotonic()
            first_row = submitted = None
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output = []
            for line in process.stdout:
                output.append(line)
                if submitted is None and SUBMITTED_LINE in line:
                    submitted = time.monotonic() - launched
                if first_row is None and "round 1: accuracy" in line:
                    first_row = time.monotonic() - launched
            process.wait(timeout=timeout)
            superlink_seconds = superlink.start_seconds
        metrics = Path(results) / "metrics.json"
        if not metrics.exists():
            raise RuntimeError("flwr run wrote no metrics:\n" + "".join(output[-40:]))
        walls = [row["wall-seconds"] for row in json.loads(metrics.read_text())]
    per_round = [b - a for a, b in zip(walls, walls[1:])]
    return {
        "clients": num_clients,
        "rounds": num_rounds,
        "superlink_start_seconds": superlink_seconds,
        "seconds_to_submit": submitted,
        "seconds_to_round_1": first_row,
        "seconds_per_round": statistics.median(per_round),
        "seconds_per_round_min": min(per_round),
        "total_seconds": time.monotonic() - started,
    }


def measure_app_round(*, num_clients: int = 10, num_rounds: int = ROUNDS, run_config: str = "") -> dict:
    """Time the app's rounds in this process, without Flower's simulation engine (same run config as ``flwr run``).

    The run config starts from the declared defaults, which tests/test_settings.py
    holds equal to pyproject.toml's ``[tool.flwr.app.config]``.
    """
    from ..flower.client import clear_data_cache
    from ..flower.inprocess import run_in_process
    from ..privacy.accounting import clear_accounting_cache
    from ..settings import FlowerOptions, RunSettings, parse_override_string, to_mapping

    clear_data_cache()
    clear_accounting_cache()  # as in the fresh processes flwr run starts

    config = {**to_mapping(RunSettings()), **to_mapping(FlowerOptions())}
    with tempfile.TemporaryDirectory() as results:
        config.update(parse_override_string(
            f"num-server-rounds={num_rounds} eval-every=1 reproducible-noise=true results-dir='{results}' {run_config}"
        ))
        rows = run_in_process(config, num_clients)
    walls = [row["wall-seconds"] for row in rows]
    per_round = [b - a for a, b in zip(walls, walls[1:])]
    return {
        "clients": num_clients,
        "rounds": num_rounds,
        "seconds_per_round": statistics.median(per_round),
        "seconds_per_round_min": min(per_round),
    }


def measure_loop_round(*, num_clients: int = 10, num_rounds: int = ROUNDS, **fields) -> dict:
    """Time the in-process loop on the same work: per round (median), evaluating every round."""
    from ..experiments.loop import Experiment, run_experiment
    from ..privacy.accounting import clear_accounting_cache

    clear_accounting_cache()  # as in a fresh process: the loop's per-round epsilon is computed, not looked up

    stamps: list[float] = []
    experiment = Experiment.create(
        num_clients=num_clients, num_rounds=num_rounds, eval_every=1, reproducible_noise=True, **fields
    )
    started = time.monotonic()
    run_experiment(experiment, progress=False, on_round=lambda _r, _w: stamps.append(time.monotonic()))
    per_round = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "clients": num_clients,
        "rounds": num_rounds,
        "seconds_to_round_1": stamps[0] - started,
        "seconds_per_round": statistics.median(per_round),
        "seconds_per_round_min": min(per_round),
    }
