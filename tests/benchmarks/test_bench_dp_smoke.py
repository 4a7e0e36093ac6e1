"""The DP step benchmark runs end to end (CPU smoke mode) and writes the shared CSV schema;
its two model builds compute the same function once their weights are copied."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from support.common import ROOT
from support.bench_runs import run_bench_cpu

sys.path.insert(0, str(ROOT / "bench"))
from dp_model import TinyTransformer, copy_weights, randomize_lora_B_, trainable_parameters  # noqa: E402


def test_bench_dp_cpu_smoke(tmp_path):
    proc, rows = run_bench_cpu("bench_dp.py", tmp_path / "dp.csv")

    providers = {r["provider"] for r in rows}
    assert providers >= {"lorafast-nonprivate", "lorafast-dp", "opacus"}, proc.stdout
    assert "lorafast-dp-cuda" not in providers and "CUDA BACKEND" not in proc.stdout  # not a CPU default
    for r in rows:
        assert r["kernel"] == "dp_step" and r["gpu_name"] == "cpu"
        assert (r["mode"], r["metric"], r["unit"], r["x_name"]) == ("train_step", "time", "ms", "config"), r
        assert r["x_value"] in ("batch=4,T=8", "batch=8,T=8"), r
        p50 = float(r["y_p50"])
        assert math.isfinite(p50) and p50 > 0, r


def _pair(dtype=torch.float32):
    kw = dict(hidden=32, n_layers=2, n_heads=4, r=3, n_classes=3, dtype=dtype)
    torch.manual_seed(0)
    fast = randomize_lora_B_(TinyTransformer(layer="lorafast", **kw), std=0.1)
    plain = copy_weights(fast, TinyTransformer(layer="plain", **kw))
    return fast, plain


def test_copy_weights_same_logits_and_grads():
    fast, plain = _pair()
    x = torch.randn(3, 5, 32)
    y = torch.tensor([0, 2, 1])
    logits_fast, logits_plain = fast(x), plain(x)
    torch.testing.assert_close(logits_fast, logits_plain, rtol=1e-5, atol=1e-6)

    F.cross_entropy(logits_fast, y).backward()
    F.cross_entropy(logits_plain, y).backward()
    pf, pp = trainable_parameters(fast), trainable_parameters(plain)
    assert pf.keys() == pp.keys() and len(pf) == 2 * 6 * 2 + 2
    for name in pf:
        assert pf[name].shape == pp[name].shape, name
        assert pf[name].grad is not None and pf[name].grad.norm() > 0, name  # random B: A's grad is not zero
        torch.testing.assert_close(pf[name].grad, pp[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_only_adapters_and_head_train():
    for model in _pair(torch.bfloat16):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in model.named_parameters()
                             if n.startswith("head.") or ".lora_A" in n or ".lora_B" in n}
        for name, p in trainable_parameters(model).items():
            assert p.requires_grad and p.dtype == torch.float32, name
        assert model.blocks[0].ln1.weight.dtype == torch.bfloat16


def test_copy_weights_refuses_a_different_model():
    fast, _ = _pair()
    other = TinyTransformer(hidden=32, n_layers=2, n_heads=4, r=3, n_classes=3, lora_alpha=3, layer="plain",
                            dtype=torch.float32)
    with pytest.raises(ValueError, match="scaling"):
        copy_weights(fast, other)
    with pytest.raises(ValueError, match="n_layers"):
        copy_weights(fast, TinyTransformer(hidden=32, n_layers=1, n_heads=4, r=3, n_classes=3, layer="plain"))


def test_bench_dp_cpu_drops_cuda_provider(tmp_path):
    proc, rows = run_bench_cpu("bench_dp.py", tmp_path / "dp.csv", "--providers", "lorafast-nonprivate",
                               "lorafast-dp-cuda")
    assert "THE CUDA BACKEND IS NOT AVAILABLE" in proc.stdout and "`lorafast-dp-cuda` is skipped" in proc.stdout
    assert {r["provider"] for r in rows} == {"lorafast-nonprivate"}
