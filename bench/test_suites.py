"""The benchmark scripts' suites under pytest-benchmark (see bench/conftest.py):

    pytest bench/ --benchmark-only [--benchmark-json out.json]

Nothing here defines a case: the shapes, providers, inputs, builders, correctness checks
and timed callables are the scripts' own (bench_lora_linear, bench_noise, bench_federated,
bench_dp, bench_model), the same that write their CSVs. One test per CSV `time` row:

  test_lora_linear  provider × shape × mode (forward, backward, full)
  test_noise        provider × shape × mode (element, token)
  test_fedex_merge  provider × config (the FedEx merge, in place)
  test_dp_step      provider × config (one DP-SGD training step)
  test_model_step   provider (one LoRA training step of the Llama-style model)

Each test checks its provider as the script does before timing it. A provider that cannot
run here (its library missing, the Triton or CUDA backend unusable on this device) is
skipped with the reason, as is a baseline that fails to run or to match; a lorafast
provider that fails its check or raises fails the test. The derived CSV metrics (roofline,
bandwidth, pct_of_copy, roofline_fraction, tokens_per_s, peak_memory) are not timed here;
extra_info carries the bytes, flops or tokens they are computed from.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable, Optional

import pytest
import torch

import lorafast  # before triton: on a CPU-only machine it switches Triton to its interpreter
import bench_dp as bd
import bench_federated as bf
import bench_lora_linear as bl
import bench_model as bm
import bench_noise as bn
import common

# What the scripts silence on import (bench_dp, bench_model); pytest resets warning filters per test.
pytestmark = [pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")]


# ------------------------------------------------------------------ parametrization


def _sized(config, cpu, quick, full):
    """The script's list for this run's sizes (bench/conftest.py sets bench_sizes)."""
    return {"cpu": cpu, "quick": quick, "full": full}[config.getoption("bench_sizes")]


def _device(config) -> torch.device:
    return torch.device(config.getoption("bench_device"))


def _lora_params(config):
    cpu = _device(config).type == "cpu"
    shapes = _sized(config, bl.CPU_SHAPES, bl.QUICK_SHAPES, bl.FULL_SHAPES)
    default = list(bl.CPU_PROVIDERS if cpu else bl.GPU_PROVIDERS)
    # as the CSV: eager_chain stands in for peft where PEFT is absent (peft is then skipped, with why)
    providers = list(dict.fromkeys(default + bl.resolve_providers(None, cpu)))
    return [pytest.param(s, p, m, id=f"{p}-{m}-{s.label}") for s in shapes for p in providers for m in bl.MODES]


def _noise_params(config):
    cpu = _device(config).type == "cpu"
    shapes = _sized(config, bn.CPU_SHAPES, bn.QUICK_SHAPES, bn.FULL_SHAPES)
    providers = bn.CPU_PROVIDERS if cpu else bn.GPU_PROVIDERS
    return [pytest.param(s, p, m, id=f"{p}-{m}-{bn.label(*s)}") for s in shapes for m in bn.MODES for p in providers]


def _fedex_params(config):
    configs = _sized(config, bf.CPU_CONFIGS, bf.QUICK_CONFIGS, bf.GPU_CONFIGS)
    providers = common.default_providers(bf.ALL_PROVIDERS, bf.CUDA_PROVIDER, _device(config))
    return [pytest.param(c, p, id=f"{p}-{c.label}") for c in configs for p in providers]


def _dp_params(config):
    configs = _sized(config, bd.CPU_CONFIGS, bd.QUICK_CONFIGS, bd.GPU_CONFIGS)
    providers = common.default_providers(bd.ALL_PROVIDERS, bd.CUDA_PROVIDER, _device(config))
    return [pytest.param(c, p, id=f"{p}-{c.label}") for c in configs for p in providers]


def _model_params(config):
    providers = common.default_providers(bm.ALL_PROVIDERS, bm.CUDA_PROVIDER, _device(config))
    return [pytest.param(p, id=p) for p in providers]


PARAMS = {"test_lora_linear": ("shape, provider, mode", _lora_params),
          "test_noise": ("shape, provider, mode", _noise_params),
          "test_fedex_merge": ("cfg, provider", _fedex_params),
          "test_dp_step": ("cfg, provider", _dp_params),
          "test_model_step": ("provider", _model_params)}


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ in PARAMS:
        names, params = PARAMS[metafunc.function.__name__]
        metafunc.parametrize(names, params(metafunc.config))


# ------------------------------------------------------------------ helpers


class _Latest:
    """The most recently built inputs only, so that one case's tensors are alive at a time and
    the tests of one shape (its modes, its providers) share one build and one check."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, build: Callable[[], object], device: torch.device):
        if key != self.key:
            self.clear(device)
            self.value = build()
            self.key = key
        return self.value

    def clear(self, device: torch.device) -> None:
        if self.key is not None:
            self.key = self.value = None
            common.free(device)


LATEST = _Latest()


@pytest.fixture(scope="module", autouse=True)
def _release_latest(bench_device):
    yield
    LATEST.clear(bench_device)


