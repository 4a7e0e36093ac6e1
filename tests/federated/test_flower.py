"""The Flower strategy FedExLoRA: aggregation, base synchronisation, client helper, example.

The unit tests drive the strategy's configure/aggregate methods with hand-made replies
(no Ray); one test runs examples/flower_fedex.py --tiny in Flower's simulation engine.
"""
import copy
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from lorafast import LoRALinear  # noqa: E402
from lorafast.integrations.flower import (  # noqa: E402
    BASE_VERSION_KEY, SYNC_KEY, FedExLoRA, adapter_arrays, apply_global_adapters, base_arrays, base_weights)
from support.common import ROOT  # noqa: E402
from support.flower_fakes import FakeGrid, server_identity  # noqa: E402,F401  (an autouse fixture)

S = 2.0  # lora_alpha / r of the layers below


class Net(nn.Module):
    """Two adapted layers with odd sizes and a plain trainable head."""

    def __init__(self):
        super().__init__()
        self.q = LoRALinear(33, 47, r=3, lora_alpha=6, seed=1)
        self.blocks = nn.ModuleList([LoRALinear(47, 33, r=3, lora_alpha=6, seed=2)])
        self.head = nn.Linear(33, 5)


LAYERS = ("q", "blocks.0")


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net()


def random_adapters(net, gen):
    """A client's trained adapters and head: fresh random tensors, never zeros."""
    out = {}
    for name in LAYERS:
        layer = net.get_submodule(name)
        out[f"{name}.lora_A"] = torch.randn(layer.lora_A.shape, generator=gen) * 0.3
        out[f"{name}.lora_B"] = torch.randn(layer.lora_B.shape, generator=gen) * 0.3
    out["head.weight"] = torch.randn(5, 33, generator=gen)
    return out


def reply(msg, tensors, n, version=None, loss=1.0):
    metrics = {"num-examples": n, "train_loss": loss}
    if version is not None:
        metrics[BASE_VERSION_KEY] = version
    content = RecordDict({"arrays": ArrayRecord({k: v.clone() for k, v in tensors.items()}),
                          "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def train_message(node, arrays):
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord()}), dst_node_id=node,
                   message_type=MessageType.TRAIN)


def strategy(method, net, n_nodes=3, **kw):
    return FedExLoRA(method, scaling=S, base_weights=base_weights(net), min_train_nodes=n_nodes,
                     min_evaluate_nodes=n_nodes, min_available_nodes=n_nodes, **kw)


def rel_err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def run_round(strat, grid, clients, ns, rnd=1, arrays=None, versions=None):
    msgs = list(strat.configure_train(rnd, arrays, ConfigRecord(), grid))
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    replies = [reply(by_node[node], clients[i], ns[i], None if versions is None else versions[i])
               for i, node in enumerate(grid.nodes)]
    return msgs, strat.aggregate_train(rnd, replies)


def expected_average(base, clients, ns):
    """Σ pᵢ (W + s·BᵢAᵢ) per layer, float64."""
    p = torch.tensor(ns, dtype=torch.float64) / sum(ns)
    return {name: sum(pi * (base[name].double() + S * c[f"{name}.lora_B"].double() @ c[f"{name}.lora_A"].double())
                      for pi, c in zip(p.tolist(), clients))
            for name in LAYERS}


# ----------------------------------------------------------------------------- aggregation

@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_exact_methods_average_the_clients_models(method):
    net = make_net()
    base0 = {k: v.clone() for k, v in base_weights(net).items()}
    strat, grid = strategy(method, net), FakeGrid(3)
    gen = torch.Generator().manual_seed(1)
    clients, ns = [random_adapters(net, gen) for _ in range(3)], [10, 30, 60]
    _, (arrays, metrics) = run_round(strat, grid, clients, ns, arrays=adapter_arrays(net))

    want = expected_average(base0, clients, ns)
    merged = strat.merged_weights(arrays)
    for name in LAYERS:
        A = torch.from_numpy(arrays[f"{name}.lora_A"].numpy())
        B = torch.from_numpy(arrays[f"{name}.lora_B"].numpy())
        got = strat.base_weights[name].double() + S * B.double() @ A.double()
        assert rel_err(got, want[name]) <= 1e-5, name
        assert rel_err(merged[name], want[name]) <= 1e-5, name
        assert strat.base_weights[name].dtype == torch.float32
        assert not torch.equal(strat.base_weights[name], base0[name])     # the residual went into W
        if method == "flora":
            assert torch.count_nonzero(B) == 0                              # adapters restart from (Ā, 0)
    assert strat.base_version == 1
    assert metrics["train_loss"] == pytest.approx(1.0) and BASE_VERSION_KEY not in metrics


