"""lorafast.integrations.flower as a package (records, client, strategy): every name the
single-module flower.py had stays importable from it, and the parts are the same objects."""
import pytest

pytest.importorskip("flwr")

import lorafast.integrations.flower as flower  # noqa: E402
from lorafast.integrations.flower import client, records, strategy  # noqa: E402

# dir() of the single-module lorafast/integrations/flower.py, public names only
OLD_NAMES = ['Array', 'ArrayRecord', 'ArraysLike', 'BASE_VERSION_KEY', 'Callable', 'ConfigRecord', 'FedAvg',
             'FedExLoRA', 'Grid', 'INFO', 'Iterable', 'LoRALinear', 'METHODS', 'Mapping', 'Message', 'MetricRecord',
             'Optional', 'RecordDict', 'SYNC_KEY', 'Tensor', 'Union', 'adapter_arrays', 'aggregate', 'annotations',
             'apply_global_adapters', 'base_arrays', 'base_weights', 'log', 'math', 'nn', 'np', 'numbers',
             'reference', 'torch']
# public names added since: a node of many virtual clients (MultiLoRALinear)
NEW_NAMES = ['virtual_client_reply', 'VIRTUAL_CLIENTS_KEY']


def test_every_name_of_the_old_module_is_still_there():
    assert [n for n in OLD_NAMES if not hasattr(flower, n)] == []
    assert set(flower.__all__) <= set(OLD_NAMES) | set(NEW_NAMES)
    assert all(hasattr(flower, n) for n in NEW_NAMES)


def test_the_names_are_the_parts_objects():
    import lorafast.federated
    assert flower.FedExLoRA is strategy.FedExLoRA
    assert flower.apply_global_adapters is client.apply_global_adapters
    for name in ("adapter_arrays", "base_arrays", "base_weights", "BASE_VERSION_KEY", "SYNC_KEY", "ArraysLike"):
        assert getattr(flower, name) is getattr(records, name), name
    assert flower.METHODS is lorafast.federated.METHODS and flower.aggregate is lorafast.federated.aggregate
