"""The one home of the privacy ranges every boundary checks: budgets and the clipping bound.

Read by the run config (:mod:`dpsign_fl.settings`), the node config
(:mod:`dpsign_fl.flower.node`), a release (:mod:`dpsign_fl.release.mechanism`,
:class:`dpsign_fl.release.ReleaseSettings`) and the PLD accountant's grid. No
heavy imports: the settings checker reads it without torch.
"""

from __future__ import annotations

TARGET_EPSILON_RANGE = (0.05, 100.0)
"""The budgets a run (``target-epsilon``) or a node (``max-epsilon``) may ask for: a closed interval.

Calibration is tested and ends in seconds over this range."""

TARGET_DELTA_RANGE = (1e-12, 0.5)
"""The deltas a run (``target-delta``) or a node (``delta``) may account at: a closed interval."""

CLIP_NORM_RANGE = (1e-5, 1e6)
"""The clipping bounds C a release accepts: a closed interval.

The floor keeps a clipped example's coordinates in float32's normal range,
where rounding changes a value by a relative 2^-24 at most and never lifts a
zero to the smallest subnormal: at C = 8e-46 an earlier version released
without effective noise (:mod:`dpsign_fl.release.mechanism`, "Float precision")."""
