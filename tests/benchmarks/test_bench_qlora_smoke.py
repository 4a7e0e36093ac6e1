"""The QLoRA layer benchmark (PEFT over a bitsandbytes NF4 Linear4bit against lorafast.QLoRALinear's
scratch and fused paths) runs end to end in CPU smoke mode: PEFT gives its bitsandbytes layer, both
lorafast paths match PEFT's output and gradients, the CSV holds every row with the speedups computed
from its own times, the chart is drawn, and the fused-vs-scratch medians recorded the way the suite
records them on a GPU are the entry QLoRALinear(fused=None) looks up."""
import math
import sys

import pytest
import torch

from support.bench_runs import run_bench_cpu
from support.common import ROOT

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

sys.path.insert(0, str(ROOT / "bench"))

PROVIDERS = ("peft", "lorafast-scratch", "lorafast-fused")
LORAFAST = PROVIDERS[1:]
SHAPES = {"in=64,out=96,r=4,N=16": (16, 64, 96, 4), "in=128,out=64,r=4,N=16": (16, 128, 64, 4)}
CHECKED = ("y", "dx", "dA", "dB")
UNITS = {"time": "ms", "peak_memory": "MB", "speedup_vs_peft": "x", **{f"max_abs_err_{k}": "abs" for k in CHECKED}}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "qlora.csv"
    proc, rows = run_bench_cpu("bench_qlora.py", out, timeout=150)
    return proc, rows, out


def test_bench_qlora_cpu_smoke(smoke):
    proc, rows, out = smoke
    assert "FAILED" not in proc.stdout and "SKIP" not in proc.stdout, proc.stdout
    assert "PEFT layer peft.tuners.lora.bnb.Linear4bit (adapters float32) over bitsandbytes" in proc.stdout
    assert "nf4, double quantisation, blocks of 64, compute float32" in proc.stdout
    for p in LORAFAST:
        for label in SHAPES:
            assert f"check {p} vs peft on {label}: y max abs err" in proc.stdout, proc.stdout
    assert proc.stdout.count("tolerance rel. 0.0001: ok") == len(LORAFAST) * len(SHAPES)

    want = {(p, m, x) for x in SHAPES for p in PROVIDERS for m in ("time", "peak_memory")}
    want |= {(p, m, x) for x in SHAPES for p in LORAFAST for m in UNITS if m not in ("time", "peak_memory")}
    got = [(r["provider"], r["metric"], r["x_value"]) for r in rows]
    assert sorted(got) == sorted(want)   # every row, once
    for r in rows:
        assert (r["kernel"], r["mode"], r["x_name"], r["gpu_name"]) == ("qlora_linear", "full", "shape", "cpu"), r
        assert r["unit"] == UNITS[r["metric"]], r
        q = [float(r[k]) for k in ("y_p50", "y_p20", "y_p80")]
        assert all(math.isfinite(v) for v in q), r
        assert q[1] <= q[0] <= q[2], r
        if r["metric"].startswith("max_abs_err"):
            assert 0 <= q[0] < 1e-4, r   # fp32, the same adapters and weight: rounding only
        else:
            assert q[0] > 0, r
    by = {(r["provider"], r["metric"], r["x_value"]): float(r["y_p50"]) for r in rows}
    for x in SHAPES:
        for p in LORAFAST:   # speedup = PEFT's p50 time over the provider's, same run
            assert by[p, "speedup_vs_peft", x] == pytest.approx(by["peft", "time", x] / by[p, "time", x], rel=1e-4)
    # measured, not a placeholder: the fused GEMM sums in another order than PEFT's
    assert any(by["lorafast-fused", "max_abs_err_y", x] > 0 for x in SHAPES)


def test_bench_qlora_draws_its_chart(smoke):
    pytest.importorskip("matplotlib")
    proc, _, out = smoke
    png = out.parent / "qlora_linear_speedup.png"
    assert f"wrote the speedup chart {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recorded_table_is_what_qlora_reads(smoke, tmp_path, monkeypatch):
    """The suite's record_backends (run on a GPU only) with this run's medians: one entry per shape,
    under the key and backend names that QLoRALinear(fused=None) looks up (lorafast.qlora)."""
    _, rows, _ = smoke
    import bench_qlora as bq
    from lorafast import _selection
    table = tmp_path / "table.json"
    monkeypatch.setenv("LORAFAST_BACKEND_TABLE", str(table))
    suite = bq.SUITE(torch.device("cpu"), bq.SUITE.parser().parse_args(["--device", "cpu", "--table", str(table)]))
    shapes = {s.label: s for s in suite.sizes}
    assert set(shapes) == set(SHAPES)
    ms = {}
    for r in rows:
        if r["metric"] == "time":
            suite.p50.setdefault((r["x_value"], r["mode"]), {})[r["provider"]] = {"time": float(r["y_p50"])}
            suite.xs[r["x_value"]] = shapes[r["x_value"]]
            ms.setdefault(r["x_value"], {})[r["provider"].removeprefix("lorafast-")] = float(r["y_p50"])
    try:
        suite.record_backends()
        for label, shape in SHAPES.items():
            found = _selection.nearest("cpu", "lora_linear_q_fwd", "float32", shape, ["fused", "scratch"], ["scratch"])
            assert found == (shape, {"fused": pytest.approx(ms[label]["fused"]),
                                     "scratch": pytest.approx(ms[label]["scratch"])}), found
    finally:
        monkeypatch.delenv("LORAFAST_BACKEND_TABLE")
        _selection._cache = None   # the next reader sees the user's table again
