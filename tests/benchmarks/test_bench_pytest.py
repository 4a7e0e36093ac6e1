"""`pytest bench/ --benchmark-only` runs the benchmark suites through pytest-benchmark (CPU smoke
sizes here) and writes its JSON, whose rows carry the same labels as the scripts' CSV rows."""
import json
import math
import subprocess
import sys

import pytest

from support.bench_runs import BENCH_SCHEMA, run_bench_cpu
from support.common import ROOT

pytest.importorskip("pytest_benchmark")

# every noise case, and one lora_linear provider in its three modes
SUBSET = "test_noise or (test_lora_linear and lorafast-torch)"


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "b.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
                           "--bench-device", "cpu", "--benchmark-json", str(out), "-k", SUBSET],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert out.is_file(), proc.stdout[-5000:]
    return json.loads(out.read_text())


def test_pytest_benchmark_json(bench_json):
    benchmarks = bench_json["benchmarks"]
    assert benchmarks
    for b in benchmarks:
        info = b["extra_info"]
        assert set(BENCH_SCHEMA) <= info.keys(), info  # the CSV row it stands for
        assert info["gpu_name"] == "cpu" and (info["metric"], info["unit"]) == ("time", "ms")
        median = b["stats"]["median"]
        assert math.isfinite(median) and median > 0, b["name"]
        assert info["y_p50"] == pytest.approx(median * 1e3, rel=1e-4)  # ms from the same rounds
        assert b["group"] == f"{info['kernel']} {info['mode']} {info['x_value']}"
    lora = {(b["extra_info"]["provider"], b["extra_info"]["mode"], b["extra_info"]["x_value"])
            for b in benchmarks if b["extra_info"]["kernel"] == "lora_linear"}
    assert lora == {("lorafast-torch", m, "in=64,out=96,r=4,N=32") for m in ("forward", "backward", "full")}


def test_pytest_benchmark_matches_csv(bench_json, tmp_path):
    """The noise suite's benchmarks are the CSV's `time` rows: same kernel, providers, modes, labels."""
    _, rows = run_bench_cpu("bench_noise.py", tmp_path / "noise.csv", timeout=120)
    key = ("kernel", "provider", "mode", "metric", "unit", "x_name", "x_value")
    csv_rows = {tuple(r[k] for k in key) for r in rows if r["provider"] != "roofline" and r["metric"] == "time"}
    json_rows = {tuple(b["extra_info"][k] for k in key) for b in bench_json["benchmarks"]
                 if b["extra_info"]["kernel"] == "noise"}
    assert json_rows == csv_rows
