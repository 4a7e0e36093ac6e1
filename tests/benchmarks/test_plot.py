"""lorafast.plot: speedup charts from benchmark CSVs (matplotlib, Agg canvas)."""
import csv

import pytest

pytest.importorskip("matplotlib")

from lorafast.plot import COLUMNS, plot_results, read_rows, speedups  # noqa: E402

HEADER = ("kernel,provider,mode,metric,unit,x_name,x_value,y_p50,y_p20,y_p80,"
          "gpu_name,torch_version,triton_version,commit")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHAPES = ("in=64,out=64,r=4,N=8", "in=128,out=128,r=8,N=16")
ENV = {"gpu_name": "Test GPU", "torch_version": "2.6.0", "triton_version": "3.2.0", "commit": "abc1234"}


def row(kernel, provider, mode, x_name, x_value, p50, metric="time", unit="ms"):
    return {"kernel": kernel, "provider": provider, "mode": mode, "metric": metric, "unit": unit,
            "x_name": x_name, "x_value": x_value, "y_p50": str(p50), "y_p20": str(p50 * 0.9),
            "y_p80": str(p50 * 1.1), **ENV}


def write(path, rows, header=HEADER):
    fields = header.split(",")
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def lora_rows():
    times = {"frozen_linear": 1.0, "peft": 4.0, "lorafast-triton": 2.0}
    rows = [row("lora_linear", p, mode, "shape", x, t * (i + 1) * (2 if mode == "backward" else 1))
            for mode in ("forward", "backward") for i, x in enumerate(SHAPES) for p, t in times.items()]
    rows.append(row("lora_linear", "peft", "forward", "shape", SHAPES[0], 123.0, metric="peak_memory", unit="MB"))
    rows.append(row("lora_linear", "roofline", "forward", "shape", SHAPES[0], 0.5, metric="time"))
    return rows


def fedex_rows():
    x = "k=4,r=4,shape=64x64,master=fp32"
    return [row("fedex_merge", "naive", "merge", "config", x, 3.0),
            row("fedex_merge", "lorafast-triton", "merge", "config", x, 1.5),
            row("fedex_merge", "roofline", "merge", "config", x, 900.0, metric="bandwidth", unit="GB/s")]


def test_header_matches_bench_schema():
    assert tuple(HEADER.split(",")) == COLUMNS


def test_speedups_math(tmp_path):
    rows = read_rows([write(tmp_path / "a.csv", lora_rows()), write(tmp_path / "b.csv", fedex_rows())])
    s = speedups(rows)
    assert list(s) == ["lora_linear", "fedex_merge"]
    assert list(s["lora_linear"]) == ["forward", "backward"]
    fwd = s["lora_linear"]["forward"]
    # Baselines are every non-lorafast provider except roofline; metric other than time is ignored.
    assert set(fwd) == {("lorafast-triton", "frozen_linear"), ("lorafast-triton", "peft")}
    assert list(fwd[("lorafast-triton", "peft")]) == list(SHAPES)   # first-appearance order
    assert fwd[("lorafast-triton", "peft")][SHAPES[1]] == pytest.approx(8.0 / 4.0)
    assert fwd[("lorafast-triton", "frozen_linear")][SHAPES[0]] == pytest.approx(1.0 / 2.0)
    assert s["fedex_merge"]["merge"][("lorafast-triton", "naive")] == {
        "k=4,r=4,shape=64x64,master=fp32": pytest.approx(2.0)}


def test_plot_results_writes_one_png_per_kernel(tmp_path):
    a = write(tmp_path / "a.csv", lora_rows())
    b = write(tmp_path / "b.csv", fedex_rows())
    out = tmp_path / "charts" / "nested"
    paths = plot_results([a, str(b)], out_dir=out)
    assert paths == [out / "lora_linear_speedup.png", out / "fedex_merge_speedup.png"]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_default_out_dir_is_first_csv_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    paths = plot_results([write(tmp_path / "sub" / "f.csv", fedex_rows())])
    assert paths == [tmp_path / "sub" / "fedex_merge_speedup.png"] and paths[0].is_file()


def test_bad_header(tmp_path):
    bad = write(tmp_path / "bad.csv", fedex_rows(), header=HEADER.replace(",y_p50", ""))
    with pytest.raises(ValueError, match=r"csv_paths.*y_p50"):
        plot_results([bad])


def test_nothing_to_plot(tmp_path):
    only_fast = [r for r in fedex_rows() if r["provider"] != "naive"]
    path = write(tmp_path / "fast.csv", only_fast)
    with pytest.raises(ValueError, match="csv_paths.*nothing to plot"):
        plot_results([path], out_dir=tmp_path / "out")
    assert not list(tmp_path.rglob("*.png")) and not (tmp_path / "out").exists()


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="csv_paths.*no such file"):
        plot_results([tmp_path / "absent.csv"])
