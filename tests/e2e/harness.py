"""Run the real `flwr` CLI in a subprocess, offline, on a private home and ports.

Simulation: `flwr run .` starts a detached local SuperLink that outlives the run
and is reused by any later run on the same port, whatever its FLWR_HOME: each
test gets its own FLWR_HOME and free ports, and stops the SuperLink it started,
by PID.

Deployment (:class:`Deployment`): a `flower-superlink` and `flower-supernode`
processes on 127.0.0.1, each with its own FLWR_HOME and port, optionally with
TLS (:func:`make_tls_files`), SuperNode authentication
(:func:`make_supernode_key`) and a SuperNode's trusted app signers
(:func:`make_trusted_entities`); every process is stopped by PID on exit.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dpsign_fl.flower.local_superlink import LocalSuperLink, descendant_pids, is_alive  # noqa: F401 (re-exported to the tests)

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


SUPERLINK_START_SECONDS = 240.0
"""How long a SuperLink may take to answer /health (flwr run itself waits 15 s)."""

RAY_STARTUP_RACE = "timed out during startup"
"""Ray's message when its raylet does not register within its fixed 30 s: a start-up race
on a loaded machine, the one failure a simulation run is retried for."""


class LocalSimulation:
    """A simulation-mode SuperLink started by the test, reused by `flwr run .`, stopped by PID.

    `flwr run .` starts the same SuperLink itself when none answers on its port,
    but gives it only 15 s; :class:`dpsign_fl.flower.local_superlink.LocalSuperLink`
    lets a loaded machine take up to :data:`SUPERLINK_START_SECONDS`. Use as a
    context manager. ``extra_env`` goes into the environment of the SuperLink
    (and so of the simulation process that initialises Ray, e.g. ``RAY_ADDRESS``).
    """

    def __init__(
        self, flwr_home: Path, *, start_timeout: float = SUPERLINK_START_SECONDS, extra_env: dict[str, str] | None = None
    ):
        self.home = flwr_home
        self.env = offline_env(flwr_home, **(extra_env or {}))
        self.superlink = LocalSuperLink(self.env, timeout=start_timeout)
        self.process = self.superlink.process
        self.start_seconds = self.superlink.start_seconds
        self.log_tail = self.superlink.log_tail

    def run(
        self, run_config: str, *, num_supernodes: int, timeout: float = 900.0, done=None, app: Path | str = "."
    ) -> subprocess.CompletedProcess:
        """`flwr run . --stream` on this SuperLink; retried once if Ray lost its start-up race.

        ``flwr run --stream`` exits 0 even when the ServerApp fails, so callers
        assert on the files the run wrote. ``done()`` (optional) tells whether
        the run wrote its results; without them and with Ray's start-up timeout
        in the output, the run is started again, once.

        Raises:
            TimeoutError: naming the phase that was slow.
        """
        command = [
            str(BIN / "flwr"), "run", str(app), "--stream", "--federation-config",
            f"num-supernodes={num_supernodes} client-resources-num-cpus=1", "--run-config", run_config,
        ]  # fmt: skip
        for attempt in (1, 2):
            started = time.monotonic()
            try:
                completed = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired as expired:
                raise TimeoutError(
                    f"`flwr run` did not finish within {timeout:g} s (attempt {attempt}; the SuperLink answered after "
                    f"{self.start_seconds:.0f} s). Output so far:\n{_text(expired.stdout)[-3000:]}\n"
                    f"SuperLink log:\n{self.log_tail()}"
                ) from None
            completed.wall_seconds = time.monotonic() - started
            output = completed.stdout + completed.stderr + self.log_tail(20000)
            if attempt == 1 and RAY_STARTUP_RACE in output and not (done and done()):
                continue
            return completed
        return completed

    def stop(self) -> None:
        """Stop the SuperLink and everything it started, by PID."""
        self.superlink.stop()

    def __enter__(self) -> "LocalSimulation":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def flwr_run_simulation(
    flwr_home: Path, *, num_supernodes: int, run_config: str, timeout: float = 900.0, done=None, app: Path | str = "."
) -> subprocess.CompletedProcess:
    """One `flwr run <app> --stream` on a fresh :class:`LocalSimulation`, stopped afterwards."""
    with LocalSimulation(flwr_home) as simulation:
        return simulation.run(run_config, num_supernodes=num_supernodes, timeout=timeout, done=done, app=app)


def simulation_with_results(tmp_path_factory, *, num_supernodes: int, run_config: str):
    """:func:`flwr_run_simulation` in a fresh FLWR_HOME, writing into a fresh ``results-dir``,
    done once the model is saved; returns ``(completed, results folder, FLWR_HOME)``."""
    home = tmp_path_factory.mktemp("flwr-home")
    results = tmp_path_factory.mktemp("results")
    completed = flwr_run_simulation(
        home, num_supernodes=num_supernodes, done=lambda: (results / "model.pt").exists(),
        run_config=f"{run_config} results-dir='{results}'",
    )
    return completed, results, home


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# --------------------------------------------------------------------------
# Deployment: one flower-superlink and flower-supernode processes on loopback.
# --------------------------------------------------------------------------


CONNECTION = "e2e-deployment"
"""Name of the SuperLink connection written into the CLI's config.toml."""


