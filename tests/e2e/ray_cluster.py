"""A Ray cluster of this machine only, for tests: a head and worker nodes, each stopped by its process group.

Each node is ``ray start --block`` in a process group (a new session) that the
test owns, with its own ``--temp-dir`` under /tmp (Ray's socket paths must stay
short), explicit free ports and ``--num-cpus``. Every process Ray starts for a
node (GCS, raylet, agents, workers) stays in that group, so :meth:`RayCluster.stop`
signals the group by its PGID: never ``ray stop``, which stops every Ray
instance on the machine. Ray writes the cluster address into the node's own
temp dir, not into /tmp/ray, so other Ray users on the machine never discover
this cluster.

Ray turns ``127.0.0.1`` into the machine's own address (a multi-node cluster
cannot live on localhost alone): the nodes listen on it, and both nodes show the
same IP; they differ by node ID and by temp dir.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .harness import BIN, free_port, wait_until

RAY_NODE_START_SECONDS = 180.0
"""How long ``ray start`` may take for one node on a loaded machine (about 6 s when idle)."""

CLIENT_ACTOR_MARKER = ":actor_name:ClientAppActor"
"""First lines of a Ray worker's log files when it hosts one of Flower's ClientApp actors."""


@dataclass
class RayNode:
    """One ``ray start --block`` process (its group holds every process of the node) and its temp dir."""

    name: str
    temp_dir: Path
    process: subprocess.Popen
    command: list[str] = field(repr=False)

    @property
    def log_file(self) -> Path:
        """The output of ``ray start`` itself."""
        return self.temp_dir / "ray-start.log"

    def started(self) -> bool:
        """True once ``ray start`` has written the cluster address into this node's temp dir (its last step)."""
        if self.process.poll() is not None:
            raise RuntimeError(f"ray start ({self.name}) exited with {self.process.returncode}:\n{self.log_tail()}")
        return (self.temp_dir / "ray_current_cluster").exists()

    def log_tail(self, characters: int = 4000) -> str:
        """The end of ``ray start``'s output."""
        return self.log_file.read_text(errors="replace")[-characters:] if self.log_file.exists() else "(no log yet)"

    def client_actor_logs(self) -> dict[Path, str]:
        """Text of the worker log files, on this node, of workers that hosted a Flower ClientApp actor.

        Ray writes each worker's stdout and stderr to ``worker-*.out`` / ``.err``
        in the logs folder of the node that started it.
        """
        logs = self.temp_dir / "session_latest" / "logs"
        texts = {path: path.read_text(errors="replace") for path in sorted(logs.glob("worker-*"))}
        return {path: text for path, text in texts.items() if CLIENT_ACTOR_MARKER in text}


class RayCluster:
    """A Ray head and ``num_workers`` worker nodes on this machine, ``num_cpus`` CPUs each.

    Use as a context manager; every node is stopped on exit, also when starting failed.

    Args:
        num_workers: worker nodes besides the head.
        num_cpus: CPUs that each node offers (``--num-cpus``).
        env: environment of ``ray start`` (and so of every worker process the node starts).
        start_timeout: seconds each node may take to start.

    Raises:
        RuntimeError: if a ``ray start`` exits (its output is quoted).
        TimeoutError: if a node does not start within ``start_timeout``.
    """

    def __init__(
        self, *, num_workers: int = 1, num_cpus: int = 1, env: dict | None = None,
        start_timeout: float = RAY_NODE_START_SECONDS,
    ) -> None:  # fmt: skip
        self.env = dict(os.environ if env is None else env)
        self.env.pop("RAY_ADDRESS", None)  # `ray start --head` must not look for another cluster
        self.env["PATH"] = os.pathsep.join([str(BIN), self.env.get("PATH", "")])
        self.env["RAY_USAGE_STATS_ENABLED"] = "0"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        """The GCS address: what ``ray start --address`` and ``RAY_ADDRESS`` take."""
        self.num_cpus = num_cpus
        self.nodes: list[RayNode] = []
        try:
            head = [
                "--head", "--port", str(self.port), "--include-dashboard=false", "--dashboard-port", str(free_port()),
                "--ray-client-server-port", str(free_port()),
            ]  # fmt: skip
            self._start("head", head, start_timeout)
            for index in range(num_workers):
                self._start(f"worker{index}", ["--address", self.address], start_timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, role: list[str], timeout: float) -> RayNode:
        temp_dir = Path(tempfile.mkdtemp(prefix=f"rt{name[0]}", dir="/tmp"))
        command = [
            str(BIN / "ray"), "start", *role, "--temp-dir", str(temp_dir), "--num-cpus", str(self.num_cpus),
            "--num-gpus", "0", "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0",  # 0: ports the system picks, none shared
            "--disable-usage-stats", "--block",
        ]  # fmt: skip
        with open(temp_dir / "ray-start.log", "wb") as log_file:
            process = subprocess.Popen(
                command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        node = RayNode(name, temp_dir, process, command)
        self.nodes.append(node)
        wait_until(node.started, timeout=timeout, what=f"ray start ({name})", log=node.log_tail)
        return node

    def process_group_pids(self) -> list[int]:
        """Live processes (not zombies) in the nodes' process groups or naming a node's temp dir."""
        groups = {node.process.pid for node in self.nodes}  # each `ray start` leads its own session and group
        temp_dirs = [str(node.temp_dir).encode() for node in self.nodes]
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                command_line = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            state, _, group = stat[stat.rindex(")") + 2 :].split()[:3]
            if state != "Z" and (int(group) in groups or any(path in command_line for path in temp_dirs)):
                found.append(int(entry.name))
        return sorted(found)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM every node's process group (workers first), wait, SIGKILL what is left, by PID; remove the temp dirs."""
        for node in reversed(self.nodes):
            _signal_group(node.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process_group_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.process_group_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for node in self.nodes:
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        wait_until(lambda: not self.process_group_pids(), timeout=30, what="the Ray nodes' processes to go")

    def remove_temp_dirs(self) -> None:
        """Delete every node's temp dir (logs included)."""
        for node in self.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self.stop()
        finally:
            self.remove_temp_dirs()


def _signal_group(group: int, which: int) -> None:
    try:
        os.killpg(group, which)
    except ProcessLookupError:
        pass
