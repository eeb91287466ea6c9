"""The one description of a training run, and the one place that maps and checks its keys.

:class:`RunSettings` describes a run (data, model, privacy, schedule, seeds) for
both drivers: the Flower app (run-config keys in ``[tool.flwr.app.config]`` of
pyproject.toml) and the in-process research loop (:mod:`dpsign_fl.experiments`).
Driver-specific knobs live beside it, declared the same way:
:class:`FlowerOptions` here, ``Experiment`` in the loop. Every field is declared
once with :func:`setting`: its run-config key (kebab-case, by default the field
name with ``-`` for ``_``), its type, its range or choices and a help line. The
same declaration validates a Python construction (the message names
``sample_rate``), a run config (``sample-rate``) and a command line
(``--sample-rate``).

Bounds keep every value in a range where the code is tested and calibration
ends in seconds (e.g. ``target-epsilon`` in [0.05, 100], ``sample-rate`` >=
1e-4); seeds are integers in [0, 2**63).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import shlex
import sys
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .privacy.accounting import ACCOUNTANTS
from .model_sizes import HEAD_WIDTH, PREVIOUS_CHARACTERS, TRANSFORMER_DEPTH, TRANSFORMER_WIDTH
from .privacy.limits import CLIP_NORM_RANGE, TARGET_DELTA_RANGE, TARGET_EPSILON_RANGE
from .vote.server_update import AUTOMATIC, LR_SCHEDULES
from .vote import DEFAULT_VOTE, VOTE_RULES

SEED_LIMIT = 2**63
"""Seeds are integers in [0, SEED_LIMIT)."""
CLIENT_SCHEDULES = ("random", "balanced")
"""How a server picks each round's clients (run-config ``client-schedule``; :func:`dpsign_fl.rounds.least_drawn`)."""
PARTICIPATION_MARGIN = 3.0
"""z, the standard deviations of Binomial(T, p) the plan adds to the expected T * p releases (run-config
``participation-margin``; :func:`dpsign_fl.rounds.planned_releases`).

A client sampled independently with probability p in each of T rounds (K of N
clients at random: p = K/N) takes part Binomial(T, p) times. At z = 3 one client
in 800 is sampled more often than planned (T = 1000, p = 10/42: 1.25e-3, exact),
and refused for its last few samplings, for 3-10% more noise than planning for
the mean alone; z = 4 would cost another 1-3%. docs/privacy.md has the tables
(``scripts/participation_plan.py``). A server that samples every client equally
often (``client-schedule`` ``balanced``) needs no margin: z = 0.
"""


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it as the caller spelt it."""


class ConfigTypeError(ConfigError, TypeError):
    """A setting of the wrong kind (a string for a number, a float for an integer)."""


@dataclass(frozen=True)
class Spec:
    """How one setting is named, typed and bounded.

    Attributes:
        key: the run-config key (kebab-case).
        kind: ``int``, ``float``, ``str`` or ``bool``.
        help: one line for ``--help`` texts and docs.
        choices: the allowed values of a ``str`` setting, or a function
            returning them (read when a value is checked: see :meth:`allowed`).
        low, high: the allowed interval of a number (None = unbounded).
        low_open, high_open: whether an end is excluded.
        multiple_of: an integer setting must be a multiple of it (None = any).
        optional: whether ``None`` is allowed (Python callers only: a run config
            cannot hold None).
    """

    key: str
    kind: type
    help: str
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    multiple_of: int | None = None

    def allowed(self) -> tuple[str, ...] | None:
        """The allowed values of a ``str`` setting (None: any string)."""
        return self.choices() if callable(self.choices) else self.choices

    def interval(self) -> str:
        """The allowed interval, e.g. ``(0, 1]``."""
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}{')' if self.high_open or self.high is None else ']'}"

    def check(self, value: Any, name: str) -> None:
        """Raise ConfigError naming ``name`` unless ``value`` is of the right kind and in range."""
        if value is None and self.optional:
            return
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigTypeError(f"{name} must be true or false, got {value!r}")
            return
        if self.kind is str:
            if not isinstance(value, str):
                raise ConfigTypeError(f"{name} must be a string, got {value!r}")
            choices = self.allowed()
            if choices is not None and value not in choices:
                shown = tuple(c for c in choices if c)
                raise ConfigError(f"{name} must be one of {shown}{' or empty' if '' in choices else ''}, got {value!r}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigTypeError(f"{name} must be {'an integer' if self.kind is int else 'a number'}, got {value!r}")
        if self.kind is int and not isinstance(value, int):
            raise ConfigTypeError(f"{name} must be an integer, got {value!r}")
        if math.isnan(value):
            raise ConfigTypeError(f"{name} must be a number, got {value!r}")
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (above and below):
            raise ConfigError(f"{name} must be in {self.interval()}, got {value!r}")
        if self.multiple_of is not None and value % self.multiple_of:
            raise ConfigError(f"{name} must be a multiple of {self.multiple_of}, got {value!r}")

    def coerce(self, value: Any, name: str) -> Any:
        """Convert a run-config or command-line value (numbers may come as strings) and check it."""
        if self.kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        elif self.kind in (int, float) and isinstance(value, str):
            value = _parse_number(value, self.kind, name)
        elif self.kind is int and isinstance(value, float) and not isinstance(value, bool):
            if not (math.isfinite(value) and value == int(value)):
                raise ConfigTypeError(f"{name} must be an integer, got {value!r}")
            value = int(value)
        elif self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        self.check(value, name)
        return value


def _parse_number(text: str, kind: type, name: str) -> int | float:
    try:
        number = float(text.strip())
    except ValueError:
        raise ConfigTypeError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float:
        return number
    if not (math.isfinite(number) and number == int(number)):
        raise ConfigTypeError(f"{name} must be an integer, got {text!r}")
    try:
        return int(text.strip())  # exact for large integers, which float() rounds
    except ValueError:
        return int(number)


def setting(
    default: Any,
    *,
    help: str,
    key: str | None = None,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    kind: type | None = None,
    optional: bool = False,
    multiple_of: int | None = None,
) -> Any:
    """Declare one setting of a settings dataclass (see :class:`Spec`).

    The kind is the default's type unless given; ``key=None`` takes the field
    name with ``-`` for ``_`` (filled in by :func:`specs`).
    """
    spec = dict(
        key=key, kind=kind or type(default), help=help, choices=choices, low=low, high=high,
        low_open=low_open, high_open=high_open, optional=optional or default is None, multiple_of=multiple_of,
    )
    return dataclasses.field(default=default, metadata={"spec": spec})


def specs(cls) -> dict[str, Spec]:
    """Return field name -> :class:`Spec` of a settings dataclass, in declaration order."""
    found = {}
    for field in dataclasses.fields(cls):
        if field.metadata.get("spec") is None:  # a nested settings group, e.g. Experiment.run
            continue
        raw = dict(field.metadata["spec"])
        raw["key"] = raw["key"] or field.name.replace("_", "-")
        found[field.name] = Spec(**raw)
    return found


def check_fields(instance) -> None:
    """Validate every field of a settings dataclass instance (names as in Python)."""
    for name, spec in specs(type(instance)).items():
        spec.check(getattr(instance, name), name)


def from_mapping(cls, mapping: Mapping[str, Any], *, ignore_unknown: bool = True, style: str = "key"):
    """Build a settings dataclass from a mapping of run-config keys (kebab-case).

    Missing keys take the dataclass defaults. Values are coerced (``"5"`` for an
    integer, ``"true"`` for a boolean) and checked; the error names the key.

    Args:
        cls: a dataclass whose fields are declared with :func:`setting`.
        mapping: key -> value.
        ignore_unknown: keep quiet about keys that are not settings of ``cls``
            (a run config also holds the other settings groups' keys).
        style: how errors name a setting: ``"key"`` (``sample-rate``) or
            ``"option"`` (``--sample-rate``).

    Raises:
        ConfigError: naming the first bad or (unless ignored) unknown key.
    """
    by_key = {spec.key: (name, spec) for name, spec in specs(cls).items()}
    values = {}
    for key, value in mapping.items():
        if key not in by_key:
            if ignore_unknown:
                continue
            raise ConfigError(f"unknown setting {_shown(key, style)}; known: {', '.join(sorted(by_key))}")
        name, spec = by_key[key]
        values[name] = spec.coerce(value, _shown(key, style))
    return cls(**values)


def to_mapping(instance) -> dict[str, Any]:
    """Return the run-config form (kebab-case keys) of a settings dataclass instance."""
    return {spec.key: getattr(instance, name) for name, spec in specs(type(instance)).items()}


def keys(*classes) -> set[str]:
    """Return the run-config keys declared by the given settings dataclasses."""
    return {spec.key for cls in classes for spec in specs(cls).values()}


def _shown(key: str, style: str) -> str:
    return f"--{key}" if style == "option" else key


# Each list of names (and the default it implies) lives with the code that implements it.
# Lists that live beside torch (datasets, partitioners, clipping modes, models) are read when
# a value is first checked, not at import: the settings checker answers without loading torch.
_C = dict(
    votes=VOTE_RULES, default_vote=DEFAULT_VOTE, automatic_steps=AUTOMATIC, accountants=ACCOUNTANTS,
    schedules=LR_SCHEDULES, clip_norm_range=CLIP_NORM_RANGE, epsilon_range=TARGET_EPSILON_RANGE,
    delta_range=TARGET_DELTA_RANGE,
)


@functools.lru_cache(maxsize=None)
def _torch_side_choices() -> dict[str, tuple[str, ...]]:
    from .data import DATASETS, PARTITIONERS
    from .release.mechanism import CLIPPING_MODES
    from .models import MODELS
    from .release.adversarial import ATTACKS

    return dict(
        datasets=DATASETS, partitioners=PARTITIONERS, clipping=CLIPPING_MODES, models=("",) + MODELS, attacks=ATTACKS
    )


def _later(name: str):
    """Choices read on first use (:func:`_torch_side_choices`)."""
    return functools.partial(_read_choices, name)


def _read_choices(name: str) -> tuple[str, ...]:
    return _torch_side_choices()[name]


@dataclass(frozen=True)
class RunSettings:
    """One training run, as both the Flower app and the research loop run it.

    Field ``x_y`` is run-config key ``x-y``, except ``num_rounds``, whose key is
    Flower's ``num-server-rounds``. ``num_rounds`` is T, the total number of
    rounds of the run (a resumed run counts from round 1 too).
    """

    dataset: str = setting("digits", choices=_later("datasets"), help="dataset to train on")
    data_dir: str = setting("", help="absolute path of a local copy of the dataset; empty = embedded or Hugging Face hub")
    model: str = setting("", choices=_later("models"), help="model; empty = the dataset's default")
    model_width: int = setting(
        TRANSFORMER_WIDTH, low=HEAD_WIDTH, high=512, multiple_of=HEAD_WIDTH,
        help=f"char-transformer: channels, a multiple of {HEAD_WIDTH} (one attention head per {HEAD_WIDTH})",
    )
    model_depth: int = setting(TRANSFORMER_DEPTH, low=1, high=12, help="char-transformer: transformer blocks")
    model_previous_characters: int = setting(
        PREVIOUS_CHARACTERS, low=0, high=16, help="char-transformer: previous characters embedded at each position (0 = none)"
    )
    partitioner: str = setting("iid", choices=_later("partitioners"), help="how the training set is split among clients")
    dirichlet_alpha: float = setting(0.5, low=0, high=1e6, low_open=True, help="Dirichlet concentration (partitioner dirichlet)")
    classes_per_partition: int = setting(2, low=1, high=1_000_000, help="classes per client (partitioner pathological)")
    data_seed: int = setting(0, low=0, high=SEED_LIMIT, high_open=True, help="seed of the train/test split (digits, mushroom) and of the client partitions")
    num_rounds: int = setting(60, key="num-server-rounds", low=1, high=1_000_000, help="T, the total number of rounds of the run")
    participation: float = setting(
        1.0, low=0, high=1, low_open=True,
        help="p, the expected fraction of the rounds a client takes part in (K/N when each round samples K of N "
        "clients); noise is planned for about T*p releases plus a margin; 1 = every round, the safe default",
    )
    participation_margin: float = setting(
        PARTICIPATION_MARGIN, low=0, high=10,
        help="z, the standard deviations of Binomial(T, p) the noise plan adds to T*p releases; 0 = exactly "
        "ceil(T*p), for a server that samples every client equally often (the ledger refuses releases past the plan)",
    )
    client_schedule: str = setting(
        "random", choices=CLIENT_SCHEDULES,
        help="how the server picks a round's clients: random (independently each round) or balanced (those picked "
        "least often so far, ties at random: every client takes part floor or ceil of T K / N times)",
    )
    target_epsilon: float = setting(8.0, low=_C["epsilon_range"][0], high=_C["epsilon_range"][1], help="epsilon each client may spend over the run")
    target_delta: float = setting(1e-5, low=_C["delta_range"][0], high=_C["delta_range"][1], help="delta at which epsilon is accounted")
    sample_rate: float = setting(0.3, low=1e-4, high=1, help="q, the Poisson sampling rate of each client's data per round")
    clip_norm: float = setting(1.0, low=_C["clip_norm_range"][0], high=_C["clip_norm_range"][1], help="C, the L2 bound on each example's whole gradient")
    clipping: str = setting("flat", choices=_later("clipping"), help="per-example clipping: flat or automatic")
    accountant: str = setting("pld", choices=_C["accountants"], help="privacy accountant: pld or rdp")
    learning_rate: float | None = setting(
        _C["automatic_steps"], low=0, high=1e3, optional=True,
        help="eta, the server's step per vote; 0 = automatic steps from the votes' agreement, nothing to tune "
        "(Python only: None = 1/sqrt(d T), the source paper's choice)",
    )
    lr_schedule: str = setting("constant", choices=_C["schedules"], help="learning-rate schedule over the run")
    server_momentum: float = setting(0.0, low=0, high=1, high_open=True, help="server momentum on the votes")
    client_momentum: float = setting(
        0.0, low=0, high=1, high_open=True,
        help="beta of each client's momentum over its own noisy sums, whose sign it releases (post-processing: "
        "the same privacy accounting); 0 = off",
    )
    vote: str = setting(_C["default_vote"], choices=_C["votes"], help="how the server counts the signs: majority or robust")
    model_seed: int = setting(0, low=0, high=SEED_LIMIT, high_open=True, help="seed of the initial model's weights")
    pretrain_steps: int = setting(
        0, low=0, high=100_000,
        help="steps of non-private pretraining on the server's public set before round 1 (shakespeare: the five "
        "poems, which no client holds; mnist: scikit-learn's digits); 0 = none",
    )
    reproducible_noise: bool = setting(False, help="simulation only: derive clients' sampling and noise from noise-seed (NOT private)")
    noise_seed: int = setting(0, low=0, high=SEED_LIMIT, high_open=True, help="seed of clients' randomness when reproducible-noise is true")
    eval_every: int = setting(1, low=1, high=1_000_000, help="evaluate the global model every k rounds (and after the last)")
    adversarial_training: str = setting(
        "none", choices=_later("attacks"),
        help="clients train at adversarial copies of their examples: none, fgsm-rs (one step from a random start) or pgd",
    )
    adv_epsilon: float = setting(
        0.0, low=0, high=1,
        help="L-infinity radius in pixel units of [0, 1] of training attacks and of the server's robust accuracy "
        "(PGD-20); 0 = no attack, no robust accuracy",
    )
    adv_steps: int = setting(10, low=1, high=1000, help="steps of the pgd training attack (fgsm-rs takes one)")
    adv_step_size: float = setting(
        0.0, low=0, high=1, help="step of the training attack in pixel units; 0 = 1.25 eps (fgsm-rs) or 2.5 eps / steps (pgd)"
    )
    adv_warmup_rounds: int = setting(
        0, low=0, high=1_000_000,
        help="rounds over which the training attack's radius grows linearly to adv-epsilon (t / W of it in round t); "
        "0 = the full radius from round 1",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        from .data import check_partitioner

        try:
            check_partitioner(self.dataset, self.partitioner)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self._check_attack()
        if self.pretrain_steps:
            from .data import PRETRAINING_SETS

            if self.dataset not in PRETRAINING_SETS:
                raise ConfigError(
                    f"pretrain-steps must be 0 unless the dataset has a public pretraining set {tuple(PRETRAINING_SETS)}, "
                    f"got {self.pretrain_steps} for dataset {self.dataset!r}"
                )

    def _check_attack(self) -> None:
        if self.adversarial_training == "none" and self.adv_epsilon == 0:
            return
        if self.adversarial_training != "none" and self.adv_epsilon == 0:
            raise ConfigError(f"adv-epsilon must be > 0 with adversarial-training={self.adversarial_training!r}, got 0")
        if self.adversarial_training == "none" and self.adv_warmup_rounds:
            raise ConfigError(f"adv-warmup-rounds must be 0 without adversarial-training, got {self.adv_warmup_rounds}")
        from .data import pixel_statistics
        from .models import input_features

        if pixel_statistics(self.dataset) is None or input_features(self.model_name) != "pixels":
            raise ConfigError(
                f"adv-epsilon must be 0 unless the model reads image pixels, got {self.adv_epsilon} for dataset "
                f"{self.dataset!r} and model {self.model_name!r}"
            )

    @property
    def adversarial(self):
        """The clients' training attack (:class:`dpsign_fl.release.AdversarialSettings`), or None."""
        if self.adversarial_training == "none":
            return None
        from .data import pixel_statistics
        from .release.adversarial import AdversarialSettings

        mean, std = pixel_statistics(self.dataset)
        return AdversarialSettings(
            self.adversarial_training, self.adv_epsilon, self.adv_steps, self.adv_step_size, mean, std
        )

    def adversarial_at(self, server_round: int):
        """The training attack of round ``server_round`` (1-based): :attr:`adversarial`, its radius scaled by
        ``min(1, t / adv-warmup-rounds)`` during the warm-up (an automatic step size follows the radius).

        Privacy: the radius is a function of the public round number, so each
        adversarial copy still depends on its own example and the model only.
        """
        attack = self.adversarial
        if attack is None or self.adv_warmup_rounds == 0:
            return attack
        share = min(1.0, max(int(server_round), 1) / self.adv_warmup_rounds)
        return dataclasses.replace(attack, epsilon=attack.epsilon * share)

    @property
    def robust_evaluation(self):
        """The server's robust-accuracy attack (PGD-20 at ``adv_epsilon``), or None when ``adv_epsilon`` is 0."""
        if self.adv_epsilon == 0:
            return None
        from .data import pixel_statistics
        from .release.adversarial import evaluation_attack

        mean, std = pixel_statistics(self.dataset)
        return evaluation_attack(self.adv_epsilon, mean=mean, std=std)

    @property
    def model_name(self) -> str:
        """The model to build: ``model``, or the dataset's default when empty."""
        from .models import default_model

        return self.model or default_model(self.dataset)

    @property
    def model_options(self) -> dict[str, int]:
        """The size keywords of :func:`dpsign_fl.models.build_model` (read by ``char-transformer`` only)."""
        return {"width": self.model_width, "depth": self.model_depth, "previous_characters": self.model_previous_characters}


@dataclass(frozen=True)
class FlowerOptions:
    """The Flower app's own knobs, beside :class:`RunSettings` in the run config."""

    fraction_train: float = setting(1.0, low=0, high=1, low_open=True, help="fraction of connected nodes sampled per round")
    min_train_nodes: int = setting(2, low=1, high=1_000_000, help="fewest valid replies that move the model")
    min_available_nodes: int = setting(2, low=1, high=1_000_000, help="nodes to wait for before round 1")
    round_timeout: float = setting(3600.0, low=0, high=1e7, low_open=True, help="seconds to wait for a round's replies")
    round_grace: float = setting(
        30.0, low=0, high=1e7,
        help="seconds to wait for the other sampled nodes once min-train-nodes replies without error are in",
    )
    results_dir: str = setting("results", help="folder for metrics.json, the model and the plot")
    checkpoint_every: int = setting(0, low=0, high=1_000_000, help="write a checkpoint every k rounds (0 = never)")
    resume: bool = setting(False, help="continue from the checkpoint in results-dir")


def parse_run_config(run_config: Mapping[str, Any]) -> tuple[RunSettings, FlowerOptions]:
    """Validate a Flower run config and return its two settings groups.

    Keys that are neither (a Flower app may carry keys of its own) are ignored;
    missing keys take the defaults.

    Raises:
        ConfigError: naming the first bad key, what was expected and what came.
    """
    return from_mapping(RunSettings, run_config), from_mapping(FlowerOptions, run_config)


def run_config_of(*groups) -> dict[str, Any]:
    """Return the kebab-case run config of settings groups (for logs, results and checkpoints)."""
    return {key: value for group in groups for key, value in to_mapping(group).items()}


def parse_override_string(text: str) -> dict[str, Any]:
    """Parse ``flwr run --run-config`` text (``key=value`` pairs, TOML values) into a dict.

    Raises:
        ConfigError: for a pair without ``=`` or a value that is not TOML.
    """
    values = {}
    for pair in shlex.split(text, posix=False):
        key, equals, value = pair.partition("=")
        if not equals:
            raise ConfigError(f"expected key=value, got {pair!r}")
        try:
            values[key.strip()] = tomllib.loads(f"value = {value}")["value"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{key.strip()}: {value!r} is not a TOML value (strings need quotes: {key.strip()}='...')") from None
    return values


MEASURED_SETTINGS = {
    "mnist": "model='scatternet-linear' sample-rate=0.05 num-server-rounds=1000 (about 98% at epsilon 3)",
    "fashion-mnist": "model='scatternet-linear' sample-rate=0.05 num-server-rounds=1000 (about 87% at epsilon 3)",
    "cifar10": "model='scatternet-cnn' sample-rate=0.05 num-server-rounds=1000 (not measured here: no offline copy)",
    "mushroom": "model='logreg' sample-rate=0.05 num-server-rounds=1000 (about 99% at epsilon 3)",
    "shakespeare": (
        "partitioner='play' sample-rate=0.05 num-server-rounds=1000 learning-rate=0.01 with 10 of the 37 plays a "
        "round (about 35% at epsilon 8; about 47% from pretrain-steps=900 with learning-rate=0.001); by role, "
        "partitioner='role' sample-rate=0.5 learning-rate=0.003 with 20 of the 1,049 roles a round, client-schedule="
        "'balanced' participation-margin=0 (about 28.6% at epsilon 8; 27.7% with random draws and the default margin)"
    ),
}
"""Per dataset, settings docs/results.md measured, for the warning of :func:`tuning_warnings`."""
AUTOMATIC_STEPS_DIVERGED = {
    "shakespeare": "on char-transformer by play they reached 16.3% at round 150 and fell to 2.4% by round 300",
}
"""Datasets on which docs/results.md measured the automatic steps diverging, for :func:`tuning_warnings`."""


def tuning_warnings(settings: RunSettings, options: FlowerOptions | None = None) -> list[str]:
    """Warnings for settings that are valid but probably not what the user meant.

    - A dataset trained with the defaults chosen for the small digits demo
      (``sample-rate``, ``num-server-rounds``): on a larger dataset they waste
      the budget (a round per 60 is far too few) or run slowly.
    - ``participation`` below ``fraction-train`` (given ``options``): clients
      plan their noise for fewer releases than the rounds they will be asked
      in, and refuse once their budget is spent.
    - ``participation-margin`` below its default with ``participation`` < 1 and
      the random ``client-schedule``: a client drawn more often than planned
      refuses its last samplings.
    - ``client-momentum`` with the robust vote: honest clients then repeat
      themselves from round to round, and the vote's repetition statistic
      stops finding attackers that repeat a push (docs/robustness.md).
    - Automatic steps (``learning-rate`` 0) on a dataset where they were
      measured to diverge (:data:`AUTOMATIC_STEPS_DIVERGED`).

    Not errors: the user may mean it.
    """
    warnings = []
    if options is not None and settings.participation < options.fraction_train:
        warnings.append(
            f"participation={settings.participation:g} is below fraction-train={options.fraction_train:g}: each client "
            f"plans its noise for about {settings.participation:g} of the rounds but is asked in about "
            f"{options.fraction_train:g} of them, and refuses once its budget is spent"
        )
    if (settings.participation < 1 and settings.participation_margin < PARTICIPATION_MARGIN
            and settings.client_schedule == "random"):
        warnings.append(
            f"participation-margin={settings.participation_margin:g} is below the default {PARTICIPATION_MARGIN:g} "
            "with client-schedule='random': a client drawn more often than planned refuses its last samplings "
            "(docs/privacy.md); client-schedule='balanced' draws every client equally often"
        )
    if settings.client_momentum > 0 and settings.vote == "robust":
        warnings.append(
            f"client-momentum={settings.client_momentum:g} with vote='robust': honest clients repeat their signs from "
            "round to round, so the robust vote's repetition statistic no longer finds attackers that repeat a push "
            "(measured in docs/robustness.md); its other filters still apply"
        )
    defaults = RunSettings()
    digits_defaults = settings.dataset != "digits" and (settings.sample_rate, settings.num_rounds) == (
        defaults.sample_rate, defaults.num_rounds
    )
    if settings.learning_rate == AUTOMATIC and settings.dataset in AUTOMATIC_STEPS_DIVERGED:
        measured = "" if digits_defaults else f"; it measured {MEASURED_SETTINGS[settings.dataset]}"  # else said below
        warnings.append(
            f"learning-rate=0 (automatic steps) on dataset {settings.dataset!r}: docs/results.md measured them "
            f"diverging ({AUTOMATIC_STEPS_DIVERGED[settings.dataset]}){measured}"
        )
    if digits_defaults:
        warnings.append(
            f"dataset {settings.dataset!r} runs with sample-rate={defaults.sample_rate:g} and num-server-rounds="
            f"{defaults.num_rounds}, the defaults chosen for the embedded digits; docs/results.md measured "
            f"{MEASURED_SETTINGS[settings.dataset]}"
        )
    return warnings


def check_run_config(overrides: Mapping[str, Any], *, other_groups: tuple = ()) -> tuple[RunSettings, FlowerOptions]:
    """Validate run-config overrides as the app would, and name misspelt keys with the closest known ones.

    Args:
        overrides: run-config key -> value.
        other_groups: further settings groups the run config holds (the app's
            experiment hooks), checked too.

    Raises:
        ConfigError: naming the first unknown or bad key.
    """
    known = keys(RunSettings, FlowerOptions, *other_groups)
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=2)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown run-config key {key!r}{hint}")
    for group in other_groups:
        from_mapping(group, overrides)
    return parse_run_config(overrides)


def main(argv: list[str] | None = None) -> int:
    """``python -m dpsign_fl.settings "key=value ..."``: check a run config before ``flwr run``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dpsign_fl.settings",
        description="Check run-config overrides the way the app will, before flwr run starts anything; "
        "prints every setting, or the first bad key.",
    )
    parser.add_argument("run_config", nargs="?", default="", help="the text you pass to flwr run --run-config")
    args = parser.parse_args(argv)
    from .experiments.hooks import ExperimentOptions  # the app's run config also holds the experiment keys

    try:
        overrides = parse_override_string(args.run_config)
        settings, options = check_run_config(overrides, other_groups=(ExperimentOptions,))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for key, value in run_config_of(settings, options, from_mapping(ExperimentOptions, overrides)).items():
        print(f"{key} = {value!r}")
    for warning in tuning_warnings(settings, options):
        print(f"warning: {warning}", file=sys.stderr)
    for line in _natural_partition_lines(settings):
        print(line)
    return 0


def _natural_partition_lines(settings: RunSettings) -> list[str]:
    """How many clients a natural partitioner makes, read from ``data-dir`` (nothing without one: stays fast)."""
    from .data import NATURAL_PARTITIONERS, describe_natural_partition, load_dataset

    if settings.partitioner not in NATURAL_PARTITIONERS or not settings.data_dir:
        return []
    try:
        dataset = load_dataset(settings.dataset, data_dir=settings.data_dir, source="local")
    except (OSError, ValueError) as error:
        print(f"warning: data-dir could not be read here, so the clients are not counted: {error}", file=sys.stderr)
        return []
    return [describe_natural_partition(dataset, settings.partitioner)]


if __name__ == "__main__":
    sys.exit(main())
