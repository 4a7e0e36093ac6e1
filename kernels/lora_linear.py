"""Fused LoRA linear in Triton: y = x Wᵀ + b + s · drop(x) Aᵀ (Rᵀ) Bᵀ.

Two kernels serve forward and backward (variants are flags, not copies):

``_lora_project_kernel``  one pass over the rows of a (M, K) activation X:
    out = s_out · (drop(X) P) (Q)        rank-r projection, (M, r) fp32
    dW  += drop(X)ᵀ · s_l (H Qh)         fused rank-r weight gradient (atomics)
    dR  += s_out · (X P)ᵀ H              fused r×r gradient (atomics)
    db  += Σ_m X                         fused bias gradient (atomics)
``_lora_gemm_kernel``     Y = X Wop + (s · H U) ⊙ m/(1-p) + b
    a tiled GEMM whose epilogue adds the rank-r term before the single write; with
    BASE_IN_Y, X Wop is already in Y (cuBLAS) and the kernel is one pass adding the rest.

``project`` and ``gemm`` launch them; lorafast/plans/triton.py composes them into the
forward and backward (and the "hybrid" plan, whose base products come from torch.mm).
Work for gradients that are not needed is skipped by flags.

W_QUANT (a bitsandbytes-quantised base, QLoRA's fused path): W is a packed 4-bit or int8
weight (lorafast.reference.QuantWeight) that the GEMM's main loop decodes tile by tile
(kernels/quant.py), so no dequantised copy of it is ever written.

SEGMENTED (many clients' adapters over one base, ``lora_linear_multi``): the kernels walk
the rows in client order, position p being row ROWS[p] of X / Y (gathered and scattered in
place: no sorted copy) and belonging to client SEG[p] (sorted). Every rank-r operand (P, Q,
QH, U) is then a stack with one slice per client, dW and dR gain the client as their
leading index (as per sample), and SEG_SCALE multiplies each row's scales by its client's
SCALE. A block meets the few clients whose runs it overlaps and does each one's rank-r work
on that client's rows only. H and OUT stay in client order.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import grouped_tile, interpreted, rtne_bf16_bits, sm_count, smem_limit  # noqa: F401
from .philox import dropout_keep
from .quant import dequant_values, needs_int64, quant_args

# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------


@triton.jit
def _load_rr(ptr, stride_a, stride_b, r, R_PAD: tl.constexpr):
    """A zero-padded (R_PAD, R_PAD) fp32 tile of an r×r matrix."""
    ra = tl.arange(0, R_PAD)
    ok = (ra[:, None] < r) & (ra[None, :] < r)
    return tl.load(ptr + ra[:, None] * stride_a + ra[None, :] * stride_b, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _times_rr(v, ptr, stride_s, stride_a, stride_b, r, seg, g_lo, g_hi, R_PAD: tl.constexpr,
              SEGMENTED: tl.constexpr, PREC: tl.constexpr):
    """v (BM, R_PAD) times an r×r matrix: one shared matrix, or with SEGMENTED each row's
    client's slice ptr + SEG·stride_s (clients g_lo..g_hi meet this block)."""
    if SEGMENTED:
        out = tl.zeros(v.shape, dtype=tl.float32)
        for g in range(g_lo, g_hi + 1):
            q = _load_rr(ptr + tl.cast(g, tl.int64) * stride_s, stride_a, stride_b, r, R_PAD)
            out = tl.dot(tl.where((seg == g)[:, None], v, 0.0), q, out, input_precision=PREC)
        return out
    return tl.dot(v, _load_rr(ptr, stride_a, stride_b, r, R_PAD), input_precision=PREC)


@triton.jit
def _block_clients(ROWS, SEG, SCALE, rm, m_ok, first, last, SEG_SCALE: tl.constexpr):
    """(row of X for each position, its client, the first and last client of the block, each
    row's client scale) of a SEGMENTED block of positions rm in [first, last]."""
    rows = tl.load(ROWS + rm, mask=m_ok, other=0).to(tl.int64)
    seg = tl.load(SEG + rm, mask=m_ok, other=0)
    if SEG_SCALE:
        srow = tl.load(SCALE + seg).to(tl.float32)
    else:
        srow = tl.full(rm.shape, 1.0, tl.float32)
    return rows, seg, tl.load(SEG + first), tl.load(SEG + last), srow


