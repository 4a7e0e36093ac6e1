"""Autotuning that is not repeated: results kept across processes (Triton's cache_results, or
lorafast's JSON cache where Triton has none), an M bucket that Poisson batches do not leave,
and GEMM configs pruned to what the GPU's shared memory and registers hold."""
import json
import math

import pytest
import torch

import lorafast

pytestmark = pytest.mark.skipif("triton" not in lorafast.available_backends(), reason="needs Triton")


def K():
    from lorafast.kernels import lora_linear
    return lora_linear


def test_m_bucket_is_the_nearest_power_of_two():
    mb = K().m_bucket
    assert [mb(m) for m in (1, 2, 3, 5, 6, 181, 182, 256, 362, 363)] == [1, 2, 4, 4, 8, 128, 256, 256, 256, 512]
    for m in range(1, 5000):
        b = mb(m)
        assert b & (b - 1) == 0 and abs(math.log2(m / b)) <= 0.5 + 1e-12


@pytest.mark.parametrize("batch", [256, 1024, 4096])
def test_poisson_batches_stay_in_one_bucket(batch):
    """DP-SGD's Poisson batches of expected size B (a power of two, as usual) vary by about √B:
    from B = 256 on, every size within 4.5σ of B lands in B's bucket, times any sequence
    length (the bucket edges sit at B/√2 and B√2)."""
    mb = K().m_bucket
    sigma = math.sqrt(batch)
    for T in (1, 128, 512):
        buckets = {mb(n * T) for n in range(int(batch - 4.5 * sigma), int(batch + 4.5 * sigma) + 1)}
        assert buckets == {batch * T}


def test_gemm_autotuners_cache_their_results_across_processes(monkeypatch):
    """With a Triton that has ``cache_results`` lorafast asks for it; without, it wraps the
    autotuner in its own JSON cache."""
    import triton

    from lorafast.kernels import tuning_cache
    seen = {}

    def new_autotune(configs, key, prune_configs_by=None, cache_results=False):
        seen["cache_results"] = cache_results
        return lambda fn: ("tuned", fn)

    def old_autotune(configs, key, prune_configs_by=None):
        return lambda fn: FakeTuner()
    monkeypatch.setattr(triton, "autotune", new_autotune)
    assert K()._autotune([], ["N"])(FakeKernel())[0] == "tuned" and seen["cache_results"] is True
    monkeypatch.setattr(triton, "autotune", old_autotune)
    assert isinstance(K()._autotune([], ["N"])(FakeKernel()), tuning_cache.CachedAutotuner)


class FakeConfig:
    def __init__(self, bm, warps=4, stages=3):
        self.kwargs, self.num_warps, self.num_stages = {"BM": bm}, warps, stages


class FakeKernel:
    """A kernel and its autotuner as CachedAutotuner sees them: launches are recorded."""
    arg_names = ["X", "N", "FLAG"]
    src = "def kernel(X, N, FLAG): pass"
    __name__ = "fake_kernel"

    def __init__(self):
        self.launches, self.tunings = [], 0
        self.best_config = FakeConfig(64, warps=8)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
        return launch


class FakeTuner(FakeKernel):
    def __getitem__(self, grid):
        def tune(*args, **kwargs):
            self.tunings += 1
        return tune


def test_json_cache_tunes_once_per_key_across_processes(tmp_path, monkeypatch):
    from lorafast.kernels.tuning_cache import CachedAutotuner
    monkeypatch.setenv("LORAFAST_CACHE_DIR", str(tmp_path))
    configs = [FakeConfig(32), FakeConfig(64, warps=8)]
    x = torch.empty(4, 4, dtype=torch.bfloat16)
    fn, tuner = FakeKernel(), FakeTuner()
    first = CachedAutotuner(fn, tuner, configs, ["N"], "GPU A")
    first[(1,)](x, 128, FLAG=True)
    first[(1,)](x, 128, FLAG=True)
    assert tuner.tunings == 1 and fn.launches == [{"FLAG": True, "BM": 64, "num_warps": 8, "num_stages": 3}]
    saved = json.loads(first.path.read_text())
    assert list(saved) == ["128|torch.bfloat16"]
    # a new process: the file answers, nothing is benchmarked
    fn2, tuner2 = FakeKernel(), FakeTuner()
    again = CachedAutotuner(fn2, tuner2, configs, ["N"], "GPU A")
    again[(1,)](x, 128, FLAG=True)
    assert tuner2.tunings == 0 and fn2.launches[0]["BM"] == 64
    # a new key value or dtype tunes; another GPU or config list is another file
    again[(1,)](x, 256, FLAG=True)
    again[(1,)](x.float(), 128, FLAG=True)
    assert tuner2.tunings == 2
    assert CachedAutotuner(fn, tuner, configs, ["N"], "GPU B").path != first.path
    assert CachedAutotuner(fn, tuner, configs[:1], ["N"], "GPU A").path != first.path


def test_json_cache_survives_a_corrupt_file(tmp_path, monkeypatch):
    from lorafast.kernels.tuning_cache import CachedAutotuner
    monkeypatch.setenv("LORAFAST_CACHE_DIR", str(tmp_path))
    fn, tuner = FakeKernel(), FakeTuner()
    cached = CachedAutotuner(fn, tuner, [FakeConfig(32)], ["N"], "GPU")
    cached.path.parent.mkdir(parents=True)
    cached.path.write_text("{ not json")
    cached[(1,)](torch.empty(1), 8, FLAG=False)
    assert tuner.tunings == 1 and json.loads(cached.path.read_text())


@pytest.mark.parametrize("dtype,limit", [(torch.float32, 166912), (torch.bfloat16, 166912),
                                         (torch.float32, 232448)], ids=str)
def test_gemm_configs_are_pruned_to_shared_memory_and_registers(monkeypatch, dtype, limit):
    lk = K()
    monkeypatch.setattr(lk, "smem_limit", lambda device: limit)
    x = torch.empty(8, 8, dtype=dtype, device="meta")
    configs = lk._gemm_configs()
    size = x.element_size()
    for dropout in (False, True):
        kept = lk._prune_gemm(configs, {"X": x, "DROPOUT": dropout})
        assert kept
        for c in configs:
            kw = c.kwargs
            fits = c.num_stages * (kw["BM"] + kw["BN"]) * kw["BK"] * size <= limit
            small = not dropout or kw["BM"] * kw["BN"] <= 64 * 32 * c.num_warps
            assert (c in kept) == (fits and small), (kw, c.num_warps, c.num_stages)
    assert len(lk._prune_gemm(configs, {"X": x, "DROPOUT": False})) < len(configs) or dtype != torch.float32
