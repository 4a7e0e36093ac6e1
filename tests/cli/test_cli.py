"""The lorafast command: check (its verdicts and exit status, with a deliberately wrong kernel
injected), env, bench on CPU, and plot from the bench's own CSV."""
import csv
import json
import subprocess
import sys

import pytest
import torch

from lorafast import cli
from support.common import ROOT


def test_check_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert cli.main(["check", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max rel. error" in text and "verdict" in text and "FAIL" not in text
    rows = json.loads(out.read_text())
    assert {r["backend"] for r in rows} >= {"torch"}
    assert {r["op"] for r in rows} == {"lora_linear", "lora_linear_bwd_ps", "lora_linear_multi", "dequantize",
                                       "lora_linear_q", "clip_reduce_noise", "fedex_merge", "privatize"}
    assert all(r["max_rel_err"] == 0.0 for r in rows if r["op"] == "dequantize")   # bit-exact decoding
    assert all(r["verdict"] == "ok" and r["max_rel_err"] <= r["tolerance"] for r in rows)


def test_check_fails_on_a_wrong_kernel(monkeypatch, capsys):
    """The test hook: a fedex merge that is off by 1% replaces the Triton kernel (or, without
    Triton, the reference path the torch backend runs); check must say FAIL and exit 1."""
    import lorafast
    if "triton" in lorafast.available_backends():
        from lorafast.kernels import fedex as target
    else:
        from lorafast import reference as target
    right = target.fedex_merge_

    def wrong(weight, U, V, compensation=None):
        right(weight, U * 1.01, V, compensation)

    monkeypatch.setattr(target, "fedex_merge_", wrong)
    assert cli.main(["check"]) == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.out.splitlines() if line.rstrip().endswith("FAIL")]
    assert failed and any(line.startswith("fedex_merge ") for line in failed)
    # the QLoRA op folds its FedEx correction into the weight with the same merge kernel
    assert all(line.startswith(("fedex_merge ", "lora_linear_q ")) for line in failed)
    assert "kernel checks FAILED" in captured.err


def test_env_names_every_backend_and_why():
    proc = subprocess.run([sys.executable, "-m", "lorafast", "env"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("torch ", "triton", "hybrid", "cuda", "backends:", "nvcc", "measured tables", "each op's path"):
        assert word in proc.stdout, word
    for op in ("lora_linear_fwd", "grad_sample_norms", "clip_reduce_noise", "fedex_merge_", "privatize"):
        assert f"  {op} " in proc.stdout, op
    if not torch.cuda.is_available():
        assert "cuda    unavailable:" in proc.stdout
        assert "cpu tensors: the reference" in proc.stdout


# each suite's CSV holds lorafast and at least one real peer or bound measured in the same run
BENCH_PROVIDERS = {"lora": {"lorafast-torch", "peft"}, "dp": {"lorafast-dp", "opacus"},
                   "federated": {"lorafast-triton", "naive"}, "model": {"lorafast", "peft"},
                   "multi": {"peft-sequential", "lorafast-sequential", "lorafast-multi"},
                   "noise": {"copy", "lorafast-torch"},
                   "qlora": {"peft", "lorafast-scratch", "lorafast-fused"}}


@pytest.mark.parametrize("suite", sorted(cli.SUITES))
def test_bench_suite_on_cpu_is_labelled_and_writes_csv(suite, tmp_path, capsys):
    """Every suite runs through the command (the script is loaded as a module, registered in
    sys.modules as dataclasses need), on CPU at its quick sizes, labelled as CPU timings."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU `lorafast bench` runs the GPU sizes")
    assert set(BENCH_PROVIDERS) == set(cli.SUITES)
    if suite == "qlora":
        pytest.importorskip("bitsandbytes")   # the quantised base itself; no extra installs it
    assert cli.main(["bench", suite, "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "NO CUDA GPU" in text and "CPU timings" in text and f"lorafast bench {suite}" in text
    with (tmp_path / f"{suite}_cpu.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["gpu_name"] == "cpu" for r in rows)
    assert {r["provider"] for r in rows} >= BENCH_PROVIDERS[suite]
    # a check's max error may be exactly 0 (qlora: the same dequantised weight and ops as PEFT's on the CPU)
    assert all(float(r["y_p50"]) > 0 if not r["metric"].startswith("max_abs_err") else float(r["y_p50"]) >= 0
               for r in rows if r["provider"] != "roofline")


def test_bench_noise_reports_its_roofline(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("on a GPU `lorafast bench` runs the GPU sizes")
    assert cli.main(["bench", "noise", "--out", str(tmp_path)]) == 0
    assert "% of copy" in capsys.readouterr().out


def test_bench_rejects_an_unknown_suite(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err


def test_plot_from_a_bench_csv(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    if torch.cuda.is_available():
        pytest.skip("the CPU bench CSV is made on CPU machines")
    assert cli.main(["bench", "noise", "--out", str(tmp_path)]) == 0
    assert cli.main(["plot", str(tmp_path / "noise_cpu.csv"), "--out", str(tmp_path / "charts")]) == 0
    png = tmp_path / "charts" / "noise_speedup.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().out


def test_plot_refuses_a_file_that_is_not_results(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert cli.main(["plot", str(bad)]) == 2
    assert "csv_paths" in capsys.readouterr().err
