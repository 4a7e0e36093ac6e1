"""A Flower node of many virtual clients: one model with MultiLoRALinear layers trains them
in one batched step and replies once; FedExLoRA aggregates that reply as its clients' own
replies, and apply_global_adapters loads the global adapter into every slot."""
import pytest
import torch
from torch import nn

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from lorafast import MultiLoRALinear  # noqa: E402
from lorafast.integrations.flower import (  # noqa: E402
    BASE_VERSION_KEY, FedExLoRA, apply_global_adapters, base_weights, virtual_client_reply)
from support.flower_fakes import FakeGrid, server_identity  # noqa: E402,F401  (an autouse fixture)

K = 4


class VNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = MultiLoRALinear(13, 9, K, r=2, lora_alpha=4, seed=1)
        self.o = MultiLoRALinear(9, 13, K, r=2, lora_alpha=4, seed=2)


def trained(net, gen):
    with torch.no_grad():
        for layer in (net.q, net.o):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))


def base_net():
    torch.manual_seed(11)   # one base for every strategy and node here
    return VNet()


def strategy(net, n):
    return FedExLoRA("fedex", scaling=2.0, base_weights=base_weights(net), min_train_nodes=n,
                     min_evaluate_nodes=n, min_available_nodes=n)


def test_a_virtual_reply_aggregates_as_its_clients_replies():
    torch.manual_seed(0)
    net = VNet()
    trained(net, torch.Generator().manual_seed(3))
    counts = [5, 1, 7]
    slots = [0, 2, 3]
    arrays = ArrayRecord({f"{n}.{a}": getattr(m, a).detach()[0].clone() for n, m in (("q", net.q), ("o", net.o))
                          for a in ("lora_A", "lora_B")})

    one = strategy(base_net(), 1)
    msg = next(iter(one.configure_train(1, arrays, ConfigRecord(), FakeGrid(1))))
    content = virtual_client_reply(net, counts, clients=slots, metrics={"train_loss": [0.5, 0.2, 0.9]},
                                   base_version=0)
    got, metrics = one.aggregate_train(1, [Message(content, reply_to=msg)])

    many = strategy(base_net(), 3)
    msgs = list(many.configure_train(1, arrays, ConfigRecord(), FakeGrid(3)))
    replies = []
    for m, slot, n, loss in zip(msgs, slots, counts, [0.5, 0.2, 0.9]):
        tensors = {f"{name}.{a}": getattr(layer, a).detach()[slot].clone()
                   for name, layer in (("q", net.q), ("o", net.o)) for a in ("lora_A", "lora_B")}
        replies.append(Message(RecordDict({"arrays": ArrayRecord(tensors), "metrics": MetricRecord(
            {"num-examples": float(n), "train_loss": loss, BASE_VERSION_KEY: 0})}), reply_to=m))
    want, want_metrics = many.aggregate_train(1, replies)

    assert set(got.keys()) == set(want.keys())
    for key in want.keys():
        diff = (torch.from_numpy(got[key].numpy()) - torch.from_numpy(want[key].numpy())).abs().max().item()
        assert diff < 1e-6, (key, diff)
    for name in ("q", "o"):
        assert torch.allclose(one.base_weights[name], many.base_weights[name], atol=1e-6)
    assert metrics["train_loss"] == pytest.approx(want_metrics["train_loss"])

    # the node loads the global adapter into every slot, and the residual into its base once
    node = base_net()
    msg2 = next(iter(one.configure_train(2, got, ConfigRecord(), FakeGrid(1))))
    assert apply_global_adapters(node, msg2.content["arrays"], base_version=0) == 1
    for name in ("q", "o"):
        layer = getattr(node, name)
        assert torch.equal(layer.weight, one.base_weights[name])
        for c in range(K):
            assert torch.equal(layer.lora_A[c], torch.from_numpy(got[f"{name}.lora_A"].numpy()))


def test_bad_virtual_replies():
    net = VNet()
    with pytest.raises(ValueError, match="list of 2 counts"):
        virtual_client_reply(net, [3], clients=[0, 1])
    with pytest.raises(ValueError, match=r"clients must list slots in \[0, 4\)"):
        virtual_client_reply(net, [3], clients=[4])
    with pytest.raises(ValueError, match="MultiLoRALinear layers only"):
        virtual_client_reply(nn.Linear(2, 2), [1])
    strat = strategy(base_net(), 1)
    arrays = ArrayRecord({f"{n}.{a}": getattr(m, a).detach()[0].clone() for n, m in (("q", net.q), ("o", net.o))
                          for a in ("lora_A", "lora_B")})
    msg = next(iter(strat.configure_train(1, arrays, ConfigRecord(), FakeGrid(1))))
    content = virtual_client_reply(net, [1, 2, 3, 4])
    content["metrics"]["num-examples"] = 4.0
    before = {k: v.clone() for k, v in strat.base_weights.items()}
    with pytest.raises(ValueError, match="as a list of 4 counts"):
        strat.aggregate_train(1, [Message(content, reply_to=msg)])
    assert all(torch.equal(v, before[k]) for k, v in strat.base_weights.items())