@triton.jit
def _group_slot(ROWS, grp, T, PER_SAMPLE: tl.constexpr, SEGMENTED: tl.constexpr):
    """The dW/dR slot (int64) of row group ``grp``: the client, or the sample, which in client
    order is the sample of its first row in X (samples keep their T rows together)."""
    if PER_SAMPLE and SEGMENTED:
        return tl.load(ROWS + tl.cast(grp, tl.int64) * T) // T
    return tl.cast(grp, tl.int64)


@triton.jit
def _lora_project_kernel(
    X, stride_xm, stride_xk,
    P, stride_ps, stride_pk, stride_pr,
    OUT, stride_om, stride_or,
    Q, stride_qs, stride_qa, stride_qb,
    H, stride_hm, stride_hr,
    QH, stride_qhs, stride_qha, stride_qhb,
    DW, stride_dws, stride_dwk, stride_dwr,
    DR, stride_drs, stride_dra, stride_drb,
    DBIAS, ROWS, SEG, SCALE,
    M, K, r, out_scale, l_scale, dr_scale, seed, offset, p, inv_keep, T, K_TILES,
    R_PAD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    HAS_P: tl.constexpr, WRITE_OUT: tl.constexpr, HAS_Q: tl.constexpr,
    DROPOUT: tl.constexpr, ACC_DW: tl.constexpr, HAS_QH: tl.constexpr,
    ACC_DR: tl.constexpr, ACC_DBIAS: tl.constexpr, PER_SAMPLE: tl.constexpr, SPLIT_K: tl.constexpr,
    SEGMENTED: tl.constexpr, SEG_SCALE: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    m_ok = rm < M
    last = tl.minimum(pid * BM + BM, M) - 1
    if SEGMENTED:
        rows, seg, g_lo, g_hi, srow = _block_clients(ROWS, SEG, SCALE, rm, m_ok, pid * BM, last, SEG_SCALE)
    else:
        rows = rm.to(tl.int64)     # rows × stride passes 2³¹ on large batches
        seg, g_lo, g_hi, srow = rm, 0, 0, 1.0
    # dW and dR accumulate per group of rows: per sample (T consecutive positions), or per client
    if PER_SAMPLE:
        grp, grp_lo, grp_hi = rm // T, (pid * BM) // T, last // T
    else:
        grp, grp_lo, grp_hi = seg, g_lo, g_hi
    rr = tl.arange(0, R_PAD)
    r_ok = rr < r
    mr_ok = m_ok[:, None] & r_ok[None, :]
    if ACC_DW or ACC_DR:
        hb = tl.load(H + rm.to(tl.int64)[:, None] * stride_hm + rr[None, :] * stride_hr, mask=mr_ok, other=0.0)
    if ACC_DW:
        lb = hb
        if HAS_QH:
            lb = _times_rr(lb, QH, stride_qhs, stride_qha, stride_qhb, r, seg, g_lo, g_hi, R_PAD, SEGMENTED, PREC)
        lb = lb * l_scale
        if SEG_SCALE:
            lb = lb * srow[:, None]
    # Split K: program (i, j) takes K tiles [j·K_TILES, (j+1)·K_TILES) of row block i, so that
    # short activations still fill the GPU (OUT is then summed with atomics). Within its range
    # each program starts at a different tile: neighbouring blocks then add into different rows
    # of dW at any moment instead of queueing on the same addresses.
    kt_lo = tl.program_id(1) * K_TILES
    n_kt = tl.minimum(tl.cdiv(K, BK) - kt_lo, K_TILES)
    acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for t in range(0, n_kt):
        k0 = (kt_lo + (t + pid) % n_kt) * BK
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        xt = tl.load(X + rows[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            keep = dropout_keep(seed, offset, rows, k0, K, p, BK)   # the mask of X's row, in any order
            xt = tl.where(keep, xt * inv_keep, 0.0)
        if HAS_P:
            p_ptrs = P + rk[:, None] * stride_pk + rr[None, :] * stride_pr
            p_ok = k_ok[:, None] & r_ok[None, :]
            if SEGMENTED:
                for g in range(g_lo, g_hi + 1):
                    pt = tl.load(p_ptrs + tl.cast(g, tl.int64) * stride_ps, mask=p_ok, other=0.0).to(tl.float32)
                    acc = tl.dot(tl.where((seg == g)[:, None], xt, 0.0), pt, acc, input_precision=PREC)
            else:
                pt = tl.load(p_ptrs, mask=p_ok, other=0.0).to(tl.float32)
                acc = tl.dot(xt, pt, acc, input_precision=PREC)
        if ACC_DW:
            dw_ptrs = DW + rk[:, None] * stride_dwk + rr[None, :] * stride_dwr
            dw_ok = k_ok[:, None] & r_ok[None, :]
            if PER_SAMPLE or SEGMENTED:
                for smp in range(grp_lo, grp_hi + 1):
                    # mask both factors: another group's inf·0 would be nan here
                    own = (grp == smp)[:, None]
                    part = tl.dot(tl.trans(tl.where(own, xt, 0.0)), tl.where(own, lb, 0.0),
                                  input_precision=PREC)
                    slot = _group_slot(ROWS, smp, T, PER_SAMPLE, SEGMENTED)
                    tl.atomic_add(dw_ptrs + slot * stride_dws, part, mask=dw_ok, sem="relaxed")
            else:
                part = tl.dot(tl.trans(xt), lb, input_precision=PREC)
                tl.atomic_add(dw_ptrs, part, mask=dw_ok, sem="relaxed")
        if ACC_DBIAS:
            tl.atomic_add(DBIAS + rk, tl.sum(xt, axis=0), mask=k_ok, sem="relaxed")
    if ACC_DR:
        dr_ptrs = DR + rr[:, None] * stride_dra + rr[None, :] * stride_drb
        dr_ok = r_ok[:, None] & r_ok[None, :]
        xp = acc
        if SEG_SCALE:
            xp = acc * srow[:, None]
        if PER_SAMPLE or SEGMENTED:
            for smp in range(grp_lo, grp_hi + 1):
                own = (grp == smp)[:, None]
                part = tl.dot(tl.trans(tl.where(own, xp, 0.0)), tl.where(own, hb, 0.0),
                              input_precision=PREC) * dr_scale
                slot = _group_slot(ROWS, smp, T, PER_SAMPLE, SEGMENTED)
                tl.atomic_add(dr_ptrs + slot * stride_drs, part, mask=dr_ok, sem="relaxed")
        else:
            part = tl.dot(tl.trans(xp), hb, input_precision=PREC) * dr_scale
            tl.atomic_add(dr_ptrs, part, mask=dr_ok, sem="relaxed")
    if WRITE_OUT:
        out = acc
        if HAS_Q:
            out = _times_rr(out, Q, stride_qs, stride_qa, stride_qb, r, seg, g_lo, g_hi, R_PAD, SEGMENTED, PREC)
        if SEG_SCALE:
            out = out * srow[:, None]
        out_ptrs = OUT + rm.to(tl.int64)[:, None] * stride_om + rr[None, :] * stride_or
        if SPLIT_K:
            tl.atomic_add(out_ptrs, out * out_scale, mask=mr_ok, sem="relaxed")
        else:
            tl.store(out_ptrs, out * out_scale, mask=mr_ok)


@triton.jit
def _lora_gemm_kernel(
    X, stride_xm, stride_xk,
    W, stride_wk, stride_wn,
    H, stride_hm, stride_hr,
    U, stride_us, stride_ur, stride_un,
    BIAS, Y, stride_ym, stride_yn, ROWS, SEG, SCALE,
    QABS, QCODE, QABS2, QCODE2, QOFFSET, q_block, q_block2,
    M, N, K, r, scale, seed, offset, p, inv_keep, M_BUCKET,
    R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BASE_IN_Y: tl.constexpr, SEGMENTED: tl.constexpr, SEG_SCALE: tl.constexpr, INTERP_BF16: tl.constexpr,
    PREC: tl.constexpr, LOW_PREC: tl.constexpr, W_QUANT: tl.constexpr, W_NESTED: tl.constexpr,
    W_INT64: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    # Wrapped rows and columns keep the main loop free of row/column masks (the store masks).
    # No contiguity or divisibility hint: in the last tile the wrap breaks the run, so such a
    # promise would be false there (misaligned vector loads); the compiler derives the true
    # contiguity of i % n itself (gcd of the run and n's divisibility). Index × stride passes
    # 2³¹ on large batches, vocabularies and transposed views: every offset is int64 (set up
    # once, outside the main loop).
    rm_l = (rm % M).to(tl.int64)
    rn_l = rn % N
    if SEGMENTED:   # position rm_l is row xrow of X and Y, of client seg
        xrow, seg, g_lo, g_hi, srow = _block_clients(ROWS, SEG, SCALE, rm_l, rm_l >= 0, pid_m * BM,
                                                     tl.minimum(pid_m * BM + BM, M) - 1, SEG_SCALE)
    else:
        xrow = rm_l
    if BASE_IN_Y:
        # the rank-r update of a base product that cuBLAS already wrote into Y
        acc = tl.load(Y + xrow[:, None] * stride_ym + rn_l.to(tl.int64)[None, :] * stride_yn).to(tl.float32)
    else:
        rk = tl.arange(0, BK)
        rk_l = rk.to(tl.int64)
        x_ptrs = X + xrow[:, None] * stride_xm + rk_l[None, :] * stride_xk
        if W_QUANT:   # W is a quantised (out, in) weight: element offsets into its flat layout,
            # int32 unless the weight has 2³¹ elements (each tile's decode costs registers per element)
            if W_INT64:
                w_off = rk_l[:, None] * stride_wk + rn_l.to(tl.int64)[None, :] * stride_wn
            else:
                w_off = rk[:, None] * stride_wk + rn_l[None, :] * stride_wn
        else:
            w_ptrs = W + rk_l[:, None] * stride_wk + rn_l.to(tl.int64)[None, :] * stride_wn
        x_step = stride_xk * tl.full((), BK, tl.int64)
        w_step = stride_wk * tl.full((), BK, tl.int64)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kt in range(0, tl.cdiv(K, BK)):
            k_left = K - kt * BK
            a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
            if W_QUANT:   # the tile decoded in fp32 and rounded to x's dtype, as the scratch path rounds it
                b = dequant_values(w_off, rk[:, None] < k_left, W, QABS, QCODE, QABS2, QCODE2, QOFFSET, q_block,
                                   q_block2, W_QUANT, W_NESTED)
                b = rtne_bf16_bits(b) if INTERP_BF16 else b.to(X.dtype.element_ty)
                w_off += BK * stride_wk
            else:
                b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
                w_ptrs += w_step
            if INTERP_BF16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            x_ptrs += x_step

    # rank-r epilogue, s · H U in fp32, R_CHUNK ranks at a time: only (BM, R_CHUNK) of H and
    # (R_CHUNK, BN) of U are live at once, whatever the rank
    rc = tl.arange(0, R_CHUNK)
    if DROPOUT:
        # the mask acts on the rank-r term alone: it needs its own (BM, BN) tile
        low = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, r, R_CHUNK):
        c_ok = r0 + rc < r
        ht = tl.load(H + rm_l[:, None] * stride_hm + (r0 + rc)[None, :] * stride_hr, mask=c_ok[None, :], other=0.0)
        if SEGMENTED:   # each client's U on its own rows
            if SEG_SCALE:
                ht = ht * srow[:, None]
            if not DROPOUT:
                ht = ht * scale
            u_ptrs = U + (r0 + rc)[:, None] * stride_ur + rn_l[None, :] * stride_un
            for g in range(g_lo, g_hi + 1):
                ut = tl.load(u_ptrs + tl.cast(g, tl.int64) * stride_us, mask=c_ok[:, None], other=0.0)
                hg = tl.where((seg == g)[:, None], ht, 0.0)
                if DROPOUT:
                    low = tl.dot(hg, ut.to(tl.float32), low, input_precision=LOW_PREC)
                else:
                    acc = tl.dot(hg, ut.to(tl.float32), acc, input_precision=LOW_PREC)
        else:
            ut = tl.load(U + (r0 + rc)[:, None] * stride_ur + rn_l[None, :] * stride_un, mask=c_ok[:, None],
                         other=0.0)
            if DROPOUT:
                low = tl.dot(ht, ut.to(tl.float32), low, input_precision=LOW_PREC)
            else:
                # into the accumulator: no second (BM, BN) fp32 tile in registers
                acc = tl.dot(ht * scale, ut.to(tl.float32), acc, input_precision=LOW_PREC)
    if DROPOUT:   # the mask of Y's row
        keep = dropout_keep(seed, offset, xrow if SEGMENTED else rm, pid_n * BN, N, p, BN)
        acc += tl.where(keep, low * (scale * inv_keep), 0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn_l).to(tl.float32)[None, :]
    if INTERP_BF16:
        acc = rtne_bf16_bits(acc)
    if SEGMENTED:
        y_ptrs = Y + xrow[:, None] * stride_ym + rn[None, :] * stride_yn
    else:
        y_ptrs = Y + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


def _gemm_configs():
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
        (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3),
        (128, 128, 32, 4, 4), (64, 64, 32, 4, 4), (32, 128, 64, 2, 4),
    ]:
        cfgs.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages))
    return cfgs


