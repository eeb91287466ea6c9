"""Generic test settings shared by the whole suite.

Hypothesis runs derandomized (a fixed seed derived from each test) and without
its example database, so every run of the suite draws the same examples and
writes nothing into the work tree. Its timing checks (deadline, the too_slow
health check) are off: on a loaded 2-core machine they fail for reasons that
have nothing to do with the code. Set HYPOTHESIS_PROFILE=explore for fresh
random examples when hunting for counterexamples.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

_NO_TIMING = dict(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dpsign", derandomize=True, **_NO_TIMING)
settings.register_profile("explore", derandomize=False, max_examples=500, **_NO_TIMING)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dpsign"))


@pytest.fixture(autouse=True)
def private_flower_home(tmp_path_factory, monkeypatch):
    """Every test gets its own FLWR_HOME: a deployed node's default ledger lives there, never in ~/.flwr."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))


@pytest.fixture(autouse=True, scope="session")
def private_feature_cache(tmp_path_factory):
    """Computed ScatterNet features and the compiled vote kernel go to a folder of this test session, never to the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("feature-cache")
    previous = os.environ.get("DPSIGN_FL_CACHE")
    os.environ["DPSIGN_FL_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("DPSIGN_FL_CACHE", None)
    else:
        os.environ["DPSIGN_FL_CACHE"] = previous


@pytest.fixture
def fresh_vote_kernel(monkeypatch, tmp_path):
    """An empty cache folder and no vote kernel loaded yet in this process (and none left loaded after)."""
    from dpsign_fl import cache
    from dpsign_fl.vote import kernel as vote_kernel

    monkeypatch.setenv("DPSIGN_FL_CACHE", str(tmp_path / "cache"))
    for remembered in (vote_kernel._build, vote_kernel._warn_once, cache._warn_refused):
        remembered.cache_clear()
    yield tmp_path / "cache"
    for remembered in (vote_kernel._build, vote_kernel._warn_once, cache._warn_refused):
        remembered.cache_clear()


@pytest.fixture(scope="module", params=["compiled", "numpy"])
def both_vote_kernels(request):
    """Run a module's tests on each vote kernel (module-scoped: hypothesis forbids per-test fixtures).

    Use with ``pytestmark = pytest.mark.usefixtures("both_vote_kernels")``.
    """
    from unittest import mock

    from dpsign_fl.vote import VoteCounter
    from dpsign_fl.vote.kernel import KERNEL_ENV, find_compiler

    if request.param == "compiled" and find_compiler() is None:
        pytest.skip("no C compiler on this machine: only the numpy kernel can be tested")
    with mock.patch.dict(os.environ, {KERNEL_ENV: request.param}):
        assert VoteCounter(1).kernel == request.param
        yield request.param


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests: on a shared 2-core machine, 2 threads that wait for each other ran 50x slower.

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