def test_fedavg_keeps_base_and_weights_follow_num_examples():
    net = make_net()
    base0 = {k: v.clone() for k, v in base_weights(net).items()}
    strat, grid = strategy("fedavg", net), FakeGrid(3)
    gen = torch.Generator().manual_seed(2)
    clients, ns = [random_adapters(net, gen) for _ in range(3)], [5, 1, 14]
    msgs, (arrays, _) = run_round(strat, grid, clients, ns, arrays=adapter_arrays(net))

    assert all(SYNC_KEY not in m.content["arrays"] for m in msgs)           # fedavg sends adapters only
    p = torch.tensor(ns, dtype=torch.float64) / sum(ns)
    for key in [f"{n}.lora_{x}" for n in LAYERS for x in "AB"] + ["head.weight"]:
        want = sum(pi * c[key].double() for pi, c in zip(p.tolist(), clients))
        got = torch.from_numpy(arrays[key].numpy())
        assert got.dtype == torch.float32 and rel_err(got, want) <= 1e-6, key
    for name in LAYERS:
        assert torch.equal(strat.base_weights[name], base0[name])
    assert strat.base_version == 0


def test_ffa_is_exact_with_a_shared_A():
    net = make_net()
    base0 = {k: v.clone() for k, v in base_weights(net).items()}
    strat, grid = strategy("ffa", net), FakeGrid(3)
    gen = torch.Generator().manual_seed(3)
    shared = random_adapters(net, gen)
    clients = []
    for _ in range(3):
        c = random_adapters(net, gen)
        c.update({k: v for k, v in shared.items() if k.endswith("lora_A")})
        clients.append(c)
    ns = [3, 4, 5]
    _, (arrays, _) = run_round(strat, grid, clients, ns, arrays=adapter_arrays(net))
    want = expected_average(base0, clients, ns)
    for name, W in strat.merged_weights(arrays).items():
        assert torch.equal(strat.base_weights[name], base0[name])
        assert rel_err(W, want[name]) <= 1e-5


# ----------------------------------------------------------------------------- client synchronisation

def test_apply_global_adapters_makes_clients_equal_the_server():
    net = make_net()
    strat, grid = strategy("fedex", net), FakeGrid(3)
    clients = [copy.deepcopy(net) for _ in grid.nodes]
    versions = [0, 0, 0]
    gen = torch.Generator().manual_seed(4)
    arrays, ns = adapter_arrays(net), [7, 11, 2]
    for rnd in (1, 2, 3):
        msgs = {m.metadata.dst_node_id: m for m in strat.configure_train(rnd, arrays, ConfigRecord(), grid)}
        replies, trained = [], []
        for i, node in enumerate(grid.nodes):
            versions[i] = apply_global_adapters(clients[i], msgs[node].content["arrays"], base_version=versions[i])
            for name in LAYERS:   # the client's base equals the master, bit for bit
                assert torch.equal(clients[i].get_submodule(name).weight, strat.base_weights[name])
            update = random_adapters(net, gen)   # "local training"
            trained.append(update)
            replies.append(reply(msgs[node], update, ns[i], versions[i]))
        before = {k: v.clone() for k, v in strat.base_weights.items()}
        arrays, _ = strat.aggregate_train(rnd, replies)
        assert versions == [rnd - 1] * 3 and strat.base_version == rnd

    # the last round's payload brings every client to the server's global model
    want = expected_average(before, trained, ns)
    msgs = {m.metadata.dst_node_id: m for m in strat.configure_evaluate(3, arrays, ConfigRecord(), grid)}
    for i, node in enumerate(grid.nodes):
        assert apply_global_adapters(clients[i], msgs[node].content["arrays"], base_version=versions[i]) == 3
        for name in LAYERS:
            layer = clients[i].get_submodule(name)
            assert torch.equal(layer.weight, strat.base_weights[name])
            assert torch.equal(layer.lora_A, torch.from_numpy(arrays[f"{name}.lora_A"].numpy()))
            effective = layer.weight.double() + S * layer.lora_B.double() @ layer.lora_A.double()
            assert rel_err(effective, want[name]) <= 1e-5
        assert torch.equal(clients[i].head.weight, torch.from_numpy(arrays["head.weight"].numpy()))