def _quant_gemm_configs():
    # a decoded weight tile costs far more than its packed bytes in the pipeline (codes, scales
    # and the decoded values are staged): smaller tiles and fewer stages than _gemm_configs; none
    # spills on sm_90a, a few spill tens of bytes on sm_80 (the compile check's tables)
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps, stages in [(128, 128, 64, 8, 2), (128, 64, 32, 4, 3), (64, 128, 64, 8, 2),
                                              (64, 64, 64, 4, 2), (64, 64, 32, 4, 3)]]


# shared-memory bytes one pipeline stage spends per element of the weight tile, by W_QUANT
# (what Triton 3.9 allocates for the decode, measured by the compile check, rounded up)
_W_STAGE_BYTES = {4: 9, 8: 5}


def _fits(cfg, named_args) -> bool:
    """Whether a config can run this launch: its pipelined operand tiles fit in shared memory
    (stages × (BM + BN) × BK elements; a quantised weight's tile costs _W_STAGE_BYTES per
    element), and with dropout, whose rank-r term needs a second (BM, BN) fp32 tile, it keeps
    that tile within the register file (≤ 64 fp32 per thread)."""
    kw = cfg.kwargs
    x = named_args["X"]
    w_bytes = _W_STAGE_BYTES.get(named_args.get("W_QUANT", 0), x.element_size())
    tiles = cfg.num_stages * (kw["BM"] * x.element_size() + kw["BN"] * w_bytes) * kw["BK"]
    if tiles > smem_limit(x.device):
        return False
    if named_args.get("DROPOUT") and kw["BM"] * kw["BN"] > 64 * 32 * cfg.num_warps:
        return False
    return True


