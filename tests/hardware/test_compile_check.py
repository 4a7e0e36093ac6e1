"""The compile check (lorafast.compile_check): its enumeration covers every kernel and every
flag combination that public calls launch, and it compiles for real targets, reads ptxas'
report and fails on a compile error. CI runs the sweep itself (make compile-check)."""
import csv
import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import lorafast
from lorafast import _backend, _ops
from support.common import ROOT

pytestmark = pytest.mark.skipif("triton" not in lorafast.available_backends(), reason="needs Triton")
NOT_COMPARED = {"BM", "BN", "BK", "BD", "BL", "GROUP_M", "R_PAD", "num_warps", "num_stages",
                "INTERP_BF16", "ROUND_BF16", "PREC", "LOW_PREC"}   # tiles, and the interpreter's own switches


def compile_check(*argv, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, "-m", "lorafast.compile_check", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def enumerated():
    proc = compile_check("--list", "--json", "--arch", "sm_90a=full")
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def kernels_in_sources():
    """Every @triton.jit function named *_kernel in kernels/: the launchable kernels."""
    found = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for name in re.findall(r"@triton\.jit[^\n]*\ndef (_\w+_kernel)\(", path.read_text()):
            found.add(f"{path.stem}.{name}")
    return found


def test_every_kernel_and_dtype_is_enumerated(enumerated):
    kernels = {v["kernel"] for v in enumerated}
    assert kernels == kernels_in_sources()
    for kernel in kernels - {"dp._sq_norm_kernel", "dp._clip_reduce_kernel"}:   # DP buffers are fp32
        assert {v["dtype"] for v in enumerated if v["kernel"] == kernel} == {"float32", "float16", "bfloat16"}, kernel
    gemm = [v for v in enumerated if v["kernel"] == "lora_linear._lora_gemm_kernel" and v["dtype"] == "bfloat16"]
    assert len({v["config"] for v in gemm}) >= 10 * 4          # every autotune config, at each rank
    project = {v["config"] for v in enumerated if v["kernel"] == "lora_linear._lora_project_kernel"}
    assert {re.search(r"BM=(\d+)", c).group(1) for c in project} == {"16", "32", "64"}


def _recorded(calls):
    """(kernel, dtype, flags) of every interpreted launch that ``calls`` makes."""
    from triton.runtime import interpreter
    seen = set()
    original = interpreter.GridExecutor.__call__

    def record(self, *args, **kwargs):
        first = next(a for a in args if hasattr(a, "dtype"))
        flags = tuple(sorted((k, v) for k, v in kwargs.items() if k not in NOT_COMPARED))
        seen.add((f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}",
                  str(first.dtype).removeprefix("torch."), flags))
        return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = record
    try:
        calls()
    finally:
        interpreter.GridExecutor.__call__ = original
    return seen


def _quant_weights(g):
    """A (9, 16) weight in each quantised layout: 4-bit with and without double quantisation
    (blocks of 16 and, for the scales, of 4) and int8 row-wise; random codes and scales."""
    from lorafast.reference import QuantWeight
    packed = torch.randint(0, 256, (72, 1), generator=g, dtype=torch.uint8)
    code = torch.linspace(-1, 1, 16)
    return [QuantWeight(packed, torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8), code,
                        torch.rand(3, generator=g), torch.linspace(-1, 1, 256), torch.rand(1, generator=g), 4, 16, 4,
                        (9, 16)),
            QuantWeight(packed, torch.rand(9, generator=g), code, None, None, None, 4, 16, 1, (9, 16)),
            QuantWeight(torch.randint(-127, 128, (9, 16), generator=g, dtype=torch.int8), torch.rand(9, generator=g),
                        None, None, None, None, 8, 16, 1, (9, 16))]


