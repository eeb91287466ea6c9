"""The in-process federated loop: many rounds of M clients, one process, no Flower.

A run is an :class:`Experiment`: the shared :class:`dpsign_fl.settings.RunSettings`
(the same description the Flower app reads from its run config) plus the
loop's own knobs (method, number of clients, tail averaging). Each private
round runs the SAME client and server rounds as the Flower app
(:func:`dpsign_fl.rounds.client_round`, :func:`dpsign_fl.rounds.server_round`):

- ``"dp-signsgd"`` (ours): sigma from :func:`dpsign_fl.rounds.plan_release`
  for the TOTAL (epsilon, delta) over the releases a client plans for: ``num_rounds``
  when every client takes part in every round, about ``num_rounds * participation``
  when each round samples ``clients_per_round`` of the ``num_clients``.
- ``"jin-dp-sign"``: the same release with Jin et al.'s per-step sigma for
  per-step (epsilon, delta) (:func:`dpsign_fl.experiments.jin.jin_noise_multiplier`).
  Not private over training: the reported epsilon is the composed one.
- ``"jin-rectified"``: per-step (epsilon / T, delta / T) (basic composition).
- ``"signsgd"`` (Bernstein et al. 2019): sign of each client's Poisson-sampled
  minibatch mean gradient, majority vote; not private.
- ``"sto-sign"`` (Jin et al. 2020): :func:`dpsign_fl.experiments.compressors.sto_sign` of
  the minibatch mean gradient with bound b = its largest entry; not private.
- ``"sgd"``: average of the clients' minibatch mean gradients, real-valued
  step; not private.
- ``"fedavg"`` (McMahan et al. 2017): each client takes ``local_steps`` SGD steps
  (learning rate ``learning_rate``, Poisson-sampled minibatches) from the global
  weights; the new weights are the clients' weights averaged by their numbers
  of training examples; not private.

Clients per round: all ``num_clients``, or ``clients_per_round`` of them drawn
without replacement in each round from ``noise_seed`` and the round (the same
draw for every method, so that runs compare on the same clients). With
run-config ``client-schedule`` ``balanced`` each round takes the clients drawn least often
so far (ties broken at random from ``noise_seed``), so every client takes part
in floor or ceil of ``num_rounds * clients_per_round / num_clients`` rounds and
can plan for exactly that many releases (``participation_margin`` 0).

Privacy: every private client keeps a :class:`dpsign_fl.privacy.PrivacyLedger`
of the releases it actually made, and the reported epsilon is the largest
client's ledger epsilon at the run's delta, never the target copied.

Randomness: with ``reproducible_noise`` (the recipes' default) client m in
round t draws from ``seeded_generator(noise_seed, client=m, stream=t)``,
so a run is reproducible; otherwise from the OS's secure source.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from ..data import partition_dataset
from ..data.features import load_run_dataset
from ..evaluation import class_accuracies, evaluate, robust_accuracy
from ..release.mechanism import per_sample_gradients, poisson_sample, secure_generator
from ..initial_model import initial_model
from ..vote import VoteMemory
from ..vote.packing import pack_signs
from ..parameters import load_model_vector, model_vector
from ..privacy import PrivacyLedger
from ..release import DEFAULT_CHUNK_SIZE, ClientMomentum, ReleaseSettings, adversarial_examples, seeded_generator
from ..rounds import Budget, Refusal, ReleasePlan, SignedUpdate, client_round, least_drawn, plan_for_round, plan_release, planned_releases, server_round
from ..vote.server_update import AUTOMATIC, VoteUpdater, learning_rate_at
from ..settings import ConfigError, RunSettings, check_fields, setting, specs, to_mapping
from .attacks import TARGETED_ATTACKS, attack_round, is_byzantine, targeted_push
from .compressors import sign as sign_of, sto_sign
from .hooks import ExperimentOptions, gradient_noise_transform
from .jin import jin_noise_multiplier

METHODS = ("dp-signsgd", "signsgd", "sgd", "fedavg", "jin-dp-sign", "jin-rectified", "sto-sign")
REAL_VALUED_METHODS = ("sgd", "fedavg")
PRIVATE_METHODS = ("dp-signsgd", "jin-dp-sign", "jin-rectified")


@dataclass(frozen=True)
class Experiment:
    """One run of the in-process loop: the shared run description and the loop's own knobs.

    Build one with :meth:`create` (keyword arguments of any part) or
    directly with ``Experiment(run=RunSettings(...), method=...)``. The
    experiment-only settings (gradient noise, Byzantine clients) are the group
    ``hooks`` (:class:`dpsign_fl.experiments.hooks.ExperimentOptions`).
    """

    run: RunSettings = dataclasses.field(default_factory=RunSettings, metadata={"spec": None})
    hooks: ExperimentOptions = dataclasses.field(default_factory=ExperimentOptions, metadata={"spec": None})
    method: str = setting("dp-signsgd", choices=METHODS, help="training method")
    num_clients: int = setting(10, low=1, high=100_000, help="number of simulated clients")
    clients_per_round: int = setting(
        0, low=0, high=100_000, help="K, the clients drawn (without replacement) for each round; 0 = all num_clients"
    )
    local_steps: int = setting(1, low=1, high=10_000, help="fedavg: SGD steps each client takes per round")
    noise_multiplier: float | None = setting(
        None, kind=float, low=0, high=1e6, low_open=True,
        help="fix sigma instead of calibrating it (dp-signsgd; sweeps); epsilon is still the ledgers'",
    )
    delta_from_data: bool = setting(False, help="target delta = 1 / n^1.1 of the largest client (the source paper)")
    tail_average: float = setting(0.0, low=0, high=1, high_open=True, help="also report the mean of the weights over this final fraction of rounds")
    max_examples: int = setting(0, low=0, high=10**9, help="keep only the first N training examples (0 = all)")
    attack_target_class: int = setting(0, low=0, high=100_000, help="targeted-push attacks: the class whose row is pushed")
    attack_pushed_class: int = setting(1, low=0, high=100_000, help="targeted-push attacks: the class whose mean input gives the signs")
    attack_random_share: float = setting(
        0.5, low=0, high=1, help="targeted-push-adaptive: share of the pushed coordinates where an attacker sends its honest sign",
    )
    label: str = setting("", help="name of the run in tables and plots")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.method in REAL_VALUED_METHODS and self.run.learning_rate == AUTOMATIC:
            raise ConfigError(
                f"learning_rate 0 (automatic steps) needs a sign method, got method {self.method!r}: give a learning rate"
            )
        if self.method in REAL_VALUED_METHODS and self.hooks.byzantine_fraction > 0:
            raise ConfigError(
                f"byzantine_fraction > 0 needs a sign method (the attacks replace signs), got method {self.method!r}"
            )
        if self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients_per_round must be at most num_clients={self.num_clients}, got {self.clients_per_round}"
            )
        if self.clients_per_round in (0, self.num_clients) and self.run.participation != 1:
            raise ConfigError(
                f"participation must be 1 when every client takes part in every round (clients_per_round 0 or "
                f"num_clients), got {self.run.participation!r}"
            )
        drawn = self.clients_per_round / self.num_clients
        if 0 < self.clients_per_round and self.run.participation < drawn:
            raise ConfigError(
                f"participation must be at least clients_per_round / num_clients = {drawn:g} (each client plans "
                f"its noise for that fraction of the rounds), got {self.run.participation!r}"
            )

    @classmethod
    def create(cls, **fields: Any) -> "Experiment":
        """Build from keyword arguments of :class:`RunSettings`, :class:`ExperimentOptions` and this class, mixed."""
        return cls().with_changes(**fields)

    def with_changes(self, **fields: Any) -> "Experiment":
        """Return a copy with fields of any part replaced (a field name not in any part is a TypeError)."""
        own, hooks = set(specs(type(self))), set(specs(ExperimentOptions))
        run = dataclasses.replace(self.run, **{k: v for k, v in fields.items() if k not in own | hooks})
        hook_options = dataclasses.replace(self.hooks, **{k: v for k, v in fields.items() if k in hooks})
        return dataclasses.replace(self, run=run, hooks=hook_options, **{k: v for k, v in fields.items() if k in own})

    @property
    def private(self) -> bool:
        """True for the methods that release DP-SIGN bits with Gaussian noise."""
        return self.method in PRIVATE_METHODS

    def run_config(self) -> dict[str, Any]:
        """Return every setting of the run in run-config form (kebab-case keys), both parts.

        Unlike the record's flat fields, which hold what the run used
        (the computed sigma, learning rate and delta), these are the settings
        as asked for: ``--resume`` compares them to tell an unchanged run.
        """
        return {**to_mapping(self.run), **to_mapping(self.hooks), **to_mapping(self)}

    def name(self) -> str:
        """A short label for tables and plots."""
        if self.label:
            return self.label
        parts = [self.method, self.run.dataset, self.run.partitioner]
        if self.private:
            parts.append(f"eps{self.run.target_epsilon:g}")
        if self.hooks.gradient_noise != "none":
            parts.append(self.hooks.gradient_noise)
        return "-".join(parts)


def experiment_from_fields(values: dict[str, Any], base: Experiment | None = None) -> Experiment:
    """Apply ``{field or key: value}`` (strings from a command line) to ``base``.

    Raises:
        ConfigError: naming an unknown or bad field.
    """
    base = base or Experiment()
    own = {name: spec for name, spec in specs(Experiment).items() if spec is not None}
    changes = {}
    for field_name, value in values.items():
        name = field_name.replace("-", "_")
        if name in own:
            changes[name] = own[name].coerce(value, name)
            continue
        for group in (RunSettings, ExperimentOptions):
            keys = {spec.key: field for field, spec in specs(group).items()}
            key = field_name if field_name in keys else specs(group)[name].key if name in specs(group) else None
            if key is not None:
                changes[keys[key]] = specs(group)[keys[key]].coerce(value, key)  # the combination is checked below
                break
        else:
            known = sorted(set(own) | set(specs(RunSettings)) | set(specs(ExperimentOptions)))
            raise ConfigError(f"unknown field {field_name!r}; fields: {', '.join(known)}")
    return base.with_changes(**changes)


@dataclass
class ClientData:
    """One client's training partition, loaded once for the whole run."""

    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def size(self) -> int:
        """n_m, the number of training examples."""
        return int(self.targets.shape[0])


