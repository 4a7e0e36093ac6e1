"""The model training-step benchmark (PEFT against lorafast.from_peft on a Llama-style model)
runs end to end in CPU smoke mode, passes its PEFT-vs-lorafast check and writes the shared
CSV schema."""
import math

import pytest

from support.bench_runs import run_bench_cpu

pytest.importorskip("transformers")
pytest.importorskip("peft")

METRICS = {"time": "ms", "tokens_per_s": "tokens/s", "peak_memory": "MB"}


def test_bench_model_cpu_smoke(tmp_path):
    proc, rows = run_bench_cpu("bench_model.py", tmp_path / "model.csv", timeout=120)

    assert "check: from_peft replaced 14 of 14 PEFT LoRA layers" in proc.stdout, proc.stdout
    assert "FAILED" not in proc.stdout, proc.stdout
    assert "CUDA BACKEND" not in proc.stdout, proc.stdout  # lorafast-cuda is not a CPU default
    assert {(r["provider"], r["metric"]) for r in rows} == {(p, m) for p in ("peft", "lorafast") for m in METRICS}
    assert len(rows) == 6
    for r in rows:
        assert r["kernel"] == "model_step" and r["gpu_name"] == "cpu", r
        assert (r["mode"], r["x_name"]) == ("train_step", "config"), r
        assert r["unit"] == METRICS[r["metric"]], r
        assert r["x_value"] == "params=26.8K,seq=16,batch=2,r=4", r
        q = [float(r[k]) for k in ("y_p50", "y_p20", "y_p80")]
        assert all(math.isfinite(v) and v > 0 for v in q), r
        assert q[1] <= q[0] <= q[2], r
    # tokens/s is batch·seq (32 tokens) over the step time
    by = {(r["provider"], r["metric"]): float(r["y_p50"]) for r in rows}
    for p in ("peft", "lorafast"):
        assert by[p, "tokens_per_s"] == pytest.approx(32 / (by[p, "time"] * 1e-3), rel=1e-4)


def test_bench_model_cpu_drops_cuda_provider(tmp_path):
    proc, rows = run_bench_cpu("bench_model.py", tmp_path / "model.csv", "--providers", "lorafast", "lorafast-cuda")
    assert "THE CUDA BACKEND IS NOT AVAILABLE" in proc.stdout and "`lorafast-cuda` is skipped" in proc.stdout
    assert {r["provider"] for r in rows} == {"lorafast"}
