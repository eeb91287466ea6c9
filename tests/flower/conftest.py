"""Fixtures shared by the Flower adapter tests."""

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def server_identity(monkeypatch):
    """The task identity a real ServerApp process has (Strategy.configure_train builds Messages that read it)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