@pytest.fixture(autouse=True)
def _free_after(bench_device):
    """What a test built is released before the next, as the scripts free between cases."""
    yield
    if bench_device.type == "cuda":
        common.free(bench_device)


def backend_missing(backend: Optional[str], device: torch.device) -> Optional[str]:
    """Why lorafast's ``backend`` cannot run on ``device`` (None: it can), as the scripts decide
    (lorafast.available_backends(), lorafast._backend.cuda_status())."""
    if backend == "triton" and "triton" not in lorafast.available_backends():
        return "lorafast.available_backends() has no 'triton'"
    if backend == "cuda":
        from lorafast import _backend
        ok, why = _backend.cuda_status()
        if not ok:
            return f"the CUDA backend is not available ({why})"
        if device.type != "cuda":
            return f"backend='cuda' needs CUDA tensors (this run is on {device.type})"
    return None


def skip_if_missing(backend: Optional[str], device: torch.device) -> None:
    why = backend_missing(backend, device)
    if why:
        pytest.skip(why)


def kernel_backend(provider: str) -> Optional[str]:
    """lorafast-triton -> triton, lorafast-cuda -> cuda; None for the others."""
    return {"lorafast-triton": "triton", "lorafast-cuda": "cuda"}.get(provider)


def captured(capsys) -> str:
    """What the script printed (its SKIP banners give the reason), on one line."""
    out = capsys.readouterr().out
    lines = [s.strip() for s in out.splitlines() if s.strip() and set(s.strip()) != {"="}]
    return " | ".join(lines) or "(nothing printed)"


def not_ready(provider: str, why: str):
    """A lorafast provider that fails its check or raises is a failure; a baseline is skipped."""
    if provider.startswith("lorafast"):
        pytest.fail(f"{provider}: {why}", pytrace=False)
    pytest.skip(f"{provider}: {why}")


# ------------------------------------------------------------------ lora_linear


def test_lora_linear(bench, bench_device, capsys, shape, provider, mode):
    if provider == "peft":
        ok, info = bl.peft_status()
        if not ok:
            pytest.skip(f"PEFT is not available ({info}); eager_chain stands in for it, as in the CSV")
    skip_if_missing(kernel_backend(provider), bench_device)

    def build():
        inp = bl.make_inputs(shape, bench_device)
        capsys.readouterr()
        cases = bl.ready_cases(inp, [provider])  # built and checked against float64, as the script does
        return inp, (cases[0] if cases else None), captured(capsys)

    inp, case, why = LATEST.get((bl.KERNEL, shape, provider), build, bench_device)
    if case is None:
        not_ready(provider, why)
    bench(bl.mode_fn(case, mode, inp.grad_y), kernel=bl.KERNEL, provider=provider, mode=mode,
          x_value=shape.label, grads=case.grads)
    for t in case.grads:
        t.grad = None


# ------------------------------------------------------------------ noise


def test_noise(bench, bench_device, capsys, one_cpu_thread, shape, provider, mode):
    skip_if_missing(kernel_backend(provider), bench_device)
    h = LATEST.get((bn.KERNEL, shape), lambda: bn.make_input(*shape, bench_device), bench_device)
    capsys.readouterr()
    fn = bn.checked(provider, h, mode)  # the noiseless output against float64, as the script does
    if fn is None:
        not_ready(provider, captured(capsys))
    bench(lambda: fn(bn.STD), kernel=bn.KERNEL, provider=provider, mode=mode, x_value=bn.label(*shape),
          bytes_moved=bn.bytes_moved(h))


# ------------------------------------------------------------------ FedEx merge


def test_fedex_merge(bench, bench_device, one_cpu_thread, cfg, provider):
    if provider == bf.OURS:
        ok, why = bf.triton_status()
        if not ok:
            pytest.skip(why)
    skip_if_missing(kernel_backend(provider), bench_device)

    def build():
        inp = bf.make_inputs(cfg, bench_device)
        return (inp, *bf.invariant_sides(inp))

    try:
        inp, want, mean_term = LATEST.get((bf.KERNEL, cfg), build, bench_device)
        merge = bf.merge_fn(provider)
        err = bf.check(provider, merge, inp, want, mean_term)  # the float64 FedEx invariant
        weight, comp = inp.fresh_state()  # every timed merge starts from what the previous one left
        bench(lambda: merge(weight, inp.client_A, inp.client_B, inp.p, bf.SCALING, comp), kernel=bf.KERNEL,
              provider=provider, mode=bf.MODE, x_name=bf.X_NAME, x_value=cfg.label, check_rel_err=err,
              bytes_moved=cfg.bytes_moved(), flops=cfg.flops())
    except torch.cuda.OutOfMemoryError as e:
        pytest.skip(f"out of memory: {str(e).splitlines()[0]}")
    except bf.CheckFailed as e:
        pytest.fail(f"check of {provider} on {cfg.label}: {e}", pytrace=False)
    except Exception as e:
        if provider != "naive":  # lorafast's own code
            raise
        pytest.skip(f"naive failed to run: {type(e).__name__}: {e}")