def wait_until(condition, *, timeout: float, what: str, interval: float = 0.5, log=None):
    """Poll ``condition()`` until it returns a truthy value; return it.

    Raises:
        TimeoutError: naming ``what`` (and showing ``log()``, if given) when
            ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{log()}" if log is not None else ""
            raise TimeoutError(f"waited {timeout:g} s for {what}{detail}")
        time.sleep(interval)


def stop_process_tree(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM ``process``, wait for it and for the descendants it had, SIGKILL leftovers.

    Flower's SuperLink and SuperNode start a ``flower-superexec`` (and per message
    ``flwr-clientapp``/``flwr-serverapp``) that exit by themselves once their parent
    is gone; the ones still alive after ``timeout`` are killed, by PID.
    """
    family = [process.pid] + descendant_pids(process.pid)
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    deadline = time.monotonic() + timeout
    for pid in family[1:]:
        while is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if is_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and the SuperLink's certificate for 127.0.0.1 / localhost."""

    ca_certificate: Path
    server_certificate: Path
    server_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """Write a self-signed CA and a server certificate it signed (SAN: localhost, 127.0.0.1, ::1)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dpsign-fl test CA")])
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    files.ca_certificate.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    files.server_certificate.write_bytes(server_certificate.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.server_key.chmod(0o600)
    return files


def make_supernode_key(folder: Path, name: str) -> tuple[Path, Path]:
    """Write an EC P-384 key pair in OpenSSH format (as `ssh-keygen -t ecdsa -b 384`).

    Returns:
        (private key file, public key file ``<name>.pub``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" {name}\n".encode()
    )
    return private, public


def make_trusted_entities(folder: Path, key_id: str) -> Path:
    """Write a ``--trusted-entities`` YAML file naming one fresh Ed25519 public key.

    The file maps a public key ID to an OpenSSH public key, as
    ``flower-supernode --help`` describes (``{fpk_UUID1: 'ssh-ed25519 <key>'}``).
    The private key is thrown away: nothing the test runs is signed with it.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    folder.mkdir(parents=True, exist_ok=True)
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    path = folder / "trusted-entities.yaml"
    path.write_text(f"{key_id}: '{line} dpsign-fl-test'\n")
    return path


def node_config_argument(node_config: dict) -> str:
    """Render ``{"partition-id": 0, "data-dir": "/d"}`` as ``partition-id=0 data-dir="/d"``."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in node_config.items())


@dataclass
class RunOutcome:
    """What one `flwr run` on the deployment produced."""

    run_id: int
    status: str
    log: str
    wall_seconds: float


