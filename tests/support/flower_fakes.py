"""Driving Flower strategies without a run: a server identity for messages and a Grid of nodes."""
import pytest


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Messages take their run and sender from the running task; outside a run, pose as
    a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class FakeGrid:
    """What FedAvg's node sampling needs from a Grid."""

    def __init__(self, n):
        self.nodes = list(range(101, 101 + n))

    def get_node_ids(self):
        return list(self.nodes)
