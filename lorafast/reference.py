"""Pure-PyTorch specification of every lorafast op.

Each function here is the definition the kernels are tested against. They
compute in float32 (float64 when given float64 inputs) and round once at the
end, so calling them on float64 copies of the inputs gives the ground truth.

Randomness is counter-based. ``philox4x32`` is Random123's Philox4x32-10 with
key ``(lo32(seed), hi32(seed))`` and counter ``(lo32(c), hi32(c), 0, 0)`` for a call
counter c. Every call yields four 32-bit words, and every word is used: element
``(m, k)`` of a row-major (M, K) tensor draws word ``k mod 4`` of call
``offset + m·⌈K/4⌉ + ⌊k/4⌋`` (a 1-D tensor is one row), so ``offset`` counts calls and a
tensor of M rows uses ``M·⌈K/4⌉`` of them. A word gives the uniform ``(x >> 8)·2⁻²⁴``
in [0, 1); the words (x0, x1) and (x2, x3) of a call give two normals each by
Box–Muller (cos and sin). The Triton kernels (kernels/philox.py) and the CUDA kernels
(csrc/philox.cuh) draw exactly the same words.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._layout import privatize_rows

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of a*b for a constant a < 2**32 and int64 b < 2**32.

    Splits b into 16-bit halves so that no partial product leaves int64:
    a*b = t*2**16 + u with t = a*hi16(b), u = a*lo16(b), both < 2**48.
    """
    t = a * (b >> 16)
    u = a * (b & 0xFFFF)
    hi = (t + (u >> 16)) >> 16
    lo = (((t & 0xFFFF) << 16) + u) & _M32
    return hi, lo


