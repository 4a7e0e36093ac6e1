"""The benchmark scripts' suites under pytest-benchmark (see bench/conftest.py):

    pytest bench/ --benchmark-only [--benchmark-json out.json]

Nothing here defines a case: each test runs one script's ``common.Suite`` (bench_lora_linear,
bench_noise, bench_federated, bench_dp, bench_model, bench_multi, bench_qlora), with its sizes, providers,
inputs, builders, correctness checks and timed callables, the same that write its CSV. One test per
CSV `time` row:

  test_lora_linear  provider × shape × mode (forward, backward, full)
  test_noise        provider × shape × mode (element, token)
  test_fedex_merge  provider × config (the FedEx merge, in place)
  test_dp_step      provider × config (one DP-SGD training step)
  test_model_step   provider (one LoRA training step of the Llama-style model)
  test_multi_round  provider × config (one federated round of k clients)
  test_qlora        provider × shape (forward+backward of one QLoRA layer over an NF4 base)

Each provider is checked as the script checks it before timing (the suite's whole-run checks,
``Suite.prepare``, once per session). A provider that cannot run here (``Suite.missing``: its
library missing, the Triton or CUDA backend unusable on this device) is skipped with the reason,
as is a baseline that fails to run or to match; a lorafast provider that fails its check or
raises fails the test, as does any provider whose failure fails the script's run
(``Suite.fails_run``). The derived CSV metrics (roofline, bandwidth, pct_of_copy,
roofline_fraction, tokens_per_s, peak_memory, speedup_vs_peft, max_abs_err_*) are not timed here;
extra_info carries the bytes, flops or tokens they are computed from (``Suite.info``).
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

import lorafast  # noqa: F401  (before triton: on a CPU-only machine it switches Triton to its interpreter)
import bench_dp as bd
import bench_federated as bf
import bench_lora_linear as bl
import bench_model as bm
import bench_multi as bmu
import bench_noise as bn
import bench_qlora as bq
import common

# What the scripts silence on import (bench_dp, bench_model); pytest resets warning filters per test.
pytestmark = [pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")]

# test -> (its parameters' names, the suite, whether the ids name the size: the model's label needs its model built)
TESTS = {"test_lora_linear": ("shape, provider, mode", bl.SUITE, True),
         "test_noise": ("shape, provider, mode", bn.SUITE, True),
         "test_fedex_merge": ("cfg, provider", bf.SUITE, True),
         "test_dp_step": ("cfg, provider", bd.SUITE, True),
         "test_model_step": ("cfg, provider", bm.SUITE, False),
         "test_multi_round": ("cfg, provider", bmu.SUITE, True),
         "test_qlora": ("shape, provider", bq.SUITE, True)}
SUITES: dict = {}  # suite class -> its instance for this session (providers resolved, prepare run once)


def suite(cls, config) -> common.Suite:
    """The suite at this run's device and sizes (bench/conftest.py sets bench_sizes)."""
    if cls not in SUITES:
        s = cls(torch.device(config.getoption("bench_device")), sizes=config.getoption("bench_sizes"))
        s.providers = s.resolve_providers()  # with the script's banners
        s.prepared = False
        SUITES[cls] = s
    return SUITES[cls]


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ not in TESTS:
        return
    names, cls, labelled = TESTS[metafunc.function.__name__]
    s = suite(cls, metafunc.config)
    # the device's default providers, and what stands in for any of them (as in the CSV: eager_chain for peft)
    providers = list(dict.fromkeys([*s.default_providers(s.cpu), *s.providers]))
    params = []
    for x in s.sizes:
        for p, modes in s.units(providers):  # in the script's order
            for mode in modes:
                ident = "-".join([p] + ([mode] if len(s.MODES) > 1 else []) + ([s.label(x)] if labelled else []))
                values = (x, p, mode) if len(s.MODES) > 1 else (x, p)
                params.append(pytest.param(*values, id=ident))
    metafunc.parametrize(names, params)


# ------------------------------------------------------------------ the one test body