def load_run_data(experiment: Experiment, *, dataset=None):
    """Return (dataset, [ClientData per client]) for a run; partitions are made once."""
    run = experiment.run
    if dataset is None:
        dataset = load_run_dataset(run)
    if experiment.max_examples > 0:
        dataset = _truncated(dataset, experiment.max_examples)
    # One partitioning for all clients (dpsign_fl.data.partition would redo it per client).
    shares = partition_dataset(
        dataset,
        num_partitions=experiment.num_clients,
        partitioner=run.partitioner,
        alpha=run.dirichlet_alpha,
        classes_per_partition=run.classes_per_partition,
        seed=run.data_seed,
    )
    clients = []
    for indices in shares:
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        clients.append(ClientData(dataset.train_inputs[index], dataset.train_targets[index]))
    return dataset, clients


def noise_multiplier_for(experiment: Experiment, target_delta: float) -> float:
    """Return sigma of each release for the run's method (0 for non-private methods).

    - ``dp-signsgd``: :func:`plan_release` (smallest sigma with composed
      epsilon <= target over T releases), unless ``noise_multiplier`` fixes it.
    - ``jin-dp-sign``: Jin et al.'s sigma for per-step (epsilon, delta).
    - ``jin-rectified``: Jin et al.'s sigma for per-step (epsilon / T, delta / T).
    """
    run = experiment.run
    if experiment.method == "dp-signsgd":
        if experiment.noise_multiplier is not None:
            return experiment.noise_multiplier
        return plan_release(run, Budget(run.target_epsilon, target_delta)).release.noise_multiplier
    if experiment.method == "jin-dp-sign":
        return jin_noise_multiplier(epsilon_per_step=run.target_epsilon, delta_per_step=target_delta)
    if experiment.method == "jin-rectified":
        steps = run.num_rounds
        return jin_noise_multiplier(epsilon_per_step=run.target_epsilon / steps, delta_per_step=target_delta / steps)
    return 0.0


