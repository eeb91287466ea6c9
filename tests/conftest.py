"""Generic test settings shared by the whole suite.

Hypothesis runs derandomized (a fixed seed derived from each test) and without
its example database, so every run of the suite draws the same examples and
writes nothing into the work tree. Set HYPOTHESIS_PROFILE=explore for fresh
random examples when hunting for counterexamples.
"""

import os

from hypothesis import settings

settings.register_profile("dpsign", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", derandomize=False, database=None, deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dpsign"))
