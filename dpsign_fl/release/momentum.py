"""A client's momentum over its own noisy sums (run-config ``client-momentum``).

With beta > 0 a client keeps ``m <- beta * m + s_t`` over the noisy sums
``s_t`` of the releases it makes (each the Gaussian mechanism's output,
:func:`dpsign_fl.release.mechanism.noisy_sum`) and releases ``sign(m)``
instead of ``sign(s_t)``. Averaging over its rounds lets the signal of
consecutive releases add up while their independent noise partly cancels.

Privacy: ``sign(m)`` is a function of ``s_1 .. s_t`` alone, and each ``s_t``
is one Sampled Gaussian Mechanism release already counted in the client's
ledger, so releasing ``sign(m)`` is post-processing: the accounting is exactly
that of the plain release, whatever beta the server asks for. ``m`` itself
is as sensitive as the noisy sums: it stays on the client and is never sent
(the Flower client keeps it in its ``context.state``, which Flower keeps
local to the node for the run).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def check_client_momentum(beta: float) -> None:
    """Raise ValueError unless ``0 <= beta < 1`` (a finite number)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and 0 <= beta < 1):
        raise ValueError(f"client-momentum must be a number in [0, 1), got {beta!r}")


class ClientMomentum:
    """One client's running ``m <- beta * m + noisy sum``, kept between the rounds it takes part in.

    ``state`` is ``m`` after the last release (float64, as the noisy sums; 8
    bytes per coordinate; None before the first); a state whose length is not
    the next noisy sum's (another model) is dropped and the sum starts again.
    """

    def __init__(self, beta: float, state: np.ndarray | None = None) -> None:
        check_client_momentum(beta)
        self.beta = float(beta)
        self.state = None if state is None else np.asarray(state, dtype=np.float64).reshape(-1)

    def add(self, noisy: torch.Tensor) -> torch.Tensor:
        """Fold one noisy sum ``[d]`` into ``m``; return the new ``m`` (float64), whose sign is released."""
        m = noisy.to(torch.float64)
        if self.state is not None and self.state.shape[0] == m.shape[0]:
            m = torch.from_numpy(self.state).to(m.device) * self.beta + m
        self.state = m.cpu().numpy().copy()  # not a view of the returned tensor
        return m