def run_experiment(
    experiment: Experiment,
    *,
    dataset=None,
    progress: bool = True,
    on_round: Callable[[int, np.ndarray], None] | None = None,
) -> dict:
    """Run one federated training in this process and return its result record.

    Args:
        experiment: the run.
        dataset: an already loaded dataset (skips loading; for sweeps and tests).
        progress: show a tqdm bar on stderr.
        on_round: called as ``on_round(round, weights)`` after each update (tests).

    Returns:
        A JSON-safe dict: the settings, ``run_config`` (the settings as
        asked for, :meth:`Experiment.run_config`), ``epsilon`` (largest client's ledger
        epsilon; ``inf`` for non-private methods), ``noise_multiplier``,
        ``target_delta`` (the delta used), ``test_accuracy``,
        ``worst_class_accuracy`` (the lowest of the per-class accuracies that
        each ``history`` entry holds), ``test_loss``, ``rounds``,
        ``wall_seconds``, ``history`` (one entry per evaluation).
    """
    started = time.monotonic()
    def log(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)

    state = _RunState.start(experiment, dataset, log=log)
    run, weights = experiment.run, state.weights
    tail_start = run.num_rounds - int(experiment.tail_average * run.num_rounds) + 1
    tail_sum, tail_count = np.zeros_like(weights, dtype=np.float64), 0
    setup_seconds = time.monotonic() - started
    history = [state.evaluate_at(0, weights, started)]
    step = {"sgd": _sgd_round, "fedavg": _fedavg_round}.get(experiment.method, _sign_round)
    bar = tqdm(range(1, run.num_rounds + 1), desc=experiment.name(), file=sys.stderr, disable=not progress,
               leave=False, mininterval=1.0)
    for current in bar:
        load_model_vector(state.model, weights)
        weights = step(state, weights, round_clients(experiment, current), current)
        if current >= tail_start:
            tail_sum += weights
            tail_count += 1
        if on_round is not None:
            on_round(current, weights)
        if current % run.eval_every == 0 or current == run.num_rounds:
            history.append(state.evaluate_at(current, weights, started))
            bar.set_postfix(accuracy=f"{history[-1]['accuracy']:.4f}", refresh=False)
    bar.close()

    final = history[-1]
    record = {
        **asdict(run),
        **{name: getattr(experiment, name) for name in specs(Experiment) if name != "run"},
        "label": experiment.name(),
        "noise": experiment.hooks.gradient_noise,
        "target_epsilon": run.target_epsilon if experiment.private else None,
        "target_delta": state.target_delta if experiment.private else None,
        "learning_rate": state.learning_rate,
        "noise_multiplier": state.plan.release.noise_multiplier,
        "epsilon": final["epsilon"],
        "test_accuracy": final["accuracy"],
        "worst_class_accuracy": min(final["class_accuracies"].values()),
        "test_robust_accuracy": final["robust_accuracy"],
        "test_loss": final["loss"],
        "rounds": run.num_rounds,
        "num_parameters": int(weights.shape[0]),
        "client_sizes": [c.size for c in state.clients],
        "wall_seconds": round(time.monotonic() - started, 3),
        "setup_seconds": round(setup_seconds, 3),
        "excluded": state.excluded,
        "excluded_attackers": state.excluded_attackers,
        "refused": state.refused,
        "history": history,
        "run_config": experiment.run_config(),
    }
    if experiment.method in ("jin-dp-sign", "jin-rectified"):
        steps = run.num_rounds if experiment.method == "jin-rectified" else 1
        record["epsilon_per_step"] = run.target_epsilon / steps
        record["delta_per_step"] = state.target_delta / steps
    if tail_count:
        averaged = (tail_sum / tail_count).astype(weights.dtype)
        load_model_vector(state.model, averaged)
        _, accuracy = evaluate(state.model, state.test_inputs, state.test_targets)
        record["test_accuracy_tail_average"] = accuracy
    return record