# ------------------------------------------------------------------ DP step


DP_CHECKED: dict = {}  # device -> the DP providers whose gradient check failed (run once, as the script does)


def dp_failed_checks(device: torch.device, configs: list) -> list[str]:
    if device not in DP_CHECKED:
        LATEST.clear(device)
        cpu = device.type == "cpu"  # the CPU smoke mode checks in fp32, as bench_dp.main
        check_cfg = replace(configs[0], dtype=torch.float32) if cpu else configs[0]
        DP_CHECKED[device] = bd.check_gradients(check_cfg, bd.resolve_providers(None, device), device)
    return DP_CHECKED[device]


def dp_missing(provider: str, device: torch.device) -> Optional[str]:
    if provider in ("lorafast-dp", bd.CUDA_PROVIDER):
        ok, info = bd.lorafast_dp_status()
        if not ok:
            return f"lorafast.dp is not available ({info})"
    if provider.startswith("opacus"):
        ok, info = bd.opacus_status()
        if not ok:
            return f"Opacus is not available ({info})"
    return backend_missing("cuda" if provider == bd.CUDA_PROVIDER else None, device)


def test_dp_step(bench, bench_device, pytestconfig, one_cpu_thread, cfg, provider):
    why = dp_missing(provider, bench_device)
    if why:
        pytest.skip(why)
    configs = _sized(pytestconfig, bd.CPU_CONFIGS, bd.QUICK_CONFIGS, bd.GPU_CONFIGS)
    if provider in dp_failed_checks(bench_device, configs):
        pytest.fail(f"the gradient check of {provider} failed (see bench_dp's log above)", pytrace=False)
    LATEST.clear(bench_device)
    try:
        case = bd.BUILDERS[provider](cfg, bench_device, noise=bd.NOISE_MULTIPLIER, clip=bd.MAX_GRAD_NORM, lr=bd.LR)
        case.step()  # warm-up: first-call allocations, kernel compilation
        bench(case.step, kernel=bd.KERNEL, provider=provider, mode=bd.MODE, x_name=bd.X_NAME, x_value=cfg.label,
              model=cfg.model_label)
    except torch.cuda.OutOfMemoryError as e:
        pytest.skip(f"out of memory: {str(e).splitlines()[0]}")
    except Exception as e:
        if provider.startswith("lorafast"):
            raise
        pytest.skip(f"{provider} failed to run: {type(e).__name__}: {e}")


# ------------------------------------------------------------------ model step


def model_suite(cfg, device: torch.device) -> dict:
    """Both models (identical weights) and bench_model's check of the lorafast ones, as its main does."""
    peft_model, n_params = bm.build_peft(cfg, device)
    fast_model = lorafast.from_peft(copy.deepcopy(peft_model))
    checks = {}
    for checked in ["lorafast"] + [p for p in bm.resolve_providers(None, device) if p in bm.BACKEND]:
        try:
            with lorafast.use_backend(bm.BACKEND.get(checked)):
                checks[checked] = None if bm.check_same(peft_model, fast_model, cfg, device) else \
                    "does not compute what the PEFT model does (see bench_model's log above)"
        except Exception as e:
            checks[checked] = f"the check raised {type(e).__name__}: {e}"
    common.free(device)
    return {"models": {"peft": peft_model, "lorafast": fast_model, bm.CUDA_PROVIDER: fast_model},
            "label": cfg.label(n_params), "checks": checks}


def test_model_step(bench, bench_device, one_cpu_thread, provider):
    skip_if_missing(bm.BACKEND.get(provider), bench_device)
    ok, versions = bm.library_status()
    if not ok:
        pytest.skip(f"transformers and peft are needed ({versions})")
    ok, why = bm.from_peft_status()
    if not ok:
        pytest.fail(why, pytrace=False)
    cfg = bm.CPU_CONFIG if bench_device.type == "cpu" else bm.GPU_CONFIG
    suite = LATEST.get((bm.KERNEL, cfg), lambda: model_suite(cfg, bench_device), bench_device)
    for checked in ("lorafast", provider):
        if suite["checks"].get(checked):
            pytest.fail(f"lorafast.from_peft's model ({checked}) {suite['checks'][checked]}", pytrace=False)
    models, model = suite["models"], suite["models"][provider]
    if bench_device.type == "cuda":  # only the model under test on the GPU, as the script does
        for m in models.values():
            if m is not model:
                m.to("cpu")
        common.free(bench_device)
        model.to(bench_device)
    try:
        with lorafast.use_backend(bm.BACKEND.get(provider)):
            case = bm.make_case(provider, model, cfg, bench_device)
            case.step()  # warm-up: AdamW's state, kernel compilation and autotuning
            bench(case.step, kernel=bm.KERNEL, provider=provider, mode=bm.MODE, x_name=bm.X_NAME,
                  x_value=suite["label"], tokens=cfg.tokens, model=cfg.model_label)
    except torch.cuda.OutOfMemoryError as e:
        pytest.skip(f"out of memory: {str(e).splitlines()[0]}")
    finally:
        model.zero_grad(set_to_none=True)
