"""federated.simulate: a round of k clients' batched local steps equals k separate clients'
steps followed by the aggregation; metrics, chart, progress and bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lorafast import MultiLoRALinear
from lorafast.federated import aggregate, simulate
from support.common import fresh_seed

K, IN, OUT = 3, 8, 4


def datasets(sizes=(6, 4, 5)):
    return [TensorDataset(torch.randn(n, IN), torch.randint(0, OUT, (n,))) for n in sizes]


def model(variant="lora"):
    m = nn.Sequential(MultiLoRALinear(IN, OUT, K, r=2, lora_alpha=4, variant=variant))
    with torch.no_grad():
        m[0].lora_B.normal_(std=0.3)
    return m


@pytest.mark.parametrize("method", ["fedavg", "fedex", "ffa"])
def test_one_round_equals_separate_clients(method):
    """Full-batch local steps (order-free): each client's AdamW step on its own mean loss, then
    aggregate weighted by dataset size, as simulate does in one batched step."""
    fresh_seed()
    data = datasets()
    m = model("ffa" if method == "ffa" else "lora")
    layer = m[0]
    singles = [layer.client_layer(c) for c in range(K)]
    for s in singles:
        s.lora_B.requires_grad_(True)
        s.lora_A.requires_grad_(method != "ffa")
        opt = torch.optim.AdamW([q for q in (s.lora_A, s.lora_B) if q.requires_grad], lr=0.05, weight_decay=0.0)
        x, y = data[singles.index(s)].tensors
        for _ in range(2):
            F.cross_entropy(s(x), y).backward()
            opt.step()
            opt.zero_grad()
    W = layer.weight.detach().clone()
    A = torch.stack([s.lora_A.detach() for s in singles])
    B = torch.stack([s.lora_B.detach() for s in singles])
    want = aggregate(W, A, B, method=method, client_weights=[6, 4, 5], scaling=layer.scaling)

    result = simulate(m, data, rounds=1, local_steps=2, method=method, batch_size=6, lr=0.05, progress=False)
    assert len(result.rounds) == 1 and len(result.rounds[0]["client_loss"]) == K
    for c in range(K):
        assert torch.allclose(layer.lora_A[c], want.lora_A, atol=1e-6), c
        assert torch.allclose(layer.lora_B[c], want.lora_B, atol=1e-6), c
    assert torch.allclose(layer.weight, W, atol=1e-6)    # aggregate(W, ...) above updated W as fedex does


def test_training_lowers_the_loss_and_plots(tmp_path, capsys):
    fresh_seed()
    torch.manual_seed(0)
    true = torch.randn(OUT, IN)
    data = []
    for n in (32, 24, 40):
        x = torch.randn(n, IN)
        data.append(TensorDataset(x, (x @ true.T).argmax(1)))
    m = model()
    evals = []

    def eval_fn(mod):
        evals.append(1)
        return {"eval_points": float(len(evals))}
    result = simulate(m, data, rounds=4, local_steps=5, method="fedex", batch_size=8, lr=0.05, eval_fn=eval_fn,
                      plot=tmp_path / "sim.png")
    losses = result.series("train_loss")
    assert losses[-1] < losses[0]
    assert result.series("eval_points") == [1.0, 2.0, 3.0, 4.0]
    assert (tmp_path / "sim.png").stat().st_size > 1000
    assert "round 4/4" in capsys.readouterr().err


def test_private_rounds_report_epsilon_per_client():
    """dp=: each client its own DP-SGD run; ε per client grows with the rounds and with its
    sampling rate (batch_size / its dataset size); the model is no longer private afterwards."""
    fresh_seed()
    m = model()
    result = simulate(m, datasets((40, 20, 10)), rounds=2, local_steps=3, method="fedex", batch_size=2, lr=0.01,
                      dp={"noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5, "noise_seed": 3},
                      progress=False)
    eps = [r["epsilon"] for r in result.rounds]
    assert all(len(e) == K for e in eps)
    assert all(a < b for a, b in zip(eps[0], eps[1]))
    assert eps[1][0] < eps[1][1] < eps[1][2] and result.rounds[1]["max_epsilon"] == eps[1][2]
    assert not any(hasattr(mod, "_lorafast_grad_sample_store") for mod in m.modules())


@pytest.mark.parametrize("kw, exc, match", [
    (dict(client_datasets=datasets()[:2]), ValueError, "list of 3 datasets"),
    (dict(rounds=0), ValueError, "rounds"),
    (dict(method="fedprox"), ValueError, "method must be one of"),
    (dict(dp={"noise_multiplier": 1.0}), ValueError, "dp must be a dict with noise_multiplier and max_grad_norm"),
    (dict(client_datasets=[*datasets()[:2], TensorDataset(torch.zeros(0, IN), torch.zeros(0).long())]),
     ValueError, r"client_datasets\[2\] is empty"),
])
def test_bad_input(kw, exc, match):
    m = model()
    before = {n: t.clone() for n, t in m.state_dict().items()}
    args = dict(client_datasets=datasets(), rounds=1, local_steps=1, progress=False) | kw
    with pytest.raises(exc, match=match):
        simulate(m, **args)
    assert all(torch.equal(t, before[n]) for n, t in m.state_dict().items())
    with pytest.raises(ValueError, match="no MultiLoRALinear"):
        simulate(nn.Linear(2, 2), datasets(), rounds=1, local_steps=1)


def test_example_runs(tmp_path):
    """examples/federated_simulation.py --tiny prints a loss per round and method and plots them."""
    import subprocess
    import sys

    from support.common import ROOT
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "federated_simulation.py"), "--tiny",
                           "--rounds", "2", "--local-steps", "2", "--plot", str(tmp_path / "fs.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    header = lines.index("round    fedavg     fedex       ffa")
    for line in lines[header + 1:header + 3]:
        values = [float(v) for v in line.split()[1:]]
        assert len(values) == 3 and all(0 < v < 10 for v in values), line
    assert (tmp_path / "fs.png").stat().st_size > 1000
