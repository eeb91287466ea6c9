"""The local SuperLink that ``flwr run .`` uses for simulations: find it, start it, stop exactly it.

``flwr run .`` starts a simulation-mode ``flower-superlink`` in the background
when none answers on ``127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` (default
39091), waits 15 s for it, and leaves it running after the run; any later run
on that port reuses it, whatever its ``FLWR_HOME``. Flower records no PID, so:

- ``python -m dpsign_fl.flower.local_superlink status`` prints the PID of the
  process listening on that port (Linux: read from ``/proc``);
- ``python -m dpsign_fl.flower.local_superlink stop`` stops that process and its
  children, by PID: never by name, so other users' SuperLinks are left alone;
- ``python -m dpsign_fl.flower.local_superlink start`` starts the same SuperLink
  that ``flwr run .`` would, and waits for it as long as it takes a loaded
  machine (``--timeout``, default 240 s) instead of 15 s.

:class:`LocalSuperLink` does the same from Python (tests, benchmarks).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_HTTP_PORT = "39091"
DEFAULT_CONTROL_PORT = "39093"
START_TIMEOUT_SECONDS = 240.0


def ports(env: dict | None = None) -> tuple[int, int]:
    """The (HTTP API, Control API) ports of the local SuperLink, as ``flwr run`` reads them."""
    env = os.environ if env is None else env
    return (
        int(env.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", DEFAULT_HTTP_PORT)),
        int(env.get("FLWR_LOCAL_CONTROL_API_PORT", DEFAULT_CONTROL_PORT)),
    )


def listening_pids(port: int) -> list[int]:
    """PIDs of the processes listening on TCP ``port`` of this machine (Linux ``/proc``; [] elsewhere)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{inode}]")
    found = []
    for entry in Path("/proc").iterdir() if inodes else ():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:
            continue
    return sorted(found)


def healthy(port: int) -> bool:
    """True when the SuperLink's ``/health`` answers 200 on ``127.0.0.1:port``."""
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM ``pid`` and its descendants, wait, then SIGKILL what is left."""
    family = [pid] + descendant_pids(pid)
    for member in family:
        _signal(member, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for member in family:
        while is_alive(member) and time.monotonic() < deadline:
            time.sleep(0.1)
        if is_alive(member):
            _signal(member, signal.SIGKILL)


class LocalSuperLink:
    """A simulation-mode SuperLink started here (the one ``flwr run .`` would start), stopped by PID.

    Args:
        env: the environment it runs in (its ``FLWR_HOME`` and the two port
            variables decide where it keeps its state and listens).
        timeout: seconds to wait for ``/health``.

    Raises:
        TimeoutError: if it does not answer within ``timeout`` (its log is quoted).
        RuntimeError: if it exits first.
    """

    def __init__(self, env: dict, *, timeout: float = START_TIMEOUT_SECONDS) -> None:
        # The SuperLink starts flower-superexec (and ServerApp processes) from PATH: put this
        # interpreter's scripts first, so that a venv's python works without activating the venv.
        scripts = str(Path(sys.executable).parent)
        path = env.get("PATH", "")
        if scripts not in path.split(os.pathsep):
            env = dict(env, PATH=os.pathsep.join([scripts, path]) if path else scripts)
        self.env = env
        self.port, control = ports(env)
        home = Path(env.get("FLWR_HOME") or Path.home() / ".flwr")
        self.log_file = home / "local-superlink" / "superlink.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        binary = Path(sys.executable).parent / "flower-superlink"
        command = [
            str(binary if binary.exists() else "flower-superlink"), "--insecure", "--simulation", "--isolation",
            "subprocess", "--control-api-address", f"127.0.0.1:{control}", "--host", "127.0.0.1",
            "--port", str(self.port), "--log-file", str(self.log_file), "--database",
            str(self.log_file.parent / "state.db"),
        ]  # fmt: skip
        started = time.monotonic()
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            while not healthy(self.port):
                if self.process.poll() is not None:
                    raise RuntimeError(f"the local SuperLink exited with {self.process.returncode}:\n{self.log_tail()}")
                if time.monotonic() - started > timeout:
                    raise TimeoutError(
                        f"the local SuperLink did not answer http://127.0.0.1:{self.port}/health within {timeout:g} s:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def log_tail(self, characters: int = 4000) -> str:
        """The end of the SuperLink's log file."""
        return self.log_file.read_text(errors="replace")[-characters:] if self.log_file.exists() else "(no log yet)"

    def stop(self) -> None:
        """Stop the SuperLink and everything it started, by PID."""
        stop_pid(self.process.pid)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def __enter__(self) -> "LocalSuperLink":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def descendant_pids(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _signal(pid: int, which: int) -> None:
    try:
        os.kill(pid, which)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Command line: status, stop or start the local SuperLink; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m dpsign_fl.flower.local_superlink", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("status", "stop", "start"), help="what to do")
    parser.add_argument("--timeout", type=float, default=START_TIMEOUT_SECONDS, help="seconds to wait for a start (start)")
    args = parser.parse_args(argv)
    port = ports()[0]
    pids = listening_pids(port)
    if args.command == "status":
        print(f"local SuperLink on 127.0.0.1:{port}: " + (f"PID {', '.join(map(str, pids))}" if pids else "not running"))
        return 0
    if args.command == "stop":
        if not pids:
            print(f"no process listens on 127.0.0.1:{port}")
            return 0
        for pid in pids:
            stop_pid(pid)
        print(f"stopped PID {', '.join(map(str, pids))} (127.0.0.1:{port})")
        return 0
    if pids or healthy(port):
        print(f"a SuperLink already listens on 127.0.0.1:{port} (PID {', '.join(map(str, pids))}); flwr run will use it")
        return 0
    superlink = LocalSuperLink(dict(os.environ), timeout=args.timeout)
    print(f"local SuperLink started on 127.0.0.1:{port}, PID {superlink.process.pid}, in {superlink.start_seconds:.1f} s; "
          f"log: {superlink.log_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