def _public_calls():
    """The LoRA op with every combination of which tensors train, lora_R, bias and dropout (fp32;
    one call per half dtype), its hybrid plan, its per-sample backward, the DP step, the merge
    and privatize."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        combos = itertools.product((False, True), repeat=8) if dtype == torch.float32 else [(True,) * 8]
        for has_R, has_bias, dropout, gx, gA, gB, gR, gb in combos:
            if (gR and not has_R) or (gb and not has_bias):
                continue
            x = rand(2, 5, 16, dtype=dtype).requires_grad_(gx)
            A, B = rand(3, 16).requires_grad_(gA), rand(9, 3).requires_grad_(gB)
            R = rand(3, 3).requires_grad_(gR) if has_R else None
            bias = rand(9, dtype=dtype).requires_grad_(gb) if has_bias else None
            y = lorafast.lora_linear(x, rand(9, 16, dtype=dtype), A, B, bias, lora_R=R, scaling=0.5,
                                     dropout_p=0.2 if dropout else 0.0, backend="triton")
            if y.requires_grad:
                y.sum().backward()
        for has_R, has_bias, dropout in itertools.product((False, True), repeat=3):   # the hybrid plan's passes
            x = rand(2, 5, 16, dtype=dtype).requires_grad_(True)
            A, B = rand(3, 16).requires_grad_(True), rand(9, 3).requires_grad_(True)
            y = lorafast.lora_linear(x, rand(9, 16, dtype=dtype), A, B, rand(9, dtype=dtype) if has_bias else None,
                                     lora_R=rand(3, 3) if has_R else None, scaling=0.5,
                                     dropout_p=0.2 if dropout else 0.0, backend="hybrid")
            y.sum().backward()
        combos = itertools.product((False, True), repeat=8) if dtype == torch.float32 else [(True,) * 8]
        for has_R, has_bias, dropout, gx, gA, gB, gR, gb in combos:   # many clients' adapters
            if (gR and not has_R) or (gb and not has_bias):
                continue
            x = rand(3, 5, 16, dtype=dtype).requires_grad_(gx)
            A, B = rand(2, 3, 16).requires_grad_(gA), rand(2, 9, 3).requires_grad_(gB)
            R = rand(2, 3, 3).requires_grad_(gR) if has_R else None
            bias = rand(9, dtype=dtype).requires_grad_(gb) if has_bias else None
            for backend in ("triton", "hybrid") if gx else ("triton",):
                y = lorafast.lora_linear_multi(x, rand(9, 16, dtype=dtype), A, B, bias, lora_R=R,
                                               client_ids=torch.tensor([1, 0, 1]), scaling=torch.tensor([0.5, 2.0]),
                                               dropout_p=0.2 if dropout else 0.0, backend=backend)
                if y.requires_grad:
                    y.sum().backward()
        for has_R, need_x in itertools.product((False, True), repeat=2):
            x, gy = rand(4, 3, 16, dtype=dtype), rand(4, 3, 9, dtype=dtype)
            A, B, R = rand(3, 16), rand(9, 3), rand(3, 3) if has_R else None
            h = rand(12, 3)
            ps = dict(ps_A=torch.zeros(4, 3, 16), ps_B=torch.zeros(4, 9, 3),
                      ps_R=torch.zeros(4, 3, 3) if has_R else None)
            _ops.lora_linear_bwd_ps(gy, x, rand(9, 16, dtype=dtype), A, B, R, h, 0.5, 0.1, 7, 0, 4, need_x,
                                    backend="triton", ps_scale=0.5, **ps)
        for qw in _quant_weights(g):   # QLoRA: the scratch path's dequantisation, the fused GEMMs
            _ops.dequantize_(qw, torch.empty(qw.shape, dtype=dtype), backend="triton")
            for dropout in (0.0, 0.2):
                x = rand(2, 5, 16, dtype=dtype).requires_grad_(True)
                A, B = rand(3, 16).requires_grad_(True), rand(9, 3).requires_grad_(True)
                _ops.lora_linear_q(x, qw, A, B, rand(9, dtype=dtype), scaling=0.5, dropout_p=dropout,
                                   fused=True).sum().backward()
        _ops.fedex_merge_(rand(9, 16, dtype=dtype), rand(9, 4), rand(4, 16), None, "triton")
        _ops.fedex_merge_(rand(9, 16, dtype=dtype), rand(9, 4), rand(4, 16), torch.zeros(9, 16), "triton")
        for mode, std in itertools.product(("sample", "token", "element"), (0.0, 0.5)):
            _ops.privatize(rand(3, 4, 40, dtype=dtype), 1.0, std, mode, 3, 0, "triton")
        _ops.privatize(rand(2, 3, 50, dtype=dtype), 1.0, 0.5, "sample", 3, 0, "triton")   # rows of 150 > 64
    gs = rand(6, 40)
    sq = _ops.grad_sample_norms(gs, [0, 24, 40], "triton")
    for per_layer, acc, noise in itertools.product((False, True), (False, True), ("none", "philox", "given")):
        _ops.clip_reduce_noise(gs, sq, [0, 24, 40], [1.0, 0.5], per_layer, rand(40) if acc else None,
                               rand(40) if noise == "given" else None, 0.0 if noise == "none" else 1.0, 5, 0, 0.5,
                               "triton")


@pytest.mark.skipif(not _backend._INTERPRETER, reason="records interpreted launches (CPU)")
def test_enumeration_covers_every_flag_combination_public_calls_launch(enumerated):
    """A launcher that learns a new flag or mode without the enumeration learning it fails here."""
    launched = _recorded(_public_calls)
    known = {(v["kernel"], v["dtype"], tuple(sorted((k, val) for k, val in v["constexprs"].items()
                                                    if k not in NOT_COMPARED)))
             for v in enumerated}
    assert len(launched) > 40
    missing = sorted(launched - known, key=str)
    assert not missing, f"launched but never compiled by the check: {missing[:5]}"


def test_compiles_for_both_targets_and_reads_ptxas(tmp_path):
    proc = compile_check("--arch", "sm_90a=one", "--arch", "sm_80=one", "--kernel", "dp.", "--jobs", "1",
                         "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all compiled" in proc.stdout
    (path,) = tmp_path.glob("*.csv")
    rows = list(csv.DictReader(path.open(newline="")))
    assert {(r["arch"], r["kernel"]) for r in rows} == {(a, k) for a in ("sm_80", "sm_90a")
                                                         for k in ("dp._sq_norm_kernel", "dp._clip_reduce_kernel")}
    for r in rows:
        assert not r["error"] and 0 < int(r["registers"]) <= 255 and int(r["spill_stores"]) >= 0
        assert int(r["shared_bytes"]) >= 0 and r["dtype"] == "float32" and "fp32[" in r["flags"]
    assert (tmp_path / path.name.replace(".csv", ".md")).read_text().count("dp._") == 4


def test_a_compile_error_is_reported_and_fails(tmp_path):
    """A kernel that Triton rejects (a dot of mismatched tiles) becomes an error row."""
    script = tmp_path / "broken.py"
    script.write_text(
        "import torch, triton, triton.language as tl\n"
        "from lorafast import compile_check as cc\n"
        "@triton.jit\n"
        "def broken_kernel(X, BM: tl.constexpr):\n"
        "    a = tl.load(X + tl.arange(0, BM)[:, None] * BM + tl.arange(0, BM)[None, :])\n"
        "    b = tl.load(X + tl.arange(0, 2 * BM)[:, None])\n"
        "    tl.store(X + tl.arange(0, BM)[:, None], tl.dot(a, b))\n"
        "x = torch.empty(64, 64, device='meta')\n"
        "row = cc.compile_launch(cc.Launch(broken_kernel, (x,), {'BM': 16}, 'test'), 'sm_90a')\n"
        "print('ERROR=' + row.error)\n")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"ERROR=\w+", proc.stdout), proc.stdout


def test_command_line_refuses_bad_input():
    proc = compile_check("--arch", "sm_70")
    assert proc.returncode == 2 and "--arch must name one of" in proc.stderr
    proc = compile_check("--arch", "sm_90a=most")
    assert proc.returncode == 2 and "the sweep must be one of" in proc.stderr
    proc = compile_check("--list", "--require-triton", "0.0.1")
    assert proc.returncode == 2 and "Triton 0.0.1 was required" in proc.stderr
    from lorafast import cli
    with pytest.raises(SystemExit):
        cli.main(["check", "--arch", "sm_80"])               # --arch belongs to --compile