@dataclass
class _RunState:
    """What every round of one run reads: data, model, the clients' ledgers and release plan, the server update."""

    experiment: Experiment
    dataset: Any
    clients: list[ClientData]
    model: torch.nn.Module
    weights: np.ndarray
    target_delta: float
    learning_rate: float
    plan: ReleasePlan
    ledgers: list[PrivacyLedger]
    updater: VoteUpdater
    noise_transform: Any
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    attacker_data: tuple[torch.Tensor, torch.Tensor] | None
    memory: VoteMemory = field(default_factory=VoteMemory)
    momenta: list[ClientMomentum | None] = field(default_factory=list)
    excluded: int = 0
    excluded_attackers: int = 0
    refused: int = 0
    """Drawn clients whose ledger refused the release (their budget spent): they sent nothing that round."""

    @classmethod
    def start(cls, experiment: Experiment, dataset, *, log: Callable[[str], None]) -> "_RunState":
        run = experiment.run
        dataset, clients = load_run_data(experiment, dataset=dataset)
        model = initial_model(run, dataset, log=log)  # as the Flower app's server builds it
        weights = model_vector(model)
        noise_transform = gradient_noise_transform(experiment.hooks.gradient_noise)
        target_delta = 1.0 / max(c.size for c in clients) ** 1.1 if experiment.delta_from_data else run.target_delta
        learning_rate = run.learning_rate if run.learning_rate is not None else 1.0 / math.sqrt(weights.shape[0] * run.num_rounds)
        noise_multiplier = noise_multiplier_for(experiment, target_delta)
        ledgers = [PrivacyLedger(accountant=run.accountant) for _ in clients] if experiment.private else []
        # A fixed sigma (sweeps) or Jin's per-step calibration are not planned for the target: report, never refuse.
        planned = experiment.method == "dp-signsgd" and experiment.noise_multiplier is None
        release = ReleaseSettings(
            sample_rate=run.sample_rate, clip_norm=run.clip_norm, noise_multiplier=noise_multiplier, clipping=run.clipping,
            adversarial=run.adversarial,
        )
        plan = ReleasePlan(release, planned_releases(run), Budget(run.target_epsilon if planned else math.inf, target_delta))
        updater = VoteUpdater(learning_rate=learning_rate, schedule=run.lr_schedule, momentum=run.server_momentum)
        updater.start(weights)
        attacker_data = None
        hooks = experiment.hooks
        if hooks.byzantine_attack in TARGETED_ATTACKS and hooks.byzantine_fraction > 0:  # what the attackers know: their own data
            attacking = [c for m, c in enumerate(clients) if is_byzantine(m, experiment.num_clients, hooks.byzantine_fraction)]
            attacker_data = (torch.cat([c.inputs for c in attacking]), torch.cat([c.targets for c in attacking]))
        return cls(
            experiment, dataset, clients, model, weights, target_delta, learning_rate, plan, ledgers, updater,
            noise_transform, torch.as_tensor(dataset.test_inputs), torch.as_tensor(dataset.test_targets), attacker_data,
            momenta=[ClientMomentum(run.client_momentum) if run.client_momentum > 0 else None for _ in ledgers],
        )

    def evaluate_at(self, round_number: int, weights: np.ndarray, started: float) -> dict:
        run, model = self.experiment.run, self.model
        load_model_vector(model, weights)
        loss, accuracy = evaluate(model, self.test_inputs, self.test_targets)
        robust = None
        if run.robust_evaluation is not None:
            attack_generator = torch.Generator().manual_seed(run.model_seed * 1_000_003 + round_number)
            robust = robust_accuracy(model, self.test_inputs, self.test_targets, run.robust_evaluation, generator=attack_generator)
        return {
            "round": round_number,
            "accuracy": accuracy,
            "class_accuracies": class_accuracies(model, self.test_inputs, self.test_targets),
            "robust_accuracy": robust,
            "loss": loss,
            "epsilon": _largest_epsilon(self.ledgers, self.target_delta) if self.experiment.private else math.inf,
            "wall_seconds": round(time.monotonic() - started, 3),
        }

    def eta(self, current: int) -> float:
        run = self.experiment.run
        return learning_rate_at(current, learning_rate=self.learning_rate, num_rounds=run.num_rounds, schedule=run.lr_schedule)