def _prune_gemm(configs, named_args, **kwargs):
    fit = [c for c in configs if _fits(c, {**named_args, **kwargs})]
    return fit or configs[-1:]


def _update_configs():
    # no main loop: a memory-bound pass over Y, so wide tiles and no pipelining
    return [triton.Config({"BM": bm, "BN": bn, "BK": 16, "GROUP_M": 8}, num_warps=w, num_stages=1)
            for bm, bn, w in [(64, 128, 4), (128, 128, 8), (64, 256, 8)]]


def _autotune(configs, key, **kw):
    """triton.autotune whose results persist across processes: Triton's own disk cache where
    the installed Triton has one (``cache_results``), else lorafast.kernels.tuning_cache."""
    import inspect
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return triton.autotune(configs=configs, key=key, cache_results=True, **kw)
    from .tuning_cache import cached_autotune
    return cached_autotune(configs=configs, key=key, **kw)


_GEMM_KEY = ["M_BUCKET", "N", "K", "R_PAD", "HAS_BIAS", "DROPOUT", "SEGMENTED", "PREC", "LOW_PREC", "W_QUANT"]
_PRUNE = {"early_config_prune": _prune_gemm}
_lora_gemm_tuned = _autotune(_gemm_configs(), _GEMM_KEY, prune_configs_by=_PRUNE)(_lora_gemm_kernel)
_lora_update_tuned = _autotune(_update_configs(), _GEMM_KEY, prune_configs_by=_PRUNE)(_lora_gemm_kernel)
_lora_gemm_q_tuned = _autotune(_quant_gemm_configs(), _GEMM_KEY, prune_configs_by=_PRUNE)(_lora_gemm_kernel)