def test_missed_rounds_catch_up_with_factors_then_weights():
    """out·in = 1551, out+in = 80: 3 clients of rank 3 add K = 9 per round, so one or two
    missed rounds travel as factors (K·80 < 1551), three as the weight itself."""
    net = make_net()
    strat = strategy("fedex", net)
    gen = torch.Generator().manual_seed(5)
    nodes = [1, 2, 3, 4]
    stale = copy.deepcopy(net)     # node 4 never takes part until the end

    def one_round(rnd, arrays):
        msgs = strat.with_base_sync([train_message(n, arrays) for n in nodes[:3]])
        replies = [reply(m, random_adapters(net, gen), 10 + i, rnd - 1) for i, m in enumerate(msgs)]
        return strat.aggregate_train(rnd, replies)[0]

    arrays = adapter_arrays(net)
    for rnd in (1, 2):
        arrays = one_round(rnd, arrays)
    (msg,) = strat.with_base_sync([train_message(4, arrays)])
    payload = msg.content["arrays"]
    assert payload[SYNC_KEY].numpy().tolist() == [0, 2]
    assert payload["q.residual_U"].shape == (47, 18) and "q.weight" not in payload
    v = apply_global_adapters(stale, payload, base_version=0)
    assert v == 2
    for name in LAYERS:
        assert rel_err(stale.get_submodule(name).weight, strat.base_weights[name]) <= 1e-6

    # a second delivery of the same payload changes nothing; one for another version is refused
    w = stale.q.weight.clone()
    assert apply_global_adapters(stale, payload, base_version=2) == 2 and torch.equal(stale.q.weight, w)
    with pytest.raises(ValueError, match="base_version"):
        apply_global_adapters(stale, payload, base_version=1)
    assert torch.equal(stale.q.weight, w)

    strat.note_replies([Message(Error(code=0, reason="lost"), reply_to=msg)])   # node 4 failed
    for rnd in (3, 4, 5):
        arrays = one_round(rnd, arrays)
    (msg,) = strat.with_base_sync([train_message(4, arrays)])
    payload = msg.content["arrays"]
    assert "q.weight" in payload and "q.residual_U" not in payload                # unknown: whole weights
    assert payload[SYNC_KEY].numpy().tolist() == [-1, 5]
    fresh = copy.deepcopy(net)     # a node never heard of starts at version 0: too far back now
    (msg,) = strat.with_base_sync([train_message(5, arrays)])
    assert "q.weight" in msg.content["arrays"]
    assert apply_global_adapters(fresh, msg.content["arrays"], base_version=0) == 5
    for name in LAYERS:
        assert torch.equal(fresh.get_submodule(name).weight, strat.base_weights[name])
    assert len(strat._history) == 2          # older updates cannot beat sending the weight


def test_one_base_version_key_and_replies_of_older_clients_are_read():
    """The payload's [from, to] and the clients' reported version share one key; a reply
    under the old MetricRecord spelling "lorafast.base-version" is still read (and, like the
    key, kept out of the aggregated metrics)."""
    assert BASE_VERSION_KEY == SYNC_KEY == "lorafast.base_version"
    net = make_net()
    strat, grid = strategy("fedex", net), FakeGrid(3)
    gen = torch.Generator().manual_seed(7)
    msgs = list(strat.configure_train(1, adapter_arrays(net), ConfigRecord(), grid))
    assert all(m.content["arrays"][BASE_VERSION_KEY].numpy().tolist() == [0, 0] for m in msgs)
    replies = []
    for i, m in enumerate(msgs):     # (Flower wants the same metric keys from every client of a round)
        metrics = {"num-examples": 5, "train_loss": 1.0, "lorafast.base-version": 9 if i == 2 else 0}
        content = RecordDict({"arrays": ArrayRecord({k: v.clone() for k, v in random_adapters(net, gen).items()}),
                              "metrics": MetricRecord(metrics)})
        replies.append(Message(content, reply_to=m))
    arrays, metrics = strat.aggregate_train(1, replies)
    assert BASE_VERSION_KEY not in metrics and "lorafast.base-version" not in metrics
    payloads = {m.metadata.dst_node_id: m.content["arrays"]
                for m in strat.configure_train(2, arrays, ConfigRecord(), grid)}
    known, unknown = (payloads[m.metadata.dst_node_id] for m in msgs[1:])   # msgs[2]'s node reported 9
    assert "q.residual_U" in known and known[BASE_VERSION_KEY].numpy().tolist() == [0, 1]
    assert "q.weight" in unknown and unknown[BASE_VERSION_KEY].numpy().tolist() == [-1, 1]


def test_helpers_round_trip():
    net = make_net()
    arrays = adapter_arrays(net)
    assert sorted(arrays.keys()) == sorted(f"{n}.lora_{x}" for n in LAYERS for x in "AB")
    other = make_net(seed=1)
    apply_global_adapters(other, base_arrays(net))
    apply_global_adapters(other, arrays)
    for name in LAYERS:
        a, b = net.get_submodule(name), other.get_submodule(name)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.lora_A, b.lora_A)


# ----------------------------------------------------------------------------- bad configuration

