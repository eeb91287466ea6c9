"""The in-process federated loop: many rounds of M clients, one process, no Flower.

Each round runs the SAME client step and server functions as the Flower app
(:mod:`dpsign_fl.flower.client` and :mod:`dpsign_fl.flower.strategy`):

- ``"dp-signsgd"`` (ours): :func:`dpsign_fl.training.client_release` with sigma
  from :func:`dpsign_fl.privacy.calibrate_noise_multiplier` for the TOTAL
  (epsilon, delta) over ``num_rounds`` releases, :func:`dpsign_fl.packing.pack_signs`,
  :func:`dpsign_fl.vote.majority_vote`, :class:`dpsign_fl.server_update.VoteUpdater`.
- ``"jin-dp-sign"``: the same release with Jin et al.'s per-step sigma for
  per-step (epsilon, delta) (:func:`dpsign_fl.privacy.jin_noise_multiplier`;
  :func:`dpsign_fl.compressors.jin_dp_sign` is this release on given
  per-example gradients). Not private over training: the reported epsilon is the
  composed one.
- ``"jin-rectified"``: per-step (epsilon / T, delta / T) (basic composition).
- ``"signsgd"`` (Bernstein et al. 2019): sign of each client's Poisson-sampled
  minibatch mean gradient, majority vote; not private.
- ``"sto-sign"`` (Jin et al. 2020): :func:`dpsign_fl.compressors.sto_sign` of
  the minibatch mean gradient with bound b = its largest entry; not private.
- ``"sgd"``: average of the clients' minibatch mean gradients, real-valued
  step; not private.

Privacy: every private client keeps a :class:`dpsign_fl.privacy.PrivacyLedger`
of the releases it actually made, and the reported epsilon is the largest
client's ledger epsilon at the run's delta, never the target copied.

Randomness: client m in round t draws from
``client_generator(seed, partition_id=m, server_round=t)``, as the Flower
client does, so a run is reproducible for a fixed seed.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from .. import training
from ..attacks import BYZANTINE_ATTACKS, byzantine_signs, is_byzantine
from ..compressors import sign as sign_of, sto_sign
from ..data import load_dataset, partition_indices
from ..gradient_noise import GRADIENT_NOISES, add_gradient_noise
from ..mechanism import CLIPPING_MODES, per_sample_gradients, poisson_sample
from ..models import build_model, default_model
from ..packing import pack_signs
from ..privacy import PrivacyLedger, calibrate_noise_multiplier, jin_noise_multiplier
from ..server_update import LR_SCHEDULES, VoteUpdater, learning_rate_at
from ..vote import majority_vote

METHODS = ("dp-signsgd", "signsgd", "sgd", "jin-dp-sign", "jin-rectified", "sto-sign")
PRIVATE_METHODS = ("dp-signsgd", "jin-dp-sign", "jin-rectified")
DEFAULT_EVALUATIONS = 20
"""Evaluations of the test set per run when ``eval_every = 0``."""


@dataclass(frozen=True)
class RunSettings:
    """One run of the federated loop. Names follow STYLE.md (paper symbols spelled out).

    ``target_delta=None`` means delta = 1 / n^1.1 with n the LARGEST client's
    dataset size (the smallest of the clients' deltas, so every client meets its
    own 1 / n_m^1.1). ``learning_rate=None`` means 1 / sqrt(d T) (the source
    paper's choice; d = number of parameters, T = ``num_rounds``).
    ``tail_average`` > 0 also reports the accuracy of the mean of the weights
    over that final fraction of rounds (post-processing, free of privacy cost).
    ``max_examples`` > 0 keeps only the first that many training examples (quick runs).
    ``noise_multiplier=None`` calibrates sigma (``dp-signsgd``); a number fixes
    sigma for ``dp-signsgd`` instead (sweeps over sigma, fast tests): the
    reported epsilon is still the ledger's, whatever the target says.
    """

    method: str = "dp-signsgd"
    dataset: str = "digits"
    model: str = ""
    num_clients: int = 10
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    target_epsilon: float = 8.0
    target_delta: float | None = 1e-5
    sample_rate: float = 0.1
    noise_multiplier: float | None = None
    num_rounds: int = 100
    clip_norm: float = 1.0
    clipping: str = "flat"
    learning_rate: float | None = 0.01
    lr_schedule: str = "constant"
    server_momentum: float = 0.0
    gradient_noise: str = "none"
    byzantine_fraction: float = 0.0
    byzantine_attack: str = "sign-flip"
    accountant: str = "pld"
    seed: int = 0
    eval_every: int = 0
    tail_average: float = 0.0
    max_examples: int = 0
    label: str = ""

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("clipping", self.clipping, CLIPPING_MODES)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("gradient_noise", self.gradient_noise, GRADIENT_NOISES)
        _check_choice("byzantine_attack", self.byzantine_attack, BYZANTINE_ATTACKS)
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0 or None (calibrate), got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not 0 <= self.byzantine_fraction < 1:
            raise ValueError(f"byzantine_fraction must be in [0, 1), got {self.byzantine_fraction}")
        if self.method == "sgd" and self.byzantine_fraction > 0:
            raise ValueError("byzantine_fraction > 0 needs a sign method (the attacks replace signs), got method 'sgd'")
        if not 0 <= self.tail_average < 1:
            raise ValueError(f"tail_average must be in [0, 1), got {self.tail_average}")
        if self.method in PRIVATE_METHODS and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0 for method {self.method!r}, got {self.target_epsilon}")

    @property
    def private(self) -> bool:
        """True for the methods that release DP-SIGN bits with Gaussian noise."""
        return self.method in PRIVATE_METHODS

    def name(self) -> str:
        """A short label for tables and plots."""
        if self.label:
            return self.label
        parts = [self.method, self.dataset, self.partitioner]
        if self.private:
            parts.append(f"eps{self.target_epsilon:g}")
        if self.gradient_noise != "none":
            parts.append(self.gradient_noise)
        return "-".join(parts)


@dataclass
class ClientData:
    """One client's training partition, loaded once for the whole run."""

    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def size(self) -> int:
        """n_m, the number of training examples."""
        return int(self.targets.shape[0])


def load_run_data(settings: RunSettings, *, data_dir: str | None = None, dataset=None):
    """Return (dataset, [ClientData per client]) for a run; partitions are made once."""
    if dataset is None:
        dataset = load_dataset(settings.dataset, data_dir=data_dir, seed=settings.seed)
    if settings.max_examples > 0:
        dataset = _truncated(dataset, settings.max_examples)
    # One partitioning for all clients (dpsign_fl.data.partition would redo it per client).
    shares = partition_indices(
        dataset.train_targets,
        num_partitions=settings.num_clients,
        partitioner=settings.partitioner,
        alpha=settings.dirichlet_alpha,
        seed=settings.seed,
    )
    clients = []
    for indices in shares:
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        clients.append(ClientData(dataset.train_inputs[index], dataset.train_targets[index]))
    return dataset, clients


def noise_multiplier_for(settings: RunSettings, target_delta: float) -> float:
    """Return sigma of each release for the run's method (0 for non-private methods).

    - ``dp-signsgd``: smallest sigma with composed epsilon <= target over T releases.
    - ``jin-dp-sign``: Jin et al.'s sigma for per-step (epsilon, delta).
    - ``jin-rectified``: Jin et al.'s sigma for per-step (epsilon / T, delta / T).
    """
    if settings.method == "dp-signsgd":
        if settings.noise_multiplier is not None:
            return settings.noise_multiplier
        return _calibrated(settings.target_epsilon, target_delta, settings.sample_rate, settings.num_rounds, settings.accountant)
    if settings.method == "jin-dp-sign":
        return jin_noise_multiplier(epsilon_per_step=settings.target_epsilon, delta_per_step=target_delta)
    if settings.method == "jin-rectified":
        steps = settings.num_rounds
        return jin_noise_multiplier(
            epsilon_per_step=settings.target_epsilon / steps, delta_per_step=target_delta / steps
        )
    return 0.0


@functools.lru_cache(maxsize=64)
def _calibrated(target_epsilon: float, target_delta: float, sample_rate: float, num_steps: int, accountant: str) -> float:
    # Pure function of its arguments; a sweep repeats the same calibration
    # (e.g. three gradient-noise settings) and each one costs seconds.
    return calibrate_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        sample_rate=sample_rate,
        num_steps=num_steps,
        accountant=accountant,
    )