def m_bucket(M: int) -> int:
    """The power of two nearest to M in log scale: the autotuning key for the row count. Its
    boundaries sit at 2^(k+½), so a Poisson batch around a power-of-two size (the usual
    choice) stays in one bucket instead of re-tuning whenever it crosses that size."""
    if M <= 1:
        return 1
    lo = 1 << (M.bit_length() - 1)
    return lo if M * M < 2 * lo * lo else 2 * lo


# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------


class QuantOperand(NamedTuple):
    """A quantised (out, in) weight (lorafast.reference.QuantWeight) as the GEMM's (K, N) right
    operand: Wᵀ (K = in, N = out) for the forward's x·Wᵀ, or W itself (K = out, N = in) for
    the backward's dY·W. ``stride`` is in elements of the decoded matrix."""
    qw: object
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        out_f, in_f = self.qw.shape
        return (in_f, out_f) if self.transposed else (out_f, in_f)

    def stride(self, dim: int) -> int:
        in_f = self.qw.shape[1]
        return ((1, in_f) if self.transposed else (in_f, 1))[dim]

    @property
    def T(self) -> "QuantOperand":
        return QuantOperand(self.qw, not self.transposed)


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 activations follow torch's TF32 switch (off by default: exact IEEE fp32);
    half activations already round the output far above TF32's error."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _strides2(t: Optional[torch.Tensor]):
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _strides3(t: Optional[torch.Tensor]):
    """(slice, row, col) strides of a stacked (N, a, b) tensor (per sample or per client), or
    of a shared (a, b) one."""
    if t is None:
        return (0, 0, 0)
    return tuple(t.stride()) if t.dim() == 3 else (0, t.stride(0), t.stride(1))


