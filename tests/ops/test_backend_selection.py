"""Automatic choice of a GPU backend: the cuBLAS-based default without measurements, the
recorded timings (lorafast._selection), nearest shape first, when there are some, and the
loud failures of an explicit choice."""
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
    assert _selection.fastest(GPU, "lora_linear_fwd", "bfloat16", (512, 64, 64, 8), ["triton", "cuda"]) is None


def test_nearest_recorded_shape_decides(table):
    _selection.record(GPU, "lora_linear_fwd", "bfloat16", (512, 4096, 4096, 16), {"triton": 1.0, "cuda": 0.8})
    _selection.record(GPU, "lora_linear_fwd", "bfloat16", (8192, 4096, 4096, 16), {"triton": 2.0, "cuda": 3.0})
    pick = lambda shape: _selection.fastest(GPU, "lora_linear_fwd", "bfloat16", shape, ["triton", "cuda"])  # noqa: E731
    assert pick((600, 4096, 4096, 16)) == "cuda"
    assert pick((6000, 4096, 4096, 16)) == "triton"
    # other dtypes, ops and GPUs have no entries
    assert _selection.fastest(GPU, "lora_linear_fwd", "float16", (600, 4096, 4096, 16), ["triton", "cuda"]) is None
    assert _selection.fastest("other", "lora_linear_fwd", "bfloat16", (600, 4096, 4096, 16), ["triton"]) is None
    # a candidate without a time at that shape makes the entry unusable
    assert _selection.fastest(GPU, "lora_linear_fwd", "bfloat16", (600, 4096, 4096, 16), ["triton", "torch"]) is None


def test_record_replaces_the_same_shape_and_survives_junk(table):
    table.write_text(json.dumps({"entries": [{"gpu": GPU, "op": "privatize"}, "junk"]}))
    _selection.record(GPU, "privatize", "float32", (1000,), {"triton": 1.0, "cuda": 2.0})
    _selection.record(GPU, "privatize", "float32", (1000,), {"triton": 2.0, "cuda": 1.0})
    entries = [e for e in json.loads(table.read_text())["entries"] if isinstance(e, dict) and "ms" in e]
    assert len(entries) == 1 and entries[0]["ms"] == {"triton": 2.0, "cuda": 1.0}
    assert _selection.fastest(GPU, "privatize", "float32", (900,), ["triton", "cuda"]) == "cuda"


def test_select_uses_measurements_and_never_an_unusable_cuda(table, monkeypatch):
    _selection.record(GPU, "lora_linear_fwd", "bfloat16", (512, 64, 64, 8), {"hybrid": 1.0, "triton": 1.0, "cuda": 0.5})
    monkeypatch.setattr(_backend, "_gpu_name", lambda index: GPU)
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(_backend, "_cuda_usable", lambda: True)
    assert _backend._measured_choice("lora_linear_fwd", dev, torch.bfloat16, (512, 64, 64, 8), True)[0] == "cuda"
    monkeypatch.setattr(_backend, "_cuda_usable", lambda: False)
    assert _backend._measured_choice("lora_linear_fwd", dev, torch.bfloat16, (512, 64, 64, 8), True) is None
    # ops the CUDA backend does not know fall back to the default
    assert _backend._measured_choice("no_such_op", dev, torch.bfloat16, (512, 64, 64, 8), True) is None


def test_explicit_cuda_without_the_toolchain_is_a_clear_error():
    if _backend.cuda_status()[0]:
        pytest.skip("the CUDA backend is usable here")
    with pytest.raises(RuntimeError, match="backend='cuda' was requested but"):
        _backend.select("lora_linear_fwd", torch.device("cpu"), torch.float32, "cuda")


# ------------------------------------------------------------------ the default GPU path


