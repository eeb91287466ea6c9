"""The size options of ``char-transformer`` and their defaults, without torch.

Read by :mod:`dpsign_fl.models` (which builds the model) and by
:mod:`dpsign_fl.settings` (run-config keys ``model-width``, ``model-depth``,
``model-previous-characters``), whose checker answers without loading torch.
"""

from __future__ import annotations

HEAD_WIDTH = 16
"""Channels per attention head of ``char-transformer``: the width must be a multiple of it."""

TRANSFORMER_WIDTH = 64
"""Default width of ``char-transformer``.

Chosen for 2 CPU cores, not the ~1M parameters first planned: a throwaway
spike (sign votes, 10 clients of ~52 examples a round) measured 0.75 s per DP
round at width 64 against 2.05 s at width 128, and the smaller model reached
the same accuracy or more under DP (each clipped coordinate carries more
signal): 1,000 rounds of training take about 13 minutes there, which leaves
room for evaluation in a 30-minute run (a pass over 11,000 test chunks of 80
characters took about 10 s on one thread: evaluate every 50 rounds or so).
"""

TRANSFORMER_DEPTH = 2
"""Default number of transformer blocks of ``char-transformer``."""

PREVIOUS_CHARACTERS = 3
"""Default number of previous characters whose embeddings each position adds (0 = none).

With 3, the spike's non-private sign-vote run reached 40 % next-character
accuracy where the same model without them stalled at 29 %.
"""
