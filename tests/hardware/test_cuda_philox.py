"""csrc/philox.cuh, the CUDA kernels' Philox4x32-10, against the reference (the same
(seed, call) mapping as the Triton kernels) and Random123's known answers. The header is
host/device, so a host build checks it here without a GPU."""
import os
import shutil
import subprocess

import pytest
import torch

from lorafast import reference
from support.common import ROOT

CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")

# Random123's kat_vectors for philox4x32_10: counter (4 words), key (2 words) → output
KAT = [
    ("00000000 00000000 00000000 00000000 00000000 00000000", "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    ("ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff", "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    ("243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0", "d16cfe09 94fdcceb 5001e420 24126ea1"),
]
NORMAL_ULPS = 4   # the host's fp32 log/sqrt/sin/cos against torch's: a few ulp of the result


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    exe = tmp_path_factory.mktemp("philox") / "philox_host"
    proc = subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-I", str(ROOT / "csrc"),
                           str(ROOT / "tests" / "support" / "native" / "philox_host.cpp"), "-o", str(exe)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


def _run(host, *args) -> list[list[str]]:
    proc = subprocess.run([str(host), *map(str, args)], capture_output=True, text=True, check=True)
    return [line.split() for line in proc.stdout.splitlines()]


def _f32(values) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32)   # %.9g round-trips fp32


def _assert_normals_close(got: torch.Tensor, want: torch.Tensor, what) -> None:
    ulp = torch.nextafter(want.abs(), torch.tensor(float("inf"))) - want.abs()
    bad = (got - want).abs() > NORMAL_ULPS * ulp.clamp_min(torch.finfo(torch.float32).tiny)
    assert not bad.any(), (what, got[bad].tolist(), want[bad].tolist())


@pytest.mark.parametrize("inputs, want", KAT)
def test_known_answers(host, inputs, want):
    assert " ".join(_run(host, "kat", *inputs.split())[0]) == want
    c0, c1, c2, c3, k0, k1 = (torch.tensor([int(v, 16)]) for v in inputs.split())
    words = reference.philox4x32_rounds(c0, c1, c2, c3, int(k0), int(k1))
    assert " ".join(f"{int(w):08x}" for w in words) == want


def test_same_calls_as_the_reference(host):
    """Per call: the four words and uniforms bit-identical, the four normals to a few ulp."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    seeds = [0, 1, 2**32 - 1, 2**32 + 5, 2**63 - 1] + torch.randint(0, 2**62, (3,), generator=gen).tolist()
    calls = [0, 1, 2**32 - 1, 2**32, 2**40 + 3, 2**63 - 2] + torch.randint(0, 2**62, (40,), generator=gen).tolist()
    c = torch.tensor(calls, dtype=torch.int64)
    for seed in seeds:
        got = _run(host, seed, *calls)
        words = torch.stack(reference.philox4x32(seed, c), dim=1)
        uniform, normal = reference.philox_uniform4(seed, c), reference.philox_normal4(seed, c)
        assert torch.equal(torch.tensor([[int(v) for v in line[:4]] for line in got]), words), seed
        assert torch.equal(torch.stack([_f32(line[4:8]) for line in got]), uniform), seed   # exact: 24-bit words
        _assert_normals_close(torch.stack([_f32(line[8:12]) for line in got]), normal, seed)


@pytest.mark.parametrize("offset, rows, cols", [(0, 1, 1), (0, 3, 4), (7, 5, 13), (2**40 + 1, 2, 6), (3, 1, 37)])
def test_element_layout_is_the_reference_grid(host, offset, rows, cols):
    """philox_call(offset, m, k, K) and number k mod 4: element (m, k) of a row-major (M, K)
    tensor gets the reference's uniform_grid / normal_grid value, ragged rows included."""
    seed = 1234567
    got = _run(host, "grid", seed, offset, rows, cols)
    per_row = -(-cols // 4)
    want_calls = [offset + m * per_row + k // 4 for m in range(rows) for k in range(cols)]
    assert [int(line[0]) for line in got] == want_calls
    assert reference.philox_calls(rows, cols) == rows * per_row
    assert torch.equal(_f32(line[1] for line in got).view(rows, cols),
                       reference.uniform_grid(seed, offset, rows, cols))
    _assert_normals_close(_f32(line[2] for line in got).view(rows, cols),
                          reference.normal_grid(seed, offset, rows, cols), (offset, rows, cols))