def philox4x32_rounds(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int,
                      rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random123's Philox4x32 block function on int64 tensors holding 32-bit words."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(_ROUND_A, c0)
        hi1, lo1 = _mulhilo32(_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox4x32(seed: int, counters: Tensor, rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 with key (lo32(seed), hi32(seed)) and counters (lo32(c), hi32(c), 0, 0)."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    c = counters.to(torch.int64)
    zero = torch.zeros_like(c)
    return philox4x32_rounds(c & _M32, (c >> 32) & _M32, zero, zero, seed & _M32, (seed >> 32) & _M32, rounds)


def philox_uniform4(seed: int, calls: Tensor) -> Tensor:
    """(..., 4) float32 uniforms in [0, 1) per call counter: (x_i >> 8)·2⁻²⁴ of its four words."""
    words = torch.stack(philox4x32(seed, calls), dim=-1)
    return (words >> 8).to(torch.float32) * (1.0 / 16777216.0)


def philox_normal4(seed: int, calls: Tensor) -> Tensor:
    """(..., 4) float32 standard normals per call counter, by Box–Muller on both word pairs:
    for (a, b) = (x0, x1) and (x2, x3), u1 = (a + 1)·2⁻³² ∈ (0, 1], u2 = (b >> 8)·2⁻²⁴,
    ρ = √(−2 ln u1), θ = 2π u2, the normals ρ cos θ and ρ sin θ, in the order
    (cos₀₁, sin₀₁, cos₂₃, sin₂₃). 32 bits in u1 put the largest |z| at √(64 ln 2) ≈ 6.66."""
    x0, x1, x2, x3 = philox4x32(seed, calls)
    out = []
    for a, b in ((x0, x1), (x2, x3)):
        u1 = (a.to(torch.float32) + 1.0) * 2.0**-32
        theta = 6.283185307179586 * ((b >> 8).to(torch.float32) * 2.0**-24)
        rho = torch.sqrt(-2.0 * torch.log(u1))
        out += [rho * torch.cos(theta), rho * torch.sin(theta)]
    return torch.stack(out, dim=-1)


def _grid(draw4, seed: int, offset: int, rows: int, cols: int, device) -> Tensor:
    """(rows, cols): element (m, k) takes number k mod 4 of call offset + m·⌈cols/4⌉ + ⌊k/4⌋."""
    per_row = -(-cols // 4)
    calls = torch.arange(rows * per_row, device=device, dtype=torch.int64).view(rows, per_row) + offset
    return draw4(seed, calls).reshape(rows, per_row * 4)[:, :cols]


def philox_calls(rows: int, cols: int) -> int:
    """Philox calls that a (rows, cols) tensor uses: advance ``offset`` by this much between draws."""
    return rows * -(-cols // 4)


def uniform_grid(seed: int, offset: int, rows: int, cols: int, device=None) -> Tensor:
    """(rows, cols) float32 uniforms of a row-major tensor (see the module docstring)."""
    return _grid(philox_uniform4, seed, offset, rows, cols, device)


def normal_grid(seed: int, offset: int, rows: int, cols: int, device=None) -> Tensor:
    """(rows, cols) float32 standard normals of a row-major tensor (a vector: rows = 1)."""
    return _grid(philox_normal4, seed, offset, rows, cols, device)


def dropout_keep(seed: int, offset: int, rows: int, cols: int, p: float, device=None) -> Tensor:
    """Keep mask (rows, cols) of inverted dropout: element kept iff its uniform >= p."""
    return uniform_grid(seed, offset, rows, cols, device) >= p


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dropped(x2: Tensor, p: float, seed: int, offset: int) -> Tensor:
    """drop(x) = x ⊙ m / (1 - p), in x2's dtype."""
    if p == 0.0:
        return x2
    keep = dropout_keep(seed, offset, x2.shape[0], x2.shape[1], p, x2.device)
    return torch.where(keep, x2 / (1.0 - p), torch.zeros((), dtype=x2.dtype, device=x2.device))


def lora_linear_forward(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                        bias: Optional[Tensor] = None, lora_R: Optional[Tensor] = None, *,
                        scaling: float = 1.0, dropout_p: float = 0.0, seed: int = 0,
                        offset: int = 0) -> tuple[Tensor, Tensor]:
    """y = x Wᵀ + b + s · drop(x) Aᵀ (Rᵀ) Bᵀ, and h = drop(x) Aᵀ.

    Shapes: x (..., in), weight (out, in), lora_A (r, in), lora_B (out, r),
    lora_R (r, r), bias (out,). Returns y (..., out) in x's dtype and
    h (M, r) in the accumulation dtype, M = prod(x.shape[:-1]). h is what
    the backward needs to form dB and dR without re-reading x.
    """
    acc = _acc_dtype(x)
    x2 = x.reshape(-1, x.shape[-1]).to(acc)
    h = _dropped(x2, dropout_p, seed, offset) @ lora_A.to(acc).T
    v = h @ lora_R.to(acc).T if lora_R is not None else h
    y = x2 @ weight.to(acc).T + scaling * (v @ lora_B.to(acc).T)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0]), h


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                bias: Optional[Tensor] = None, *, scaling: float = 1.0,
                lora_R: Optional[Tensor] = None, dropout_p: float = 0.0,
                seed: int = 0, offset: int = 0) -> Tensor:
    """The LoRA linear output alone; see ``lora_linear_forward``."""
    return lora_linear_forward(x, weight, lora_A, lora_B, bias, lora_R, scaling=scaling,
                               dropout_p=dropout_p, seed=seed, offset=offset)[0]


def lora_linear_backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor,
                         lora_B: Tensor, lora_R: Optional[Tensor], h: Tensor, *,
                         scaling: float, dropout_p: float, seed: int, offset: int,
                         needs: tuple[bool, bool, bool, bool, bool],
                         bias_dtype: Optional[torch.dtype] = None):
    """Gradients (dx, dA, dB, dR, dbias); entries not in ``needs`` are None.

    With G = dY (M×out), d = drop(x), v = h Rᵀ and g = G B (M×r):
      dB = s Gᵀ v          dR = s gᵀ h          dA = s (g R)ᵀ d
      dx = G W + (s (g R) A) ⊙ m / (1 - p)      dbias = Σ_m G
    (drop R, i.e. R = I, for the plain LoRA variant).
    """
    need_x, need_A, need_B, need_R, need_bias = needs
    need_R = need_R and lora_R is not None
    acc = _acc_dtype(x)
    in_f = x.shape[-1]
    G = grad_y.reshape(-1, grad_y.shape[-1]).to(acc)
    A, B = lora_A.to(acc), lora_B.to(acc)
    R = lora_R.to(acc) if lora_R is not None else None
    h = h.to(acc)
    g = G @ B
    gR = g @ R if R is not None else g
    dx = dA = dB = dR = dbias = None
    if need_B:
        v = h @ R.T if R is not None else h
        dB = (scaling * (G.T @ v)).to(lora_B.dtype)
    if need_R:
        dR = (scaling * (g.T @ h)).to(lora_R.dtype)
    if need_A:
        d = _dropped(x.reshape(-1, in_f).to(acc), dropout_p, seed, offset)
        dA = (scaling * (gR.T @ d)).to(lora_A.dtype)
    if need_x:
        low = _dropped(scaling * (gR @ A), dropout_p, seed, offset)
        dx = (G @ weight.to(acc) + low).to(x.dtype).reshape(x.shape)
    if need_bias:
        dbias = G.sum(0).to(bias_dtype or grad_y.dtype)
    return dx, dA, dB, dR, dbias


# ------------------------------------------------------------------ many clients over one base


def _client_rows(row_clients: Tensor, clients: int):
    """(client, its rows) for each client with rows, in client order."""
    for c in range(clients):
        idx = (row_clients == c).nonzero().flatten()
        if idx.numel():
            yield c, idx


def lora_linear_multi_forward(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                              bias: Optional[Tensor] = None, lora_R: Optional[Tensor] = None, *,
                              row_clients: Tensor, scaling: Tensor, dropout_p: float = 0.0, seed: int = 0,
                              offset: int = 0) -> tuple[Tensor, Tensor]:
    """k clients' adapters over one base: row m of x, of client c = row_clients[m], gets
    ``lora_linear_forward`` with client c's adapter,

        y[m] = x[m] Wᵀ + b + s_c · drop(x)[m] A_cᵀ (R_cᵀ) B_cᵀ,     h[m] = drop(x)[m] A_cᵀ,

    where lora_A (k, r, in), lora_B (k, out, r), lora_R (k, r, r), scaling (k,) and the dropout
    mask is that of the whole batch (row m's, whatever its client). Returns y (..., out) in x's
    dtype and h (M, r) in the accumulation dtype, rows in x's order."""
    acc = _acc_dtype(x)
    x2 = x.reshape(-1, x.shape[-1]).to(acc)
    d = _dropped(x2, dropout_p, seed, offset)
    y = x2 @ weight.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    h = torch.zeros((x2.shape[0], lora_A.shape[1]), dtype=acc, device=x.device)
    for c, idx in _client_rows(row_clients, lora_A.shape[0]):
        hc = d[idx] @ lora_A[c].to(acc).T
        v = hc @ lora_R[c].to(acc).T if lora_R is not None else hc
        h[idx] = hc
        y[idx] += scaling[c].to(acc) * (v @ lora_B[c].to(acc).T)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0]), h


