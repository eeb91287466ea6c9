"""Run the real `flwr` CLI in a subprocess, offline, on a private home and ports.

`flwr run .` starts a detached local SuperLink that outlives the run and is
reused by any later run on the same port, whatever its FLWR_HOME: each test gets
its own FLWR_HOME and free ports, and stops the SuperLink it started, by PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def offline_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """Environment for the flwr CLI: private home, no dependency install, no network."""
    env = dict(os.environ)
    http_port = free_port()
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of flower-superlink processes whose command line names ``flwr_home``."""
    found = subprocess.run(["pgrep", "-f", f"flower-superlink .*{flwr_home}"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def stop_processes(pids: list[int], timeout: float = 15.0) -> None:
    """SIGTERM each PID, wait, then SIGKILL what is left."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def flwr_run_simulation(
    flwr_home: Path, *, num_supernodes: int, run_config: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`flwr run . --stream` on a local simulation; stops the SuperLink afterwards.

    Note: ``flwr run --stream`` exits 0 even when the ServerApp fails, so callers
    assert on the files the run wrote, not on the exit code alone.
    """
    env = offline_env(flwr_home)
    command = [
        str(BIN / "flwr"),
        "run",
        ".",
        "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
        "--run-config",
        run_config,
    ]
    try:
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        stop_processes(superlink_pids(flwr_home))