def _segment_args(segments, dummy):
    """(ROWS, SEG, SCALE, SEGMENTED, SEG_SCALE) of ``segments`` = (rows, seg, scale) or None:
    rows (M,) int64 the row of X at each position in client order, seg (M,) int32 the
    (sorted) client of each position, scale (clients,) fp32 or None."""
    if segments is None:
        return dummy, dummy, dummy, False, False
    rows, seg, scale = segments
    return rows, seg, (scale if scale is not None else dummy), True, scale is not None


def _project_grid(M: int, K: int, *, per_sample: int, r_pad: int, can_split: bool, device):
    """(BM, BK, splits): block height by the parallelism there is, and a split of K while
    the row blocks alone leave streaming multiprocessors idle (M ≤ ~2k rows on an H100)."""
    if interpreted():
        bm, bk, sms = 16, 32, 2     # two "SMs": tiny inputs take the split-K path too
    else:
        sms = sm_count(device)
        bm = 64 if triton.cdiv(M, 64) >= 2 * sms else (32 if triton.cdiv(M, 32) >= sms else 16)
        if per_sample:  # blocks that stay inside one sample need one dot each, not two
            bm = min(bm, max(16, per_sample & -per_sample))
        bk = 128 if r_pad <= 32 else 64
    row_blocks = triton.cdiv(M, bm)
    k_tiles = triton.cdiv(K, bk)
    splits = 1
    if can_split and row_blocks < sms:
        splits = min(k_tiles, triton.cdiv(2 * sms, row_blocks))
    return bm, bk, splits


def project(X, *, P=None, out=None, out_scale=1.0, Q=None, H=None, QH=None, l_scale=1.0,
             dW=None, dR=None, dr_scale=None, dbias=None, r, dropout_p=0.0, seed=0, offset=0,
             rows_per_sample=0, segments=None):
    """Launch one row pass over X (M, K); see the module docstring. Every matrix is a view
    given by its strides: P (K, r), out (M, r), Q/QH/dR (r, r), H (M, r), dW (K, r).
    With ``rows_per_sample`` = T > 0, dW (N, K, r) and dR (N, r, r) are per-sample: rows
    [iT, (i+1)T) of X accumulate into sample i's slice. With ``segments`` (rows, seg, scale)
    (``_segment_args``) P, Q and QH are (clients, ·, ·) stacks, dW and dR too unless per
    sample, and out_scale, l_scale and dr_scale are each times the row's client scale.
    ``out`` is written whole (zeroed here first when K is split)."""
    M, K = X.shape
    r_pad = _r_pad(r)
    prec = _dot_precision(X.dtype)
    per_sample = rows_per_sample > 0
    # dR needs each row's whole projection, so a pass that forms dR keeps K in one program
    bm, bk, splits = _project_grid(M, K, per_sample=max(int(rows_per_sample), 0), r_pad=r_pad,
                                   can_split=dR is None, device=X.device)
    k_tiles = triton.cdiv(K, bk)
    k_per = triton.cdiv(k_tiles, splits)
    splits = triton.cdiv(k_tiles, k_per) if k_tiles else 1
    if out is not None and splits > 1:
        out.zero_()
    warps, stages = (1, 1) if interpreted() else (4, 3)
    dummy = X
    ROWS, SEG, SCALE, segmented, seg_scale = _segment_args(segments, dummy)
    _lora_project_kernel[(triton.cdiv(M, bm), splits)](
        X, X.stride(0), X.stride(1),
        P if P is not None else dummy, *_strides3(P),
        out if out is not None else dummy, *_strides2(out),
        Q if Q is not None else dummy, *_strides3(Q),
        H if H is not None else dummy, *_strides2(H),
        QH if QH is not None else dummy, *_strides3(QH),
        dW if dW is not None else dummy, *_strides3(dW),
        dR if dR is not None else dummy, *_strides3(dR),
        dbias if dbias is not None else dummy, ROWS, SEG, SCALE,
        M, K, r, float(out_scale), float(l_scale), float(out_scale if dr_scale is None else dr_scale),
        int(seed), int(offset), float(dropout_p), 1.0 / (1.0 - dropout_p), max(int(rows_per_sample), 1), k_per,
        R_PAD=r_pad, BM=bm, BK=bk,
        HAS_P=P is not None, WRITE_OUT=out is not None, HAS_Q=Q is not None,
        DROPOUT=dropout_p > 0.0, ACC_DW=dW is not None, HAS_QH=QH is not None,
        ACC_DR=dR is not None, ACC_DBIAS=dbias is not None, PER_SAMPLE=per_sample, SPLIT_K=splits > 1,
        SEGMENTED=segmented, SEG_SCALE=seg_scale, PREC=prec, num_warps=warps, num_stages=stages,
    )


