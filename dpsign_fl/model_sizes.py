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
signal). The research loop here, 10 plays, q 0.05, one thread on a shared
2-core machine: about 1.1 s per DP round, so 1,000 rounds take about 18
minutes; a pass over the 10,127 test chunks took about 10 s, so evaluate
every 50 rounds or so to stay within 30 minutes. After 60 rounds (lr 1e-3):
26 % next-character accuracy without privacy, 18 % at epsilon 8.
"""

TRANSFORMER_DEPTH = 2
"""Default number of transformer blocks of ``char-transformer``."""

PREVIOUS_CHARACTERS = 3
"""Default number of previous characters whose embeddings each position adds (0 = none).

With 3, the spike's non-private sign-vote run reached 40 % next-character
accuracy where the same model without them stalled at 29 %.
"""