def _sgd_round(state: _RunState, weights: np.ndarray, chosen: list[int], current: int) -> np.ndarray:
    """Non-private baseline: the mean of the chosen clients' mean gradients, one step."""
    experiment, run = state.experiment, state.experiment.run
    gradients = [_client_mean_gradient(state.model, state.clients[m], experiment, _generator(run, m, current), current) for m in chosen]
    return weights - state.eta(current) * np.mean(gradients, axis=0).astype(weights.dtype)


def _fedavg_round(state: _RunState, weights: np.ndarray, chosen: list[int], current: int) -> np.ndarray:
    """Non-private baseline: local SGD on each chosen client, models averaged by client size."""
    experiment, run, eta = state.experiment, state.experiment.run, state.eta(current)
    local = [_local_sgd(state.model, weights, state.clients[m], experiment, eta, _generator(run, m, current), current) for m in chosen]
    sizes = np.array([state.clients[m].size for m in chosen], dtype=np.float64)
    return (np.tensordot(sizes / sizes.sum(), np.stack(local), axes=1)).astype(weights.dtype)


def _sign_round(state: _RunState, weights: np.ndarray, chosen: list[int], current: int) -> np.ndarray:
    """Sign methods: each chosen client's packed signs (a DP release against its ledger, or a baseline
    compressor), the attackers' replacements, then the server's vote and step."""
    experiment, run, hooks = state.experiment, state.experiment.run, state.experiment.hooks
    payloads, senders = [], []
    for m in chosen:
        client = state.clients[m]
        generator = _generator(run, m, current)
        if experiment.private:
            outcome = client_round(
                state.model, client.inputs, client.targets, plan_for_round(state.plan, run, current), state.ledgers[m],
                generator=generator, per_example_transform=state.noise_transform, momentum=state.momenta[m],
            )
            if not isinstance(outcome, SignedUpdate):
                if isinstance(outcome, Refusal):
                    state.refused += 1
                continue
            payloads.append(outcome.packed)
        else:
            payloads.append(pack_signs(_client_signs(state.model, client, experiment, generator, current)))
        senders.append(m)
    attackers = [i for i, m in enumerate(senders) if is_byzantine(m, experiment.num_clients, hooks.byzantine_fraction)]
    if attackers:
        push = None
        if state.attacker_data is not None:
            push = targeted_push(
                state.model, *state.attacker_data, target_class=experiment.attack_target_class,
                pushed_class=experiment.attack_pushed_class, random_share=experiment.attack_random_share,
            )
        payloads = attack_round(
            payloads, attackers, weights.shape[0], attack=hooks.byzantine_attack,
            generator=_generator(run, experiment.num_clients, current), push=push,
        )
    outcome = server_round(weights, payloads, updater=state.updater, server_round=current, num_rounds=run.num_rounds, vote_rule=run.vote,
                           memory=state.memory, identities=senders)
    state.excluded += len(outcome.excluded)
    state.excluded_attackers += sum(1 for i in outcome.excluded if i in attackers)
    return outcome.weights


