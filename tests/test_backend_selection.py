"""Automatic choice between the Triton and CUDA backends from recorded timings
(lorafast._selection), nearest shape first, and the loud failures of an explicit choice."""
import json

import pytest
import torch

from lorafast import _backend, _selection

GPU = "NVIDIA Test GPU"


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "backend_table.json"
    monkeypatch.setenv("LORAFAST_BACKEND_TABLE", str(path))
    monkeypatch.setattr(_selection, "_cache", None)
    monkeypatch.setattr(_selection, "_PACKAGED", tmp_path / "no-packaged-tables")
    yield path
    _selection._cache = None


def test_no_measurements_means_no_opinion(table):
    assert _selection.fastest(GPU, "lora_linear", "bfloat16", (512, 64, 64, 8), ["triton", "cuda"]) is None


def test_nearest_recorded_shape_decides(table):
    _selection.record(GPU, "lora_linear", "bfloat16", (512, 4096, 4096, 16), {"triton": 1.0, "cuda": 0.8})
    _selection.record(GPU, "lora_linear", "bfloat16", (8192, 4096, 4096, 16), {"triton": 2.0, "cuda": 3.0})
    pick = lambda shape: _selection.fastest(GPU, "lora_linear", "bfloat16", shape, ["triton", "cuda"])  # noqa: E731
    assert pick((600, 4096, 4096, 16)) == "cuda"
    assert pick((6000, 4096, 4096, 16)) == "triton"
    # other dtypes, ops and GPUs have no entries
    assert _selection.fastest(GPU, "lora_linear", "float16", (600, 4096, 4096, 16), ["triton", "cuda"]) is None
    assert _selection.fastest("other", "lora_linear", "bfloat16", (600, 4096, 4096, 16), ["triton"]) is None
    # a candidate without a time at that shape makes the entry unusable
    assert _selection.fastest(GPU, "lora_linear", "bfloat16", (600, 4096, 4096, 16), ["triton", "torch"]) is None


def test_record_replaces_the_same_shape_and_survives_junk(table):
    table.write_text(json.dumps({"entries": [{"gpu": GPU, "op": "privatize"}, "junk"]}))
    _selection.record(GPU, "privatize", "float32", (1000,), {"triton": 1.0, "cuda": 2.0})
    _selection.record(GPU, "privatize", "float32", (1000,), {"triton": 2.0, "cuda": 1.0})
    entries = [e for e in json.loads(table.read_text())["entries"] if isinstance(e, dict) and "ms" in e]
    assert len(entries) == 1 and entries[0]["ms"] == {"triton": 2.0, "cuda": 1.0}
    assert _selection.fastest(GPU, "privatize", "float32", (900,), ["triton", "cuda"]) == "cuda"


def test_select_uses_measurements_and_never_an_unusable_cuda(table, monkeypatch):
    _selection.record(GPU, "lora_linear", "bfloat16", (512, 64, 64, 8), {"triton": 1.0, "cuda": 0.5})
    monkeypatch.setattr(_backend, "_gpu_name", lambda index: GPU)
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(_backend, "_cuda_usable", lambda: True)
    assert _backend._measured_choice("lora_linear", dev, torch.bfloat16, (512, 64, 64, 8), True) == "cuda"
    monkeypatch.setattr(_backend, "_cuda_usable", lambda: False)
    assert _backend._measured_choice("lora_linear", dev, torch.bfloat16, (512, 64, 64, 8), True) is None
    # ops the CUDA backend does not know fall back to the default
    assert _backend._measured_choice("no_such_op", dev, torch.bfloat16, (512, 64, 64, 8), True) is None


def test_explicit_cuda_without_the_toolchain_is_a_clear_error():
    if _backend.cuda_status()[0]:
        pytest.skip("the CUDA backend is usable here")
    with pytest.raises(RuntimeError, match="backend='cuda' was requested but"):
        _backend.select("lora_linear", torch.device("cpu"), torch.float32, "cuda")