@pytest.fixture
def fake_gpu(table, monkeypatch):
    """A GPU as far as selection can tell: compute capability 9.0, a name, and the table fixture."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_backend, "_gpu_name", lambda index: GPU)
    monkeypatch.setattr(_backend, "_cuda_usable", lambda: True)
    monkeypatch.delenv("LORAFAST_BACKEND", raising=False)
    return torch.device("cuda", 0)


SHAPE = (8192, 4096, 4096, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_without_a_table_the_lora_linear_takes_cublas_base_gemms(fake_gpu, dtype):
    """Never slower than PEFT by construction: no measurement, no fused GEMM (fp32 included,
    which would otherwise run the FMA Triton GEMM); ops without base GEMMs take Triton."""
    name, why = _backend.choose("lora_linear_fwd", fake_gpu, dtype, None, SHAPE)
    assert name == "hybrid" and "no measured table" in why and GPU in why
    assert _backend.select("lora_linear_fwd", fake_gpu, dtype) == "hybrid"       # no shape: the same default
    for op in ("privatize", "fedex_merge_", "clip_reduce_noise"):
        assert _backend.select(op, fake_gpu, dtype, shape=(1000,)) == "triton"


def test_a_measured_table_chooses_the_fused_path_only_where_it_won(fake_gpu):
    _selection.record(GPU, "lora_linear_fwd", "bfloat16", (2048, 4096, 4096, 16), {"hybrid": 1.0, "triton": 0.9})
    _selection.record(GPU, "lora_linear_fwd", "bfloat16", (8192, 4096, 4096, 16), {"hybrid": 3.0, "triton": 3.3,
                                                                               "cuda": 3.6})
    name, why = _backend.choose("lora_linear_fwd", fake_gpu, torch.bfloat16, None, (2048, 4096, 4096, 16))
    assert name == "triton" and "measured fastest" in why and "hybrid 1 ms" in why
    assert _backend.select("lora_linear_fwd", fake_gpu, torch.bfloat16, shape=(8000, 4096, 4096, 16)) == "hybrid"
    # another dtype has no entry: the default
    assert _backend.select("lora_linear_fwd", fake_gpu, torch.float16, shape=(2048, 4096, 4096, 16)) == "hybrid"


def test_a_table_that_never_timed_the_default_cannot_replace_it(fake_gpu):
    """An entry timing only triton and cuda (as tables did before the hybrid plan) says nothing
    about beating cuBLAS base GEMMs."""
    _selection.record(GPU, "lora_linear_fwd", "bfloat16", SHAPE, {"triton": 1.0, "cuda": 2.0})
    assert _backend.select("lora_linear_fwd", fake_gpu, torch.bfloat16, shape=SHAPE) == "hybrid"
    # for ops without base GEMMs, triton vs cuda is the whole choice
    _selection.record(GPU, "privatize", "bfloat16", (1000,), {"triton": 2.0, "cuda": 1.0})
    assert _backend.select("privatize", fake_gpu, torch.bfloat16, shape=(1000,)) == "cuda"


def test_explicit_choices_and_their_reasons(fake_gpu, monkeypatch):
    assert _backend.choose("lora_linear_fwd", fake_gpu, torch.bfloat16, "triton", SHAPE) == \
        ("triton", "asked for (backend= argument)")
    with _backend.use_backend("hybrid"):
        name, why = _backend.choose("privatize", fake_gpu, torch.bfloat16, None, (10,))
        assert name == "triton" and "no base GEMM" in why
        assert _backend.select("lora_linear_fwd", fake_gpu, torch.bfloat16) == "hybrid"
    monkeypatch.setenv("LORAFAST_BACKEND", "hybrid")
    assert _backend.choose("lora_linear_fwd", fake_gpu, torch.bfloat16)[1] == "asked for (LORAFAST_BACKEND)"


def test_gpus_that_triton_cannot_serve_fall_back_to_the_reference(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    name, why = _backend.choose("lora_linear_fwd", fake_gpu, torch.bfloat16, None, SHAPE)
    assert name == "torch" and "too old" in why
    assert _backend.select("lora_linear_fwd", fake_gpu, torch.float16, shape=SHAPE) == "hybrid"
    with pytest.raises(ValueError, match="backend='hybrid' cannot run here"):
        _backend.select("lora_linear_fwd", fake_gpu, torch.bfloat16, "hybrid")


def test_env_shows_each_ops_path(fake_gpu):
    from lorafast import cli
    lines = "\n".join(cli.op_paths())
    for op in cli.OP_SHAPES:
        assert op in lines
    assert "lora_linear_fwd" in lines and "torch" in lines     # this machine has no GPU: CPU tensors


def test_the_hybrid_plan_runs_the_base_gemms_through_torch_mm(monkeypatch):
    """The hybrid plan forms x·Wᵀ and dY·W with torch.mm (cuBLAS on a GPU) and never launches
    the fused GEMM's main loop; the fully fused plan calls no torch.mm."""
    import lorafast
    if "triton" not in lorafast.available_backends() or torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter")
    from lorafast.kernels import lora_linear as K
    calls, launches = [], []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **kw: calls.append(a[0].shape) or real_mm(*a, **kw))
    real_kernel = K._lora_gemm_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(kw["BASE_IN_Y"])
                return real_kernel[grid](*args, **kw)
            return launch
    monkeypatch.setattr(K, "_lora_gemm_kernel", Spy())
    x = torch.randn(6, 20, requires_grad=True)
    W, A = torch.randn(12, 20), torch.randn(4, 20, requires_grad=True)
    B = torch.randn(12, 4, requires_grad=True)
    for backend, mm, base_in_y in (("hybrid", 2, [True, True]), ("triton", 0, [False, False])):
        calls.clear(), launches.clear()
        y = lorafast.lora_linear(x, W, A, B, scaling=0.5, backend=backend)
        y.sum().backward()
        assert len(calls) == mm and launches == base_in_y, backend
        ref = x.detach() @ W.T + 0.5 * (x.detach() @ A.detach().T) @ B.detach().T
        torch.testing.assert_close(y.detach(), ref, rtol=1e-5, atol=1e-5)
