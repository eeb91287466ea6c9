"""The one parser and validator of run-config keys, for the client and the server.

Flower passes the run config (``[tool.flwr.app.config]`` in pyproject.toml,
overridden by ``flwr run --run-config``) as a flat dict with kebab-case keys.
:func:`parse_run_config` maps it once onto :class:`RunConfig` (snake_case, the
names used everywhere in the code) and rejects bad values with one message that
names the key.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from .attacks import BYZANTINE_ATTACKS
from .data import DATASETS, PARTITIONERS
from .gradient_noise import GRADIENT_NOISES
from .mechanism import CLIPPING_MODES
from .models import MODELS
from .privacy.accounting import ACCOUNTANTS
from .server_update import LR_SCHEDULES




class ConfigError(ValueError):
    """A run-config value is missing or invalid; the message names the key."""


@dataclass(frozen=True)
class RunConfig:
    """Validated run configuration. Field ``x_y`` is run-config key ``x-y``."""

    num_server_rounds: int = 60
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    dataset: str = "digits"
    data_dir: str = ""
    model: str = ""
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    partition_seed: int = 0
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    sample_rate: float = 0.3
    clip_norm: float = 1.0
    clipping: str = "flat"
    learning_rate: float = 0.02
    lr_schedule: str = "constant"
    server_momentum: float = 0.0
    accountant: str = "pld"
    seed: str = ""
    results_dir: str = "results"
    eval_every: int = 1
    gradient_noise: str = "none"
    byzantine_fraction: float = 0.0
    byzantine_attack: str = "sign-flip"
    checkpoint_every: int = 0
    resume: bool = False
    round_timeout: float = 3600.0

    @property
    def seed_value(self) -> int | None:
        """The seed as an int, or None for 'draw from the OS's secure source'."""
        return int(self.seed) if self.seed != "" else None

    def to_run_config(self) -> dict[str, Any]:
        """Return the kebab-case dict this config was parsed from (for logs and results)."""
        return {name.replace("_", "-"): value for name, value in asdict(self).items()}


_CHOICES = {
    "dataset": DATASETS,
    "model": ("",) + MODELS,
    "partitioner": PARTITIONERS,
    "clipping": CLIPPING_MODES,
    "lr-schedule": LR_SCHEDULES,
    "accountant": ACCOUNTANTS,
    "gradient-noise": GRADIENT_NOISES,
    "byzantine-attack": BYZANTINE_ATTACKS,
}

# key -> (low, high, low_inclusive, high_inclusive)
_RANGES = {
    "num-server-rounds": (1, math.inf, True, False),
    "fraction-train": (0, 1, False, True),
    "min-train-nodes": (1, math.inf, True, False),
    "min-available-nodes": (1, math.inf, True, False),
    "dirichlet-alpha": (0, math.inf, False, False),
    "classes-per-partition": (1, math.inf, True, False),
    "target-epsilon": (0, math.inf, False, False),
    "target-delta": (0, 1, False, False),
    "sample-rate": (0, 1, False, True),
    "clip-norm": (0, math.inf, False, False),
    "learning-rate": (0, math.inf, False, False),
    "server-momentum": (0, 1, True, False),
    "eval-every": (1, math.inf, True, False),
    "byzantine-fraction": (0, 1, True, False),
    "checkpoint-every": (0, math.inf, True, False),
    "round-timeout": (0, math.inf, False, False),
}


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Validate a Flower run config and return it as a :class:`RunConfig`.

    Unknown keys are ignored (a Flower app may carry keys of its own); missing
    keys take the defaults of :class:`RunConfig`.

    Raises:
        ConfigError: naming the first bad key, what was expected and what came.
    """
    values: dict[str, Any] = {}
    for field in fields(RunConfig):
        key = field.name.replace("_", "-")
        if key not in run_config:
            continue
        values[field.name] = _coerce(key, run_config[key], type(field.default))
    config = RunConfig(**values)
    for key, choices in _CHOICES.items():
        value = getattr(config, key.replace("-", "_"))
        if value not in choices:
            shown = tuple(c for c in choices if c) if key == "model" else choices
            raise ConfigError(f"{key} must be one of {shown}, got {value!r}")
    for key, (low, high, low_in, high_in) in _RANGES.items():
        value = getattr(config, key.replace("-", "_"))
        above = value >= low if low_in else value > low
        below = value <= high if high_in else value < high
        if not (above and below and not math.isnan(value)):
            interval = f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
            raise ConfigError(f"{key} must be in {interval}, got {value!r}")
    if config.seed != "":
        try:
            int(config.seed)
        except ValueError:
            raise ConfigError(f"seed must be an integer or empty (secure random), got {config.seed!r}") from None
    return config


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if kind is str:
        return str(value)
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if kind is int and number != float(value):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return number
