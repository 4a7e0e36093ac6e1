"""The multi-client round benchmark (k clients one after another with PEFT or lorafast, against one
batched lorafast.MultiLoRALinear step) runs end to end in CPU smoke mode, passes its check that a
mixed batch gives each client its single-adapter loss and gradients, and writes the shared CSV schema."""
import math

import pytest

from support.bench_runs import run_bench_cpu

pytest.importorskip("transformers")
pytest.importorskip("peft")

METRICS = {"time": "ms", "tokens_per_s": "tokens/s", "peak_memory": "MB"}
PROVIDERS = ("peft-sequential", "lorafast-sequential", "lorafast-multi")
CLIENTS = (2, 3)  # the CPU smoke run's client counts; each client has 2 × 16 tokens


def test_bench_multi_cpu_smoke(tmp_path):
    proc, rows = run_bench_cpu("bench_multi.py", tmp_path / "multi.csv", timeout=120)

    assert "FAILED" not in proc.stdout, proc.stdout
    for dtype in ("float32", "bfloat16"):  # the check ran in both, on every client
        assert f"check ({dtype}): 14 MultiLoRALinear layers of 2 clients, 14 LoRALinear layers" in proc.stdout
    assert proc.stdout.count("adapter gradients: rel. err") == 4, proc.stdout
    labels = {f"clients={k},params=26.8K,seq=16,batch=2,r=4": k for k in CLIENTS}
    assert {(r["provider"], r["metric"], r["x_value"]) for r in rows} == {
        (p, m, x) for p in PROVIDERS for m in METRICS for x in labels}
    assert len(rows) == len(PROVIDERS) * len(METRICS) * len(CLIENTS)
    for r in rows:
        assert r["kernel"] == "multi_lora_round" and r["gpu_name"] == "cpu", r
        assert (r["mode"], r["x_name"]) == ("local_step", "config"), r
        assert r["unit"] == METRICS[r["metric"]], r
        q = [float(r[k]) for k in ("y_p50", "y_p20", "y_p80")]
        assert all(math.isfinite(v) and v > 0 for v in q), r
        assert q[1] <= q[0] <= q[2], r
    # tokens/s is k·batch·seq (k·32 tokens) over the round's time
    by = {(r["provider"], r["metric"], r["x_value"]): float(r["y_p50"]) for r in rows}
    for p in PROVIDERS:
        for x, k in labels.items():
            assert by[p, "tokens_per_s", x] == pytest.approx(k * 32 / (by[p, "time", x] * 1e-3), rel=1e-4)
