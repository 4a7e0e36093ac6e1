"""Triton helpers shared by every kernel family: tile order, rounding, and what the kernels
run on (the interpreter or a GPU, its SMs and shared memory)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: GROUP_M row tiles in a row
    share each column tile of the right-hand operand while it is in L2."""
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_m, (pid % in_group) // group_m


@triton.jit
def rtne_bf16_bits(v):
    """Round fp32 to the nearest-even bf16 value, kept in fp32. The interpreter's own
    fp32→bf16 cast truncates; with this the truncation is exact."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


def interpreted() -> bool:
    """True when these kernels were defined under TRITON_INTERPRET=1 (they run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(grouped_tile, InterpretedFunction)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; block sizes follow the parallelism there is."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def smem_limit(device: torch.device) -> int:
    """Shared memory one block may use on ``device`` (bytes, opt-in maximum)."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or 232448