def run_experiment(
    settings: RunSettings,
    *,
    data_dir: str | None = None,
    dataset=None,
    progress: bool = True,
    on_round: Callable[[int, np.ndarray], None] | None = None,
) -> dict:
    """Run one federated training in this process and return its result record.

    Args:
        settings: the run.
        data_dir: where :func:`dpsign_fl.data.load_dataset` reads the data.
        dataset: an already loaded dataset (skips loading; for sweeps and tests).
        progress: show a tqdm bar on stderr.
        on_round: called as ``on_round(round, weights)`` after each update (tests).

    Returns:
        A JSON-safe dict: the settings, ``epsilon`` (largest client's ledger
        epsilon; ``inf`` for non-private methods), ``noise_multiplier``,
        ``target_delta`` (the delta used), ``test_accuracy``, ``test_loss``,
        ``rounds``, ``wall_seconds``, ``history`` (one entry per evaluation).
    """
    started = time.monotonic()
    dataset, clients = load_run_data(settings, data_dir=data_dir, dataset=dataset)
    model = build_model(
        settings.model or default_model(settings.dataset),
        input_shape=tuple(dataset.input_shape),
        num_classes=dataset.num_classes,
        seed=settings.seed,
    )
    weights = training.flat_parameters(model)
    num_coordinates = weights.shape[0]
    target_delta = settings.target_delta or 1.0 / max(c.size for c in clients) ** 1.1
    learning_rate = settings.learning_rate or 1.0 / math.sqrt(num_coordinates * settings.num_rounds)
    noise_multiplier = noise_multiplier_for(settings, target_delta)
    ledgers = [PrivacyLedger(accountant=settings.accountant) for _ in clients] if settings.private else []
    updater = VoteUpdater(
        learning_rate=learning_rate,
        num_rounds=settings.num_rounds,
        schedule=settings.lr_schedule,
        momentum=settings.server_momentum,
    )
    release = training.ReleaseSettings(
        sample_rate=settings.sample_rate,
        clip_norm=settings.clip_norm,
        noise_multiplier=noise_multiplier,
        clipping=settings.clipping,
    )
    test_inputs, test_targets = torch.as_tensor(dataset.test_inputs), torch.as_tensor(dataset.test_targets)
    eval_every = settings.eval_every or max(settings.num_rounds // DEFAULT_EVALUATIONS, 1)
    tail_start = settings.num_rounds - int(settings.tail_average * settings.num_rounds) + 1
    tail_sum, tail_count = np.zeros_like(weights, dtype=np.float64), 0
    setup_seconds = time.monotonic() - started

    def evaluate_at(server_round: int) -> dict:
        training.load_flat_parameters(model, weights)
        loss, accuracy = training.evaluate(model, test_inputs, test_targets)
        return {
            "round": server_round,
            "accuracy": accuracy,
            "loss": loss,
            "epsilon": _largest_epsilon(ledgers, target_delta) if settings.private else math.inf,
            "wall_seconds": round(time.monotonic() - started, 3),
        }

    history = [evaluate_at(0)]
    bar = tqdm(
        range(1, settings.num_rounds + 1),
        desc=settings.name(),
        file=sys.stderr,
        disable=not progress,
        leave=False,
        mininterval=1.0,
    )
    for server_round in bar:
        training.load_flat_parameters(model, weights)
        if settings.method == "sgd":
            gradients = [
                _client_mean_gradient(model, client, settings, _generator(settings, m, server_round))
                for m, client in enumerate(clients)
            ]
            eta = learning_rate_at(
                server_round, learning_rate=learning_rate, num_rounds=settings.num_rounds, schedule=settings.lr_schedule
            )
            weights = weights - eta * np.mean(gradients, axis=0).astype(weights.dtype)
        else:
            payloads = []
            for m, client in enumerate(clients):
                generator = _generator(settings, m, server_round)
                signs = _client_signs(model, client, settings, release, generator)
                if settings.private:
                    ledgers[m].record(sample_rate=settings.sample_rate, noise_multiplier=noise_multiplier)
                if is_byzantine(m, settings.num_clients, settings.byzantine_fraction):
                    signs = byzantine_signs(signs, attack=settings.byzantine_attack, generator=generator)
                payloads.append(pack_signs(signs))
            vote = majority_vote(np.stack(payloads), num_coordinates)
            weights = updater.step(weights, vote, server_round)
        if server_round >= tail_start:
            tail_sum += weights
            tail_count += 1
        if on_round is not None:
            on_round(server_round, weights)
        if server_round % eval_every == 0 or server_round == settings.num_rounds:
            history.append(evaluate_at(server_round))
            bar.set_postfix(accuracy=f"{history[-1]['accuracy']:.4f}", refresh=False)
    bar.close()

    final = history[-1]
    record = {
        **asdict(settings),
        "label": settings.name(),
        "noise": settings.gradient_noise,
        "target_epsilon": settings.target_epsilon if settings.private else None,
        "target_delta": target_delta if settings.private else None,
        "learning_rate": learning_rate,
        "noise_multiplier": noise_multiplier,
        "epsilon": final["epsilon"],
        "test_accuracy": final["accuracy"],
        "test_loss": final["loss"],
        "rounds": settings.num_rounds,
        "num_parameters": int(num_coordinates),
        "client_sizes": [c.size for c in clients],
        "wall_seconds": round(time.monotonic() - started, 3),
        "setup_seconds": round(setup_seconds, 3),
        "history": history,
    }
    if settings.method in ("jin-dp-sign", "jin-rectified"):
        steps = settings.num_rounds if settings.method == "jin-rectified" else 1
        record["epsilon_per_step"] = settings.target_epsilon / steps
        record["delta_per_step"] = target_delta / steps
    if tail_count:
        averaged = (tail_sum / tail_count).astype(weights.dtype)
        training.load_flat_parameters(model, averaged)
        loss, accuracy = training.evaluate(model, test_inputs, test_targets)
        record["test_accuracy_tail_average"] = accuracy
    return record


def _client_signs(model, client: ClientData, settings: RunSettings, release, generator) -> torch.Tensor:
    """One client's int8 +-1 update for the sign methods."""
    if settings.private:
        # The Flower client's own step (dpsign_fl.flower.client.handle_train).
        return training.client_release(
            model,
            client.inputs,
            client.targets,
            release,
            generator=generator,
            gradient_noise=settings.gradient_noise,
        )
    gradient = torch.from_numpy(_client_mean_gradient(model, client, settings, generator))
    if settings.method == "sto-sign":
        bound = float(gradient.abs().max())
        return sto_sign(gradient, bound=bound if bound > 0 else 1.0, generator=generator)
    return sign_of(gradient)


def _client_mean_gradient(model, client: ClientData, settings: RunSettings, generator) -> np.ndarray:
    """Mean gradient of a Poisson-sampled minibatch (rate ``sample_rate``); zeros if empty.

    Gradient noise, when asked for, is added to each example's gradient, as
    :func:`dpsign_fl.training.client_release` does, so that all methods see the
    same noisy gradients.
    """
    indices = poisson_sample(client.size, settings.sample_rate, generator=generator)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if indices.numel() == 0:
        return np.zeros(sum(p.numel() for p in parameters), dtype=np.float32)
    inputs, targets = client.inputs[indices], client.targets[indices]
    if settings.gradient_noise == "none":
        loss = F.cross_entropy(model(inputs), targets)
        grads = torch.autograd.grad(loss, parameters)
        return torch.cat([g.reshape(-1) for g in grads]).detach().numpy()
    per_example = per_sample_gradients(model, F.cross_entropy, inputs, targets, chunk_size=training.DEFAULT_CHUNK_SIZE)
    per_example = add_gradient_noise(per_example, kind=settings.gradient_noise, generator=generator)
    return per_example.mean(dim=0).detach().numpy()


def _generator(settings: RunSettings, partition_id: int, server_round: int) -> torch.Generator:
    return training.client_generator(settings.seed, partition_id=partition_id, server_round=server_round)


def _largest_epsilon(ledgers: list[PrivacyLedger], target_delta: float) -> float:
    """Largest epsilon among the clients; identical histories are accounted once."""
    distinct = {ledger.releases: ledger for ledger in ledgers}
    return max((ledger.epsilon(target_delta) for ledger in distinct.values()), default=0.0)


def _truncated(dataset, max_examples: int):
    inputs, targets = dataset.train_inputs[:max_examples], dataset.train_targets[:max_examples]
    return replace(dataset, train_inputs=inputs, train_targets=targets)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
