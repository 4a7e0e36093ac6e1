"""One implementation module per backend, all with the same functions (the op bodies in
lorafast/_ops.py call them through ``lorafast._backend.plan``):

    lora_linear_forward(x2, weight, lora_A, lora_B, bias, lora_R, scaling, dropout_p, seed, offset)
        -> (y2 (M, out) in x's dtype, h (M, r) fp32)
    lora_linear_backward(gy2, x2, weight, lora_A, lora_B, lora_R, h, scaling, dropout_p, seed, offset, needs)
        -> (dx2, dA, dB, dR, dbias), None where ``needs`` says no
    lora_linear_per_sample_backward(gy2, x2, ..., offset, *, batch, need_x, ps_A, ps_B, ps_R, ps_scale)
        -> dx2 or None; adds each sample's gradients into the ps_* buffers
    grad_sample_norms(grad_sample, segments) -> (N, P) fp32
    clip_reduce_noise(grad_sample, sq_norms, segments, max_norms, per_layer, acc, noise, noise_std,
                      seed, offset, out_scale) -> (D,) fp32
    fedex_merge_(weight, U, V, compensation) -> None
    privatize(h, clip_norm, noise_std, mode, seed, offset) -> (y, sq fp32)

x2 and gy2 are the (M, in) and (M, out) row views of the LoRA linear's activations. The two
LoRA linear functions also take ``segments=(rows, seg, scale)`` for many clients' adapters
over one base (lora_linear_multi): the adapters are then (clients, ·, ·) stacks, position p
of the client order is row rows[p] of client seg[p] (sorted), each client's scale is
``scaling`` × scale[client], and h is in client order. "cuda" has no such kernels.

    reference.py  "torch"   lorafast.reference, the spec
    triton.py     "triton"  lorafast.kernels, the LoRA linear fully fused (its GEMMs in Triton)
    hybrid.py     "hybrid"  as "triton", with the LoRA linear's base GEMMs on cuBLAS (torch.mm)
    cuda.py       "cuda"    the lorafast_cuda ops of csrc/, around cuBLAS GEMMs
    lora.py       the backward's gradient buffers, shared by the kernel plans
"""