@dataclass
class Deployment:
    """A SuperLink and SuperNodes on loopback, each with its own FLWR_HOME and port.

    Use as a context manager: leaving the block stops every process it started
    (SuperNodes first, then the SuperLink), by PID, including on failure.

    Args:
        root: a fresh folder for homes and logs.
        tls: certificates; None = ``--insecure``.
        supernode_auth: start the SuperLink with ``--enable-supernode-auth`` (needs ``tls``).
    """

    root: Path
    tls: TlsFiles | None = None
    supernode_auth: bool = False
    port: int = field(default_factory=free_port)
    superlink: subprocess.Popen | None = None
    supernodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    exited: dict[str, subprocess.Popen] = field(default_factory=dict)
    homes: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.supernode_auth and self.tls is None:
            raise ValueError("supernode_auth needs tls")
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cli_home = self.root / "cli-home"
        self.cli_home.mkdir(exist_ok=True)
        write_connection(self.cli_home, CONNECTION, f"127.0.0.1:{self.port}", self.tls)

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def home(self, name: str) -> Path:
        """The FLWR_HOME of process ``name``: its own ``<name>-home``, unless it was started with another."""
        return self.homes.get(name, self.root / f"{name}-home")

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        home = self.home(name)
        home.mkdir(exist_ok=True)
        log_file = open(self.logs / f"{name}.log", "ab")
        try:
            return subprocess.Popen(
                command, cwd=self.root, env=offline_env(home, **(env or {})), stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log_file.close()

    def log_text(self, name: str) -> str:
        """The stdout and stderr of process ``name`` (``superlink`` or a SuperNode's name)."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self, timeout: float = 60.0) -> None:
        """Start flower-superlink and wait until its /health answers."""
        command = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                   "--disable-runtime-dependency-installation"]
        if self.tls is None:
            command.append("--insecure")
        else:
            command += ["--ssl-ca-certfile", str(self.tls.ca_certificate),
                        "--ssl-certfile", str(self.tls.server_certificate),
                        "--ssl-keyfile", str(self.tls.server_key)]
        if self.supernode_auth:
            command.append("--enable-supernode-auth")
        self.superlink = self._spawn("superlink", command)
        wait_until(self._healthy, timeout=timeout, what=f"SuperLink health on {self.address}\n" + self.log_text("superlink"))

    def _healthy(self) -> bool:
        if self.superlink is not None and self.superlink.poll() is not None:
            raise RuntimeError(f"SuperLink exited with {self.superlink.returncode}:\n{self.log_text('superlink')}")
        scheme = "http" if self.tls is None else "https"
        handlers: list = [urllib.request.ProxyHandler({})]  # loopback only, whatever *_proxy says
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca_certificate))
            handlers.append(urllib.request.HTTPSHandler(context=context))
        try:
            with urllib.request.build_opener(*handlers).open(f"{scheme}://{self.address}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def start_supernode(
        self, name: str, node_config: dict, *, auth_key: Path | None = None, home: Path | None = None,
        trusted_entities: Path | None = None, env: dict[str, str] | None = None,
    ) -> subprocess.Popen:
        """Start flower-supernode ``name`` with ``--node-config`` and its own Runtime API port.

        Args:
            name: the SuperNode's name in this deployment (its log: ``logs/<name>.log``).
            node_config: its ``--node-config``.
            auth_key: ``--auth-supernode-private-key``.
            home: its FLWR_HOME; None = its own ``<name>-home`` (SuperNodes may share one).
            trusted_entities: ``--trusted-entities`` (:func:`make_trusted_entities`).
            env: further environment variables (e.g. ``FLWR_LOG_LEVEL``).
        """
        command = [str(BIN / "flower-supernode"), "--superlink", self.address, "--port", str(free_port()),
                   "--node-config", node_config_argument(node_config)]
        if self.tls is None:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(self.tls.ca_certificate)]
        if auth_key is not None:
            command += ["--auth-supernode-private-key", str(auth_key)]
        if trusted_entities is not None:
            command += ["--trusted-entities", str(trusted_entities)]
        if name in self.supernodes:
            raise ValueError(f"SuperNode {name!r} is already running")
        if home is not None:
            self.homes[name] = home
        with open(self.logs / f"{name}.log", "ab") as log_file:  # mark restarts in the log
            log_file.write(f"---- start {name}: {' '.join(command)}\n".encode())
        process = self._spawn(name, command, env)
        self.supernodes[name] = process
        return process

    def stop_supernode(self, name: str) -> int:
        """Stop SuperNode ``name`` (and its children); return the PID it had."""
        process = self.supernodes.pop(name)
        stop_process_tree(process)
        self.exited[name] = process
        return process.pid

    def wait_for_exit(self, name: str, timeout: float) -> int:
        """Wait until SuperNode ``name`` exits by itself; return its exit code."""
        process = self.supernodes[name]
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"SuperNode {name!r} still running after {timeout:g} s:\n{self.log_text(name)}") from None
        self.exited[name] = self.supernodes.pop(name)
        return code

    def flwr(self, *arguments: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI from the repository with this deployment's CLI home."""
        return subprocess.run([str(BIN / "flwr"), *arguments], cwd=REPO, env=offline_env(self.cli_home),
                              capture_output=True, text=True, timeout=timeout)

    def flwr_json(self, *arguments: str, timeout: float = 120.0) -> dict:
        """Run `flwr ... --format json` and return the parsed reply (raising on failure)."""
        done = self.flwr(*arguments, "--format", "json", timeout=timeout)
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"flwr {' '.join(arguments)} gave rc {done.returncode}:\n{done.stdout}\n{done.stderr}") from None

    def online_node_ids(self) -> list[int]:
        """IDs of the SuperNodes the SuperLink lists as online."""
        reply = self.flwr_json("supernode", "ls", CONNECTION)
        return sorted(int(node["node-id"]) for node in reply.get("nodes", []) if node.get("status") == "online")

    def wait_for_online_nodes(self, count: int, timeout: float = 90.0) -> list[int]:
        """Wait until exactly ``count`` SuperNodes are online; return their IDs."""
        def ready():
            for name, process in self.supernodes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"SuperNode {name!r} exited with {process.returncode}:\n{self.log_text(name)}")
            ids = self.online_node_ids()
            return ids if len(ids) == count else None

        return wait_until(ready, timeout=timeout, what=f"{count} online SuperNodes", interval=1.0)

    def register(self, public_key: Path) -> int:
        """`flwr supernode register`: allow the SuperNode holding this key; return its node ID."""
        reply = self.flwr_json("supernode", "register", str(public_key), CONNECTION)
        if not reply.get("success", True) or "node-id" not in reply:
            raise RuntimeError(f"registering {public_key} failed: {reply}")
        return int(reply["node-id"])

    def run(self, run_config: str, timeout: float = 300.0) -> RunOutcome:
        """Submit `flwr run . <connection>`, stream its log to the end, return its final status.

        `flwr run --stream` exits 0 even when the ServerApp fails, so the status
        comes from `flwr ls --run-id`.
        """
        started = time.monotonic()
        submitted = self.flwr_json("run", ".", CONNECTION, "--run-config", run_config)
        if "run-id" not in submitted:
            raise RuntimeError(f"flwr run was rejected: {submitted}")
        run_id = int(submitted["run-id"])
        remaining = max(1.0, timeout - (time.monotonic() - started))
        try:
            streamed = self.flwr("log", str(run_id), CONNECTION, "--stream", timeout=remaining).stdout
        except subprocess.TimeoutExpired as expired:
            self.flwr("stop", str(run_id), CONNECTION)
            raise TimeoutError(f"run {run_id} did not finish in {timeout:g} s:\n{expired.stdout}") from None
        status = wait_until(lambda: self._finished_status(run_id), timeout=60, what=f"run {run_id} to finish")
        return RunOutcome(run_id, status, streamed, time.monotonic() - started)

    def _finished_status(self, run_id: int) -> str | None:
        runs = self.flwr_json("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        status = runs[0]["status"] if runs else ""
        return status if status.startswith("finished") else None

    def stop(self) -> None:
        """Stop every SuperNode, then the SuperLink (each with its children)."""
        for name in list(self.supernodes):
            self.stop_supernode(name)
        if self.superlink is not None:
            stop_process_tree(self.superlink)

    def started_pids_alive(self) -> list[int]:
        """PIDs of the processes this deployment started that are still alive."""
        processes = [self.superlink, *self.supernodes.values(), *self.exited.values()]
        return [p.pid for p in processes if p is not None and is_alive(p.pid)]


def write_connection(cli_home: Path, name: str, address: str, tls: TlsFiles | None) -> None:
    """Write the CLI's ``config.toml`` with one SuperLink connection, the default."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if tls is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{tls.ca_certificate}"')
    (cli_home / "config.toml").write_text("\n".join(lines) + "\n")


def write_idx_folder(folder: Path, train_images, train_labels, test_images, test_labels) -> Path:
    """Write uint8 images ``[N, H, W]`` and labels as the four MNIST IDX files (uncompressed)."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        "train-images-idx3-ubyte": (train_images, 0x00000803),
        "train-labels-idx1-ubyte": (train_labels, 0x00000801),
        "t10k-images-idx3-ubyte": (test_images, 0x00000803),
        "t10k-labels-idx1-ubyte": (test_labels, 0x00000801),
    }
    for stem, (values, magic) in parts.items():
        values = np.ascontiguousarray(values, dtype=np.uint8)
        header = np.array([magic, *values.shape], dtype=">u4").tobytes()
        (folder / stem).write_bytes(header + values.tobytes())
    return folder


def digits_as_mnist(indices) -> tuple:
    """scikit-learn's 8x8 digits at ``indices`` as 28x28 uint8 MNIST-like images, and labels.

    A small, offline stand-in for an MNIST folder on a device: each pixel is
    scaled from [0, 16] to [0, 255], repeated 3x3 and padded by 2.
    """
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images[indices] * (255 / 16)).astype(np.uint8)
    images = np.kron(images, np.ones((1, 3, 3), dtype=np.uint8))
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return images, digits.target[indices].astype(np.uint8)