def lora_linear_multi_backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                               lora_R: Optional[Tensor], h: Tensor, *, row_clients: Tensor, scaling: Tensor,
                               dropout_p: float, seed: int, offset: int,
                               needs: tuple[bool, bool, bool, bool, bool],
                               bias_dtype: Optional[torch.dtype] = None):
    """(dx, dA (k, r, in), dB (k, out, r), dR (k, r, r), dbias) of ``lora_linear_multi_forward``
    (None where not in ``needs``): client c's gradients are ``lora_linear_backward``'s over its
    rows alone, dx and dbias those of the whole batch; a client without rows gets zeros."""
    need_x, need_A, need_B, need_R, need_bias = needs
    need_R = need_R and lora_R is not None
    acc = _acc_dtype(x)
    in_f = x.shape[-1]
    G = grad_y.reshape(-1, grad_y.shape[-1]).to(acc)
    h = h.to(acc)
    d = _dropped(x.reshape(-1, in_f).to(acc), dropout_p, seed, offset) if need_A else None
    low = torch.zeros((G.shape[0], in_f), dtype=acc, device=x.device) if need_x else None
    dA = torch.zeros(lora_A.shape, dtype=acc, device=x.device) if need_A else None
    dB = torch.zeros(lora_B.shape, dtype=acc, device=x.device) if need_B else None
    dR = torch.zeros(lora_R.shape, dtype=acc, device=x.device) if need_R else None
    for c, idx in _client_rows(row_clients, lora_A.shape[0]):
        s = scaling[c].to(acc)
        Gc, hc = G[idx], h[idx]
        R = lora_R[c].to(acc) if lora_R is not None else None
        g = Gc @ lora_B[c].to(acc)
        gR = g @ R if R is not None else g
        if need_B:
            dB[c] = s * (Gc.T @ (hc @ R.T if R is not None else hc))
        if need_R:
            dR[c] = s * (g.T @ hc)
        if need_A:
            dA[c] = s * (gR.T @ d[idx])
        if need_x:
            low[idx] = s * (gR @ lora_A[c].to(acc))
    dx = dbias = None
    if need_x:
        dx = (G @ weight.to(acc) + _dropped(low, dropout_p, seed, offset)).to(x.dtype).reshape(x.shape)
    if need_bias:
        dbias = G.sum(0).to(bias_dtype or grad_y.dtype)
    cast = lambda g, like: g.to(like.dtype) if g is not None else None  # noqa: E731
    return dx, cast(dA, lora_A), cast(dB, lora_B), cast(dR, lora_R) if lora_R is not None else None, dbias


