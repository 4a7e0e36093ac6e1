"""The FedEx merge benchmark runs end to end (CPU smoke mode) and writes the shared CSV schema."""
import math

from support.bench_runs import run_bench_cpu


def test_bench_federated_cpu_smoke(tmp_path):
    proc, rows = run_bench_cpu("bench_federated.py", tmp_path / "f.csv")

    timed = [r for r in rows if r["provider"] != "roofline"]
    assert {r["provider"] for r in timed} >= {"naive", "torch_stacked", "lorafast-triton"}, proc.stdout
    assert "lorafast-cuda" not in {r["provider"] for r in timed} and "CUDA BACKEND" not in proc.stdout
    assert {r["metric"] for r in timed} == {"time", "roofline_fraction"}
    assert {r["x_value"] for r in timed} == {"k=3,r=4,shape=48x40,master=fp32",
                                             "k=3,r=4,shape=48x40,master=bf16+comp"}
    for r in rows:
        assert r["kernel"] == "fedex_merge" and r["gpu_name"] == "cpu"
        p50 = float(r["y_p50"])
        assert math.isfinite(p50) and p50 > 0, r
    for r in timed:
        assert (r["mode"], r["x_name"]) == ("merge", "config"), r
        assert r["unit"] == {"time": "ms", "roofline_fraction": "fraction"}[r["metric"]], r
    # every (provider, config) has both metrics
    pairs = {(r["provider"], r["x_value"]) for r in timed}
    assert len(timed) == 2 * len(pairs)
    assert {r["metric"] for r in rows if r["provider"] == "roofline"} == {"bandwidth", "tflops"}


def test_bench_federated_cpu_drops_cuda_provider(tmp_path):
    proc, rows = run_bench_cpu("bench_federated.py", tmp_path / "f.csv", "--providers", "torch_stacked",
                               "lorafast-cuda")
    assert "THE CUDA BACKEND IS NOT AVAILABLE" in proc.stdout and "`lorafast-cuda` is skipped" in proc.stdout
    assert {r["provider"] for r in rows} == {"roofline", "torch_stacked"}
