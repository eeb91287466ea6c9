"""The one seam through which experiments reach a round: synthetic gradient noise and Byzantine clients.

Neither is part of the product. The release path (:mod:`dpsign_fl.release`,
:mod:`dpsign_fl.rounds`) and the settings core (:mod:`dpsign_fl.settings`)
never import this package; they take two optional callables that only a
simulation installs:

- ``per_example_transform(grads, generator) -> grads``: applied to the
  ``[B, d]`` per-example gradients before clipping (synthetic heavy-tailed
  noise, :mod:`dpsign_fl.experiments.gradient_noise`). The clipping after it
  keeps every example's contribution within ``clip_norm``, so the release's
  sensitivity and its accounting do not change whatever the transform does.
- ``reply_transform(packed, num_coordinates, generator) -> packed``: replaces
  the packed signs a client sends (a Byzantine client,
  :mod:`dpsign_fl.experiments.attacks`), after its honest release was
  recorded in its ledger.

Who installs them: the research loop for its simulated clients, and the
shipped app (``client_app.py``, ``server_app.py``) through
:data:`FLOWER_EXPERIMENTS`, which :func:`dpsign_fl.flower.client.handle_train`
applies only in Flower's simulation engine; a deployed SuperNode ignores these
settings with a warning.
The settings themselves are :class:`ExperimentOptions`, a run-config group of
their own beside :class:`dpsign_fl.settings.RunSettings`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..settings import check_fields, from_mapping, setting, to_mapping


@functools.lru_cache(maxsize=None)
def _names() -> dict[str, tuple[str, ...]]:
    from .attacks import BYZANTINE_ATTACKS
    from .gradient_noise import GRADIENT_NOISES

    return {"attacks": BYZANTINE_ATTACKS, "gradient_noises": GRADIENT_NOISES}


@dataclass(frozen=True)
class ExperimentOptions:
    """Experiment-only settings: run-config keys of their own, honoured in simulation only."""

    gradient_noise: str = setting(
        "none", choices=lambda: _names()["gradient_noises"], help="experiments only: synthetic heavy-tailed gradient noise"
    )
    byzantine_fraction: float = setting(0.0, low=0, high=1, high_open=True, help="experiments only: fraction of clients that attack")
    byzantine_attack: str = setting(
        "sign-flip", choices=lambda: _names()["attacks"], help="experiments only: what attacking clients send"
    )

    def __post_init__(self) -> None:
        check_fields(self)

    def changed(self) -> dict[str, Any]:
        """The settings that differ from their defaults, by run-config key."""
        defaults = to_mapping(ExperimentOptions())
        return {key: value for key, value in to_mapping(self).items() if value != defaults[key]}


PerExampleTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
ReplyTransform = Callable[[np.ndarray, int, torch.Generator], np.ndarray]


@dataclass(frozen=True)
class ClientHooks:
    """What one simulated client does beyond an honest release (both None: nothing)."""

    per_example_transform: PerExampleTransform | None = None
    reply_transform: ReplyTransform | None = None


def gradient_noise_transform(kind: str) -> PerExampleTransform | None:
    """The per-example transform that adds synthetic gradient noise of ``kind`` (None for ``"none"``)."""
    if kind == "none":
        return None
    from .gradient_noise import add_gradient_noise

    return lambda grads, generator: add_gradient_noise(grads, kind=kind, generator=generator)


def client_hooks(options: ExperimentOptions, *, client: int, num_clients: int) -> ClientHooks:
    """The hooks of simulated client ``client`` of ``num_clients``: its gradient noise, and its attack if it is Byzantine.

    Only blind attacks (:data:`dpsign_fl.experiments.attacks.BLIND_ATTACKS`) act
    on one client's reply; coordinated ones are applied by the research loop
    to the whole round.
    """
    from .attacks import BLIND_ATTACKS, byzantine_payload, is_byzantine

    reply = None
    if options.byzantine_attack in BLIND_ATTACKS and is_byzantine(client, num_clients, options.byzantine_fraction):
        attack = options.byzantine_attack
        reply = lambda packed, d, generator: byzantine_payload(packed, d, attack=attack, generator=generator)  # noqa: E731
    return ClientHooks(gradient_noise_transform(options.gradient_noise), reply)


class FlowerExperiments:
    """The seam as the shipped Flower app installs it (``client_app.py``, ``server_app.py``).

    The ClientApp (:func:`dpsign_fl.flower.client.handle_train`) calls
    :meth:`asked` and, in simulation only, :meth:`client_hooks`; the ServerApp
    (:func:`dpsign_fl.flower.server.run_server`) calls :meth:`options` before
    round 1 and records them with the run config.
    """

    @staticmethod
    def options(run_config: Mapping[str, Any]) -> ExperimentOptions:
        """The run's experiment settings, refusing an attack a Flower simulation cannot run.

        Raises:
            ConfigError: for a bad value, or an attack whose clients act
                together: a coordinated one reads every honest payload of the
                round, a targeted push pools the attackers' data (the research
                loop runs those).
        """
        from ..settings import ConfigError
        from .attacks import BLIND_ATTACKS, TARGETED_ATTACKS

        options = from_mapping(ExperimentOptions, run_config)
        if options.byzantine_fraction > 0 and options.byzantine_attack not in BLIND_ATTACKS:
            needs = (
                "the attackers' pooled data" if options.byzantine_attack in TARGETED_ATTACKS
                else "every honest client's bits of the round"
            )
            raise ConfigError(
                f"byzantine-attack {options.byzantine_attack!r} needs {needs}: the "
                f"research loop runs it (python -m dpsign_fl.experiments); a simulation runs {BLIND_ATTACKS}"
            )
        return options

    @staticmethod
    def asked(run_config: Mapping[str, Any]) -> dict[str, Any]:
        """The experiment-only settings a run config changes from their defaults (what a deployed node ignores)."""
        return from_mapping(ExperimentOptions, run_config).changed()

    @staticmethod
    def client_hooks(run_config: Mapping[str, Any], *, client: int, num_clients: int | None) -> ClientHooks:
        """A simulated client's hooks (``client``: its partition; no attack without ``num_clients``)."""
        options = from_mapping(ExperimentOptions, run_config)
        if num_clients is None:
            return ClientHooks(gradient_noise_transform(options.gradient_noise))
        return client_hooks(options, client=client, num_clients=num_clients)


FLOWER_EXPERIMENTS = FlowerExperiments()
"""The seam the shipped app passes to its ClientApp and ServerApp bodies."""