def test_bad_configuration_raises_value_error():
    net = make_net()
    bw = base_weights(net)
    with pytest.raises(ValueError, match="method"):
        FedExLoRA("fedsgd", scaling=S, base_weights=bw)
    with pytest.raises(ValueError, match="base_weights"):
        FedExLoRA("fedex", scaling=S)
    with pytest.raises(ValueError, match="base_weights"):
        FedExLoRA("fedex", scaling=S, base_weights={"q": torch.ones(3)})
    with pytest.raises(ValueError, match="scaling"):
        FedExLoRA("fedex", scaling=float("nan"), base_weights=bw)
    with pytest.raises(ValueError, match="scaling"):
        FedExLoRA("fedex", scaling={"q": 2.0}, base_weights=bw)
    with pytest.raises(ValueError, match="fraction_train"):
        FedExLoRA("fedex", scaling=S, base_weights=bw, fraction_train=1.5)

    grid = FakeGrid(3)
    strat = FedExLoRA("fedex", scaling=S, base_weights={"q": bw["q"]}, min_available_nodes=3)
    with pytest.raises(ValueError, match=r"base_weights has no entry for layer 'blocks\.0'"):
        strat.configure_train(1, adapter_arrays(net), ConfigRecord(), grid)
    bad = adapter_arrays(net)
    bad["q.lora_A"] = ArrayRecord({"x": torch.zeros(3, 34)})["x"]
    with pytest.raises(ValueError, match="do not fit"):
        strategy("fedex", net).configure_train(1, bad, ConfigRecord(), grid)


def test_bad_replies_change_nothing():
    net = make_net()
    strat, grid = strategy("fedex", net), FakeGrid(3)
    gen = torch.Generator().manual_seed(6)
    msgs = list(strat.configure_train(1, adapter_arrays(net), ConfigRecord(), grid))
    before = {k: v.clone() for k, v in strat.base_weights.items()}
    clients = [random_adapters(net, gen) for _ in range(3)]
    clients[2]["blocks.0.lora_B"] = torch.randn(33, 4)           # rank 4 against rank 3
    with pytest.raises(ValueError, match="blocks.0"):
        strat.aggregate_train(1, [reply(m, c, 5) for m, c in zip(msgs, clients)])
    clients[2] = random_adapters(net, gen)
    for c in clients:
        c["extra.lora_A"], c["extra.lora_B"] = torch.randn(2, 4), torch.randn(4, 2)
    with pytest.raises(ValueError, match="base_weights has no entry for layer 'extra'"):
        strat.aggregate_train(1, [reply(m, c, 5) for m, c in zip(msgs, clients)])
    for name in LAYERS:
        assert torch.equal(strat.base_weights[name], before[name])
    assert strat.base_version == 0

    client = make_net()
    w = client.q.weight.clone()
    with pytest.raises(ValueError, match="shape"):
        apply_global_adapters(client, {"q.lora_A": torch.zeros(3, 34), "q.weight": torch.zeros(47, 33)})
    with pytest.raises(ValueError, match="matches no"):
        apply_global_adapters(client, {"nope.lora_A": torch.zeros(3, 33)})
    assert torch.equal(client.q.weight, w)


# ----------------------------------------------------------------------------- the example

def test_example_simulation_tiny():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "flower_fedex.py"), "--tiny"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    rows = {int(m.group(1)): [float(x) for x in m.groups()[1:]] for m in re.finditer(
        r"^\s*(\d+) \|\s+(\S+)\s+(\S+) \|\s+(\S+)\s+(\S+)\s*$", proc.stdout, re.M)}
    assert sorted(rows) == [1, 2, 3], out[-4000:]
    for values in rows.values():
        assert all(0 < v < 20 for v in values), values      # both methods' train and eval losses
    assert "fedavg train" in proc.stdout and "fedex train" in proc.stdout
    assert "OK: every client's base equals the server's master copy" in proc.stdout


def test_gpt2_conv1d_base_travels_and_merges_as_out_by_in():
    """A Conv1D base is stored (in, out): records carry it as (out, in) and the residual
    U V (out, in) lands in it transposed."""
    transformers = pytest.importorskip("transformers")
    import lorafast
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=31, n_positions=8)
    model = lorafast.inject_adapters(transformers.GPT2LMHeadModel(cfg), ["c_attn"], r=2)
    name = "transformer.h.0.attn.c_attn"
    conv_w = model.get_submodule(name).weight
    before = conv_w.detach().clone()
    assert tuple(base_weights(model)[name].shape) == (48, 16)
    torch.testing.assert_close(base_weights(model)[name], before.T)
    U, V = torch.randn(48, 3), torch.randn(3, 16)
    apply_global_adapters(model, {f"{name}.residual_U": U, f"{name}.residual_V": V})
    assert tuple(conv_w.shape) == (16, 48)
    torch.testing.assert_close(conv_w.detach(), before + (U @ V).T)
