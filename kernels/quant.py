"""Dequantisation of bitsandbytes' 4-bit (NF4 / FP4, with or without double quantisation) and
8-bit (LLM.int8 row-wise) base weights, in Triton.

``dequant_values`` decodes the elements at flat indices f of the row-major (out, in) weight
(lorafast.reference.QuantWeight gives the layout): one byte load, one codebook lookup and
one per-block scale each, the scale itself decoded from its 8-bit code with double
quantisation. Two kernels use it: ``_dequant_kernel`` writes the whole weight once (the
default QLoRA path: into one scratch buffer that every layer reuses), and the LoRA GEMM
(kernels/lora_linear.py, W_QUANT) decodes its weight tiles inside the main loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreted, rtne_bf16_bits


@triton.jit
def dequant_values(f, mask, WQ, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, q_block, q_block2,
                   KIND: tl.constexpr, NESTED: tl.constexpr):
    """fp32 values of the weight's elements at flat indices ``f`` (int32, or int64 for weights of
    2³¹ elements or more; 0 where ``mask`` is off). 4-bit blocks are powers of two, so
    ``q_block`` and ``q_block2`` are shifts (log2 of the block sizes); int8's ``q_block`` is the
    row length, a divisor."""
    if KIND == 8:   # int8 row-wise: CB · SCB / 127
        q = tl.load(WQ + f, mask=mask, other=0).to(tl.float32)
        return q * tl.load(ABSMAX + f // q_block, mask=mask, other=0.0).to(tl.float32) * (1.0 / 127.0)
    blk = f >> q_block
    byte = tl.load(WQ + (f >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((f & 1) == 0, byte >> 4, byte & 15)
    v = tl.load(CODE + nibble)
    if NESTED:
        a_q = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.int32)
        a = tl.load(CODE2 + a_q) * tl.load(ABSMAX2 + (blk >> q_block2), mask=mask, other=0.0) + tl.load(OFFSET)
    else:
        a = tl.load(ABSMAX + blk, mask=mask, other=0.0)
    return v * a


@triton.jit
def _dequant_kernel(OUT, WQ, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, n, blocksize, blocksize2,
                    KIND: tl.constexpr, NESTED: tl.constexpr, INTERP_BF16: tl.constexpr, BLOCK: tl.constexpr):
    # int64 offsets: a 14336×4096 layer has 2^25.8 elements, but a vocabulary-sized one may pass 2^31
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = f < n
    v = dequant_values(f, ok, WQ, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET, blocksize, blocksize2, KIND, NESTED)
    if INTERP_BF16:   # the interpreter's bf16 cast truncates: round to nearest even first
        v = rtne_bf16_bits(v)
    tl.store(OUT + f, v.to(OUT.dtype.element_ty), mask=ok)


def _log2(n: int, what: str) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two, got {n}")
    return n.bit_length() - 1


def quant_args(qw, dummy: torch.Tensor) -> tuple:
    """The kernels' operands of a QuantWeight: (WQ, ABSMAX, CODE, ABSMAX2, CODE2, OFFSET,
    q_block, q_block2) (``dequant_values``) and the (KIND, NESTED) flags; ``dummy`` stands in
    for what a kind does not read."""
    data = qw.data.view(torch.uint8) if qw.kind == 4 else qw.data
    nested = qw.absmax2 is not None
    tensors = (data, qw.absmax, qw.code if qw.code is not None else dummy,
               qw.absmax2 if nested else dummy, qw.code2 if nested else dummy, qw.offset if nested else dummy)
    if qw.kind == 8:
        blocks = (int(qw.blocksize), 0)
    else:
        blocks = (_log2(int(qw.blocksize), "blocksize"), _log2(int(qw.blocksize2), "blocksize2") if nested else 0)
    return tensors + blocks, (int(qw.kind), nested)


def needs_int64(qw, margin: int = 0) -> bool:
    """Whether flat indices into ``qw`` (plus ``margin`` past its end) can pass 2³¹ − 1."""
    return qw.shape[0] * qw.shape[1] + margin >= 2**31


def dequantize(qw, out: torch.Tensor) -> None:
    """Write the (out, in) weight that ``qw`` encodes into the contiguous ``out`` (its dtype)."""
    n = out.numel()
    if n == 0:
        return
    args, (kind, nested) = quant_args(qw, out)
    block = 1024
    _dequant_kernel[(triton.cdiv(n, block),)](out, *args[:6], n, *args[6:], KIND=kind, NESTED=nested,
                                              INTERP_BF16=interpreted() and out.dtype == torch.bfloat16,
                                              BLOCK=block, num_warps=4)