def lora_linear_multi_per_sample_grads(grad_y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor,
                                       lora_R: Optional[Tensor], h: Tensor, *, batch: int, row_clients: Tensor,
                                       scaling: Tensor, dropout_p: float, seed: int, offset: int,
                                       needs: tuple[bool, bool, bool]) -> tuple[Optional[Tensor], ...]:
    """Each sample's gradient of its own client's adapter: (dA (N, r, in), dB (N, out, r),
    dR (N, r, r)), sample i's that of ``lora_linear_per_sample_grads`` with client
    c = row_clients[i·T]'s adapter (a sample's T rows share a client); None where not in ``needs``."""
    acc = _acc_dtype(x)
    in_f, out_f = x.shape[-1], grad_y.shape[-1]
    T = x.numel() // in_f // max(batch, 1)
    d = _dropped(x.reshape(-1, in_f).to(acc), dropout_p, seed, offset).reshape(batch, T, in_f)
    G = grad_y.reshape(batch, T, out_f).to(acc)
    H = h.to(acc).reshape(batch, T, -1)
    out = [torch.zeros((batch, *t.shape[1:]), dtype=acc, device=x.device) if need and t is not None else None
           for t, need in zip((lora_A, lora_B, lora_R), needs)]
    sample_clients = row_clients.reshape(batch, T)[:, 0] if batch else row_clients[:0]
    for c, idx in _client_rows(sample_clients, lora_A.shape[0]):
        R = lora_R[c] if lora_R is not None else None
        grads = lora_linear_per_sample_grads(G[idx], d[idx], lora_A[c], lora_B[c], R, H[idx], batch=idx.numel(),
                                             scaling=scaling[c].to(acc), dropout_p=0.0, seed=0, offset=0,
                                             needs=needs)
        for buf, g in zip(out, grads):
            if buf is not None and g is not None:
                buf[idx] = g
    return tuple(out)


# ------------------------------------------------------------------ DP-SGD