def round_clients(experiment: Experiment, round_number: int) -> list[int]:
    """The clients of round ``round_number``: all, or ``clients_per_round`` drawn without replacement.

    The draw depends only on ``noise_seed``, the round and (balanced) the run's
    size, so every method of a recipe trains on the same clients in the same round.
    """
    total, drawn = experiment.num_clients, experiment.clients_per_round
    if drawn in (0, total):
        return list(range(total))
    if experiment.run.client_schedule == "balanced":
        rounds = max(experiment.run.num_rounds, round_number)
        return list(balanced_schedule(experiment.run.noise_seed, total, drawn, rounds)[round_number - 1])
    rng = np.random.default_rng([experiment.run.noise_seed, round_number])
    return sorted(int(m) for m in rng.choice(total, size=drawn, replace=False))


@functools.lru_cache(maxsize=4)
def balanced_schedule(seed: int, num_clients: int, per_round: int, num_rounds: int) -> tuple[tuple[int, ...], ...]:
    """The clients of rounds 1 .. ``num_rounds``: each round the ``per_round`` clients drawn least often so far.

    Ties are broken at random (from ``seed``), so the clients' counts never
    differ by more than one: after round t each client has been drawn floor or
    ceil of ``t * per_round / num_clients`` times. Data-independent: nothing
    here reads a client's data or replies.
    """
    rng = np.random.default_rng([seed, num_clients, per_round])
    counts = np.zeros(num_clients)
    rounds = []
    for _ in range(num_rounds):
        chosen = least_drawn(counts, per_round, rng)
        counts[chosen] += 1
        rounds.append(tuple(chosen))
    return tuple(rounds)


