"""csrc/philox.cuh, the CUDA kernels' Philox4x32-10, against the reference (the same
(seed, counter) mapping as the Triton kernels) and Random123's known answers. The header is
host/device, so a host build checks it here without a GPU."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lorafast import reference

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")

# Random123's kat_vectors for philox4x32_10: counter (4 words), key (2 words) → output
KAT = [
    ("00000000 00000000 00000000 00000000 00000000 00000000", "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    ("ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff", "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    ("243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0", "d16cfe09 94fdcceb 5001e420 24126ea1"),
]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    exe = tmp_path_factory.mktemp("philox") / "philox_host"
    proc = subprocess.run([CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-I", str(ROOT / "csrc"),
                           str(ROOT / "tests" / "native" / "philox_host.cpp"), "-o", str(exe)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


def _run(host, *args) -> list[list[str]]:
    proc = subprocess.run([str(host), *map(str, args)], capture_output=True, text=True, check=True)
    return [line.split() for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("inputs, want", KAT)
def test_known_answers(host, inputs, want):
    assert " ".join(_run(host, "kat", *inputs.split())[0]) == want
    c0, c1, c2, c3, k0, k1 = (torch.tensor([int(v, 16)]) for v in inputs.split())
    words = reference.philox4x32_rounds(c0, c1, c2, c3, int(k0), int(k1))
    assert " ".join(f"{int(w):08x}" for w in words) == want


def test_same_stream_as_the_reference(host):
    gen = torch.Generator().manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    seeds = [0, 1, 2**32 - 1, 2**32 + 5, 2**63 - 1] + torch.randint(0, 2**62, (3,), generator=gen).tolist()
    counters = [0, 1, 2**32 - 1, 2**32, 2**40 + 3, 2**63 - 2] + torch.randint(0, 2**62, (10,), generator=gen).tolist()
    for seed in seeds:
        got = _run(host, seed, *counters)
        c = torch.tensor(counters, dtype=torch.int64)
        words = reference.philox4x32(seed, c)
        uniform = reference.philox_uniform(seed, c)
        normal = reference.philox_normal(seed, c)
        for i, line in enumerate(got):
            assert [int(v) for v in line[:4]] == [int(w[i]) for w in words], (seed, counters[i])
            f32 = torch.tensor(float(line[4]), dtype=torch.float32)      # %.9g round-trips fp32
            assert f32.item() == uniform[i].item(), (seed, counters[i])   # exact: 24-bit words
            assert abs(float(line[5]) - normal[i].item()) <= 4e-6 * (1 + abs(normal[i].item())), (seed, counters[i])