class _Latest:
    """The most recently built value only (or what building it raised), so that one case's tensors
    are alive at a time and the tests of one size (its modes, its providers) share one build."""

    def __init__(self):
        self.key, self.value, self.error = None, None, None

    def get(self, key, build: Callable[[], object], device: torch.device):
        if key != self.key:
            self.clear(device)
            try:
                self.value = build()
            except Exception as e:  # kept, so that the size's other modes see it without rebuilding
                self.error = e
            self.key = key
        if self.error is not None:
            raise self.error
        return self.value

    def clear(self, device: torch.device) -> None:
        if self.key is not None:
            self.key = self.value = self.error = None
            common.free(device)


INPUTS, CASES = _Latest(), _Latest()  # a size's inputs; one provider built and checked on them


@pytest.fixture(scope="module", autouse=True)
def _release_latest(bench_device):
    yield
    CASES.clear(bench_device)
    INPUTS.clear(bench_device)


@pytest.fixture(autouse=True)
def _free_after(bench_device):
    """What a test built is released before the next, as the scripts free between cases."""
    yield
    if bench_device.type == "cuda":
        common.free(bench_device)


def run_case(bench, request, cls, x, provider: str, mode: str) -> None:
    """Check, then time, ``provider`` on ``x`` in ``mode``, as the script's run does (Suite.run_unit)."""
    s = suite(cls, request.config)
    if s.ONE_THREAD:
        request.getfixturevalue("one_cpu_thread")  # as the script's CPU smoke mode (common.open_device)
    why = s.missing(provider)
    if why:
        pytest.skip(why)
    ok, why = s.requires()
    if not ok:
        pytest.skip(why)
    if not s.prepared:
        CASES.clear(s.device)
        INPUTS.clear(s.device)
        s.prepared, s.prepare_code = True, s.prepare()
    if s.prepare_code:
        pytest.fail(f"{s.KERNEL}: the suite's checks failed (see its log above); nothing is timed", pytrace=False)
    if provider not in s.providers:
        pytest.fail(f"the check of {provider} failed (see the suite's log above)", pytrace=False)
    label = s.label(x)
    modes = next(m for p, m in s.units([provider]) if mode in m)
    strict = lambda check: provider.startswith("lorafast") or s.fails_run(provider, check)  # noqa: E731
    case = None
    try:
        with s.context(provider):
            if INPUTS.key != (s.KERNEL, label):
                CASES.clear(s.device)
            inputs = INPUTS.get((s.KERNEL, label), lambda: s.inputs(x), s.device)
            case = CASES.get((s.KERNEL, label, provider, modes), lambda: s.ready(provider, x, inputs, modes), s.device)
            extra = {**s.info(x, inputs), **({} if case.err is None else {"check_rel_err": case.err})}
            bench(s.timed(case, mode, inputs), kernel=s.KERNEL, provider=provider, mode=mode, x_name=s.X_NAME,
                  x_value=label, grads=case.grads, **extra)
    except torch.cuda.OutOfMemoryError as e:
        pytest.skip(f"out of memory: {common.first_line(e)}")
    except common.CheckFailed as e:
        if strict(True):
            pytest.fail(f"check of {provider} on {label}: {e}", pytrace=False)
        pytest.skip(f"check of {provider} on {label}: {e}")
    except Exception as e:
        if strict(False):
            raise
        pytest.skip(f"{provider} failed to run: {type(e).__name__}: {e}")
    finally:
        if case is not None:
            s.release(case)


# ------------------------------------------------------------------ the suites


def test_lora_linear(bench, request, shape, provider, mode):
    run_case(bench, request, bl.SUITE, shape, provider, mode)


def test_noise(bench, request, shape, provider, mode):
    run_case(bench, request, bn.SUITE, shape, provider, mode)


def test_fedex_merge(bench, request, cfg, provider):
    run_case(bench, request, bf.SUITE, cfg, provider, bf.MODE)


def test_dp_step(bench, request, cfg, provider):
    run_case(bench, request, bd.SUITE, cfg, provider, bd.MODE)


def test_model_step(bench, request, cfg, provider):
    run_case(bench, request, bm.SUITE, cfg, provider, bm.MODE)


def test_multi_round(bench, request, cfg, provider):
    run_case(bench, request, bmu.SUITE, cfg, provider, bmu.MODE)


def test_qlora(bench, request, shape, provider):
    run_case(bench, request, bq.SUITE, shape, provider, bq.MODE)