def _local_sgd(model, weights: np.ndarray, client: ClientData, experiment: Experiment, eta: float, generator, current: int) -> np.ndarray:
    """FedAvg's client update: ``local_steps`` SGD steps from ``weights`` on Poisson-sampled minibatches."""
    local = weights.copy()
    for _ in range(experiment.local_steps):
        load_model_vector(model, local)
        local -= eta * _client_mean_gradient(model, client, experiment, generator, current).astype(local.dtype)
    return local


def _client_signs(model, client: ClientData, experiment: Experiment, generator, current: int) -> torch.Tensor:
    """One client's int8 +-1 update for the non-private sign methods."""
    gradient = torch.from_numpy(_client_mean_gradient(model, client, experiment, generator, current))
    if experiment.method == "sto-sign":
        bound = float(gradient.abs().max())
        return sto_sign(gradient, bound=bound if bound > 0 else 1.0, generator=generator)
    return sign_of(gradient)


def _client_mean_gradient(model, client: ClientData, experiment: Experiment, generator, current: int) -> np.ndarray:
    """Mean gradient of a Poisson-sampled minibatch (rate ``sample_rate``); zeros if empty.

    Gradient noise, when asked for, is added to each example's gradient, as
    :func:`dpsign_fl.release.client_release` does, so that all methods see the
    same noisy gradients.
    """
    indices = poisson_sample(client.size, experiment.run.sample_rate, generator=generator)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if indices.numel() == 0:
        return np.zeros(sum(p.numel() for p in parameters), dtype=np.float32)
    inputs, targets = client.inputs[indices], client.targets[indices]
    attack = experiment.run.adversarial_at(current)
    if attack is not None:
        inputs = adversarial_examples(model, F.cross_entropy, inputs, targets, attack, generator=generator)
    transform = gradient_noise_transform(experiment.hooks.gradient_noise)
    if transform is None:
        loss = F.cross_entropy(model(inputs), targets)
        grads = torch.autograd.grad(loss, parameters)
        return torch.cat([g.reshape(-1) for g in grads]).detach().numpy()
    per_example = per_sample_gradients(model, F.cross_entropy, inputs, targets, chunk_size=DEFAULT_CHUNK_SIZE)
    per_example = transform(per_example, generator)
    return per_example.mean(dim=0).detach().numpy()


def _generator(run: RunSettings, client: int, round_number: int) -> torch.Generator:
    if run.reproducible_noise:
        return seeded_generator(run.noise_seed, client=client, stream=round_number)
    return secure_generator()


def _largest_epsilon(ledgers: list[PrivacyLedger], target_delta: float) -> float:
    """Largest epsilon among the clients; identical histories are accounted once."""
    distinct = {ledger.releases: ledger for ledger in ledgers}
    return max((ledger.epsilon(target_delta) for ledger in distinct.values()), default=0.0)


def _truncated(dataset, max_examples: int):
    inputs, targets = dataset.train_inputs[:max_examples], dataset.train_targets[:max_examples]
    natural = {
        name: dataclasses.replace(partition, train_clients=partition.train_clients[:max_examples])
        for name, partition in dataset.natural_partitions.items()
    }
    return dataclasses.replace(dataset, train_inputs=inputs, train_targets=targets, natural_partitions=natural)