def gemm(X, W, *, H, U, Y, r, scale=1.0, bias=None, dropout_p=0.0, seed=0, offset=0, blas=False, segments=None):
    """Y (M, N) = X (M, K) · W (K, N) + s · H U (⊙ m/(1-p)) + b; W and U (r, N) are strided views.
    With ``blas`` the base product X·W is torch.mm's (cuBLAS on a GPU, honouring
    ``allow_tf32``), written into Y, and one pass over Y adds the rank-r term and the bias.
    With ``segments`` (``_segment_args``) U is a (clients, r, N) stack, H is in client order
    and each row's term takes its client's U (and scale). W may be a ``QuantOperand`` (a
    quantised weight, decoded tile by tile in the main loop; not with ``blas``)."""
    M, K = X.shape
    N = W.shape[1]
    quant = isinstance(W, QuantOperand)
    if quant and blas:
        raise ValueError("a quantised W is decoded inside the Triton GEMM: it cannot go through torch.mm")
    (WQ, *q_tensors, q_block, q_block2), (q_kind, q_nested) = \
        quant_args(W.qw, Y) if quant else ((W, Y, Y, Y, Y, Y, 1, 1), (0, False))
    r_pad = _r_pad(r)
    prec = _dot_precision(X.dtype)
    interp = interpreted()
    if blas:
        torch.mm(X, W, out=Y)
    # the interpreter's bf16 dot is wrong and its bf16 cast truncates: compute in fp32 there
    interp_bf16 = interp and X.dtype == torch.bfloat16
    ROWS, SEG, SCALE, segmented, seg_scale = _segment_args(segments, Y)
    args = (
        X, X.stride(0), X.stride(1),
        WQ, W.stride(0), W.stride(1),
        H, H.stride(0), H.stride(1),
        U, *_strides3(U),
        bias if bias is not None else Y, Y, Y.stride(0), Y.stride(1), ROWS, SEG, SCALE,
        *q_tensors, q_block, q_block2,
        M, N, 0 if blas else K, r, float(scale), int(seed), int(offset), float(dropout_p), 1.0 / (1.0 - dropout_p),
        m_bucket(M),
    )
    flags = dict(R_PAD=r_pad, R_CHUNK=min(r_pad, 32), HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0,
                 BASE_IN_Y=blas, SEGMENTED=segmented, SEG_SCALE=seg_scale, INTERP_BF16=interp_bf16,
                 PREC="ieee" if interp_bf16 else prec, LOW_PREC=prec, W_QUANT=q_kind, W_NESTED=q_nested,
                 W_INT64=quant and needs_int64(W.qw, 256 * max(W.qw.shape)))
    if interp:
        grid = (triton.cdiv(M, 16) * triton.cdiv(N, 32),)
        _lora_gemm_kernel[grid](*args, **flags, BM=16, BN=32, BK=32, GROUP_M=4)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)
        (_lora_update_tuned if blas else _lora_gemm_q_tuned if quant else _lora_gemm_tuned)[grid](*args, **flags)