def lora_linear_per_sample_grads(grad_y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor,
                                 lora_R: Optional[Tensor], h: Tensor, *, batch: int, scaling: float,
                                 dropout_p: float, seed: int, offset: int,
                                 needs: tuple[bool, bool, bool]) -> tuple[Optional[Tensor], ...]:
    """Per-sample adapter gradients (dA (N, r, in), dB (N, out, r), dR (N, r, r)); None where
    not in ``needs`` (for A, B, R). Rows of x (..., in) are ``batch`` samples of T = M / batch
    consecutive rows each. For sample i, with Gᵢ (T×out), dᵢ = drop(xᵢ), hᵢ = dᵢAᵀ, gᵢ = GᵢB:
        dBᵢ = s Gᵢᵀ (hᵢ Rᵀ)     dRᵢ = s gᵢᵀ hᵢ     dAᵢ = s (gᵢ R)ᵀ dᵢ
    Summing over i gives ``lora_linear_backward``'s dA, dB, dR.
    """
    need_A, need_B, need_R = needs
    acc = _acc_dtype(x)
    in_f, out_f, r = x.shape[-1], grad_y.shape[-1], lora_A.shape[0]
    G = grad_y.reshape(batch, -1, out_f).to(acc)
    H = h.to(acc).reshape(batch, -1, r)
    R = lora_R.to(acc) if lora_R is not None else None
    g = G @ lora_B.to(acc)
    dA = dB = dR = None
    if need_B:
        v = H @ R.T if R is not None else H
        dB = scaling * G.transpose(1, 2) @ v
    if need_R and R is not None:
        dR = scaling * g.transpose(1, 2) @ H
    if need_A:
        d = _dropped(x.reshape(-1, in_f).to(acc), dropout_p, seed, offset).reshape(batch, -1, in_f)
        gR = g @ R if R is not None else g
        dA = scaling * gR.transpose(1, 2) @ d
    return dA, dB, dR


def grad_sample_sq_norms(grad_sample: Tensor, segments: list[int]) -> Tensor:
    """Squared L2 norms (N, P) of each sample's gradient of each parameter: grad_sample (N, D)
    holds all parameters side by side, parameter p in columns [segments[p], segments[p+1])."""
    g = grad_sample.to(_acc_dtype(grad_sample))
    cols = [g[:, a:b].square().sum(1) for a, b in zip(segments[:-1], segments[1:])]
    return torch.stack(cols, 1) if cols else g.new_zeros((g.shape[0], 0))


def clip_coefficients(sq_norms: Tensor, max_norms: list[float], per_layer: bool) -> Tensor:
    """Clip factors min(1, C/‖gᵢ‖) from squared norms (N, P): (N, 1) for flat clipping (the
    norm over all parameters, C = max_norms[0]) or (N, P) per parameter. A sample whose
    gradient is not finite (its total squared norm is inf or nan) gets factor 0."""
    total = sq_norms.sum(1, keepdim=True)
    if per_layer:
        bound = torch.tensor(max_norms, dtype=sq_norms.dtype, device=sq_norms.device)
        coef = (bound / sq_norms.sqrt()).clamp(max=1.0)
    else:
        coef = (max_norms[0] / total.sqrt()).clamp(max=1.0)
    return torch.where(torch.isfinite(total), coef, torch.zeros((), dtype=coef.dtype, device=coef.device))


def clip_reduce_noise(grad_sample: Tensor, sq_norms: Tensor, segments: list[int], max_norms: list[float], *,
                      per_layer: bool, acc: Optional[Tensor] = None, noise: Optional[Tensor] = None,
                      noise_std: float = 0.0, seed: int = 0, offset: int = 0,
                      out_scale: float = 1.0) -> Tensor:
    """The DP-SGD gradient (D,) from per-sample gradients (N, D):

        out = (acc + Σᵢ cᵢ gᵢ + std · ξ) · out_scale

    with clip factors cᵢ from ``clip_coefficients`` (a factor-0 sample contributes exactly 0,
    even when its gradient holds inf or nan), ``acc`` an optional running sum (D,), and ξ
    the given ``noise`` (D,) or, when None, the Philox normals of a (1, D) tensor from
    (seed, offset), which uses ``philox_calls(1, D)`` calls. No noise when ``noise_std`` is 0.
    """
    dt = _acc_dtype(grad_sample)
    g = grad_sample.to(dt)
    coef = clip_coefficients(sq_norms.to(dt), max_norms, per_layer)
    if per_layer:
        widths = torch.tensor([b - a for a, b in zip(segments[:-1], segments[1:])], device=g.device)
        coef = coef.repeat_interleave(widths, dim=1)
    out = torch.where(coef > 0, g * coef, torch.zeros((), device=g.device)).sum(0)
    if acc is not None:
        out = out + acc.to(dt)
    if noise_std != 0.0:
        if noise is None:
            noise = normal_grid(seed, offset, 1, g.shape[1], g.device)[0]
        out = out + noise_std * noise.to(dt)
    return out * out_scale


