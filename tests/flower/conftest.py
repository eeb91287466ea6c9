"""Fixtures shared by the Flower adapter tests."""

import pytest

from dpsign_fl.flower.inprocess import server_task_identity


@pytest.fixture
def server_identity():
    """The task identity a real ServerApp process has (Strategy.configure_train builds Messages that read it)."""
    with server_task_identity():
        yield