# ------------------------------------------------------------------ federated aggregation


def stack_padded(client_A: list[Tensor], client_B: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack clients' factors zero-padded to the largest rank: A (k, r, in), B (k, out, r).
    Padding adds zero rows to A and zero columns to B, so every BᵢAᵢ is unchanged."""
    r = max(a.shape[0] for a in client_A)
    dt = torch.promote_types(_acc_dtype(client_A[0]), _acc_dtype(client_B[0]))
    A = torch.stack([torch.nn.functional.pad(a.to(dt), (0, 0, 0, r - a.shape[0])) for a in client_A])
    B = torch.stack([torch.nn.functional.pad(b.to(dt), (0, r - b.shape[1])) for b in client_B])
    return A, B


def fedex_residual(client_A: list[Tensor], client_B: list[Tensor], client_weights=None,
                   scaling: float = 1.0) -> Tensor:
    """s·(Σ pᵢBᵢAᵢ − B̄Ā) (out, in) the plain way: k dense products, then subtract."""
    k = len(client_A)
    w = torch.ones(k, dtype=torch.float64) if client_weights is None else torch.as_tensor(client_weights,
                                                                                            dtype=torch.float64)
    p = (w / w.sum()).tolist()
    A, B = stack_padded(client_A, client_B)
    M = sum(pi * (B[i] @ A[i]) for i, pi in enumerate(p))
    A_bar = sum(pi * A[i] for i, pi in enumerate(p))
    B_bar = sum(pi * B[i] for i, pi in enumerate(p))
    return scaling * (M - B_bar @ A_bar)


def fedex_merge_(weight: Tensor, U: Tensor, V: Tensor, compensation: Optional[Tensor] = None) -> None:
    """W += U V in place, accumulated in fp32 (fp64 for an fp64 weight).

    With ``compensation`` C (fp32, W's shape), W + C is the true weight and neither loses
    what W's dtype cannot hold:  t = C + UV,  W' = round(W + t),  C' = (W − W') + t.
    (W − W' is exact: both are close values of W's dtype.)"""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    delta = U.to(acc) @ V.to(acc)
    w = weight.to(acc)
    if compensation is None:
        weight.copy_((w + delta).to(weight.dtype))
        return
    t = compensation.to(acc) + delta
    new = (w + t).to(weight.dtype)
    compensation.copy_((w - new.to(acc)) + t)
    weight.copy_(new)


# ------------------------------------------------------------------ split learning: privatize

def privatize(h: Tensor, clip_norm: float, noise_std: float, *, mode: str, seed: int,
              offset: int = 0) -> tuple[Tensor, Tensor]:
    """(y, sq): y = clip(h) + noise_std·ξ in h's dtype, and sq (R,) the rows' squared norms
    in fp32 (fp64 for fp64 h; zeros for "element").

      "sample"/"token":  clip(x) = x · min(1, C/‖x‖) per row (see ``lorafast._layout.privatize_rows``)
      "element":         clip(x) = min(max(x, −C), C)
      ξ = normal_grid(seed, offset, R, L): the Philox normals of the (R, L) rows.

    Written with differentiable ops: autograd of this function is the reference for the
    backward (the clipping's Jacobian; the noise passes gradients straight through)."""
    acc = _acc_dtype(h)
    R, L = privatize_rows(h.shape, mode)
    x = h.to(acc).reshape(R, L)
    if mode == "element":
        sq = torch.zeros(R, dtype=acc, device=h.device)
        y = x.clamp(-clip_norm, clip_norm)
    else:
        sq = (x * x).sum(dim=1)
        big = sq.detach() > clip_norm ** 2
        # min(1, C/‖x‖), differentiated where it is below 1; the rows it leaves alone take
        # a dummy 1 under the root, so that no 0/0 reaches autograd for a zero row
        coef = torch.where(big, clip_norm / torch.sqrt(torch.where(big, sq, torch.ones_like(sq))),
                           torch.ones_like(sq))
        y = x * coef[:, None]
    if noise_std > 0:
        y = y + (noise_std * normal_grid(seed, offset, R, L, h.device)).to(acc)
    return y.reshape(h.shape).to(h.dtype), sq.detach()


def privatize_backward(grad_y: Tensor, h: Tensor, sq: Tensor, clip_norm: float, *, mode: str) -> Tensor:
    """∂L/∂h of ``privatize``: for "element", g·1[|x| ≤ C]; for a row with ‖x‖ ≤ C, g; for
    a row with ‖x‖ = n > C, where y = C x/n, the Jacobian (C/n)(I − x̂x̂ᵀ):
    (C/n)·(g − x (x·g)/n²)."""
    acc = _acc_dtype(h)
    R, L = privatize_rows(h.shape, mode)
    x, g = h.to(acc).reshape(R, L), grad_y.to(acc).reshape(R, L)
    if mode == "element":
        dx = g * (x.abs() <= clip_norm)
    else:
        # fp32 norms from the forward serve fp32 and half inputs; fp64 recomputes its own
        sq = (x * x).sum(dim=1) if acc == torch.float64 else sq.to(acc)
        big = sq > clip_norm ** 2
        n = torch.sqrt(sq).clamp_min(1e-30)
        proj = g - x * ((x * g).sum(dim=1) / n ** 2)[:, None]
        dx = torch.where(big[:, None], (clip_norm / n)[:, None] * proj, g)
    return dx.reshape(h.shape).to(h.dtype)


# ------------------------------------------------------------------ quantised base weights


class QuantWeight(NamedTuple):
    """A frozen (out, in) base weight kept quantised, in bitsandbytes' layout (the tensors are
    bitsandbytes' own, not copies; lorafast.quant builds this from a Linear4bit / Linear8bitLt).

    kind 4 (Linear4bit, NF4 or FP4): ``data`` holds two 4-bit codes per byte, flat over the
    row-major (out, in) matrix, element 2j in the high nibble of byte j and 2j+1 in the low
    one. Element f decodes as ``code[q_f] · absmax[f // blocksize]`` with ``code`` the 16
    values of the quant type. With double quantisation (``nested``) absmax is itself 8-bit:
    ``absmax[b] = code2[absmax_q[b]] · absmax2[b // blocksize2] + offset``, where ``absmax``
    holds the uint8 codes absmax_q.

    kind 8 (Linear8bitLt): ``data`` is the int8 (out, in) matrix CB and ``absmax`` its row-wise
    scale SCB; element (o, i) is ``CB[o, i] · SCB[o] / 127`` (blocks of one row: blocksize = in).
    """
    data: Tensor
    absmax: Tensor
    code: Optional[Tensor]
    absmax2: Optional[Tensor]
    code2: Optional[Tensor]
    offset: Optional[Tensor]
    kind: int
    blocksize: int
    blocksize2: int
    shape: tuple[int, int]

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


def dequantize_absmax(qw: QuantWeight) -> Tensor:
    """The per-block scales of ``qw`` in fp32 (the double quantisation decoded)."""
    if not qw.nested:
        return qw.absmax.to(torch.float32)
    q = qw.absmax.to(torch.int64)
    blocks = torch.arange(q.numel(), device=q.device) // qw.blocksize2
    return qw.code2.to(torch.float32)[q] * qw.absmax2.to(torch.float32)[blocks] + qw.offset.to(torch.float32)


def dequantize(qw: QuantWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (out, in) weight that ``qw`` encodes, decoded in fp32 and rounded once to ``dtype``
    (bitsandbytes.functional.dequantize_4bit / int8_vectorwise_dequant compute the same)."""
    out_f, in_f = qw.shape
    n = out_f * in_f
    if qw.kind == 8:
        w = qw.data.reshape(out_f, in_f).to(torch.float32) * qw.absmax.to(torch.float32)[:, None] * (1.0 / 127)
        return w.to(dtype)
    packed = qw.data.reshape(-1).view(torch.uint8).to(torch.int64)
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]
    blocks = torch.arange(n, device=packed.device) // qw.blocksize
    w = qw.code.to(torch.float32)[codes] * dequantize_absmax(qw)[blocks]
    return w.reshape(out_f, in_f).to(dtype)
