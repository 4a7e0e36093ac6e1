"""SVD-based initialisations of the r×r adapters (LoRA-XS, LoRA-SB).

Both act on every ``LoRALinear`` of a model that has an R (variants "xs" and "sb"),
in place, and keep B and A frozen (only R trains):

* ``lora_xs_``: B = U_r, A = Σ_r V_rᵀ from the truncated SVD of the base weight
  W ≈ U_r Σ_r V_rᵀ, and R ~ N(0, r_std²), so the layer starts at (almost) the base.
* ``lora_sb_`` (LoRA-SB, arXiv 2411.19557): B·R·A approximates the first step of
  full fine-tuning, so no alpha tuning is needed (see its docstring for the estimator).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ._checks import check_count, check_nonnegative, check_positive
from .layers import LoRALinear

__all__ = ["lora_xs_", "lora_sb_"]


def _r_layers(model: nn.Module, fn: str) -> list[LoRALinear]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and m.lora_R is not None]
    if not layers:
        raise ValueError(f"{fn}: model has no LoRALinear layer with an R (variant 'xs' or 'sb'); inject with "
                         "variant='xs' or 'sb' first")
    merged = [m for m in layers if m.merged]
    if merged:
        raise ValueError(f"{fn}: {len(merged)} layer(s) are merged; call lorafast.unmerge_adapters(model) first")
    return layers


def _set_factors(layer: LoRALinear, U: Tensor, S: Tensor, Vh: Tensor, R: Tensor) -> None:
    """B = U, A = Vh, both zero-padded to rank r when W has fewer singular vectors; R as given."""
    k = min(layer.r, U.shape[1])
    B = torch.zeros_like(layer.lora_B)
    A = torch.zeros_like(layer.lora_A)
    B[:, :k] = U[:, :k]
    A[:k] = Vh[:k]
    layer.lora_B.copy_(B)
    layer.lora_A.copy_(A)
    layer.lora_R.copy_(R)


@torch.no_grad()
def lora_xs_(model: nn.Module, *, r_std: float = 1e-5) -> nn.Module:
    """LoRA-XS: B = U_r, A = Σ_r V_rᵀ from the SVD of each layer's base weight (fp32), and R
    drawn from N(0, r_std²) with the layer's seed (``r_std=0`` gives R = 0, the base output).
    Returns ``model``."""
    r_std = check_nonnegative("r_std", r_std)
    layers = _r_layers(model, "lora_xs_")
    for layer in layers:
        U, S, Vh = torch.linalg.svd(layer.base_weight.float(), full_matrices=False)
        k = min(layer.r, S.shape[0])
        gen = torch.Generator(device="cpu").manual_seed(layer.seed)
        R = torch.randn(layer.r, layer.r, generator=gen) * r_std
        _set_factors(layer, U, S, S[:k, None] * Vh[:k], R.to(layer.lora_R.device))
    return model


def _batch_size(batch) -> int:
    """The leading dimension of the first tensor found in a batch (tensor, mapping or sequence)."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise ValueError("a batch tensor needs a leading batch dimension")
        return batch.shape[0]
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        try:
            return _batch_size(item)
        except ValueError:
            continue
    raise ValueError(f"cannot tell the number of examples in a batch of type {type(batch).__name__}: it must be a "
                     "tensor, or a mapping or sequence holding one with the examples along dim 0")


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="lora_sb_: gradient estimate", unit="ex", leave=False)


def lora_sb_(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, object], Tensor], *,
             num_samples: int = 128, lr: float = 1e-3) -> nn.Module:
    """LoRA-SB: initialise each layer so that s·B·R·A is the rank-r truncation of an estimate
    of the first full fine-tuning update ΔW.

    Estimator: with the adapters' contribution switched off (R = 0, so the gradient is taken
    at the pretrained weights), ``loss_fn(model, batch)`` (the mean loss over the batch) is
    differentiated for whole batches from ``batches`` until at least ``num_samples`` examples
    are seen; batches are weighted by their size, so

        ΔW = −lr · (1/n) Σᵢ ∇_W ℓᵢ

    is one SGD step of full fine-tuning on those n examples. ∇_W of a layer y = x Wᵀ is
    Σ_tokens g xᵀ, accumulated from the layer's input x and output gradient g in one fp32
    (out × in) buffer per layer; nothing per example or per batch is kept, and each buffer
    is freed as soon as its layer is initialised. Then, from the exact SVD ΔW = U S Vᵀ:
    B = U_r, A = V_rᵀ, R = S_r / s, so s·B·R·A = U_r S_r V_rᵀ (no alpha tuning).

    The model's train/eval mode is left as it is; parameter ``.grad`` fields are not
    touched. Returns ``model``."""
    num_samples = check_count("num_samples", num_samples, 1)
    lr = check_positive("lr", lr)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(model, batch) -> scalar loss, got {loss_fn!r}")
    layers = _r_layers(model, "lora_sb_")
    frozen = [m for m in layers if not m.lora_R.requires_grad]
    if frozen:
        raise ValueError(f"lora_sb_: {len(frozen)} layer(s) have a frozen lora_R; the gradient estimate flows "
                         "through R, so it must require grad")

    saved_R = [m.lora_R.detach().clone() for m in layers]
    acc: dict[LoRALinear, Tensor] = {}

    def capture(layer, inputs, output):
        x = inputs[0]

        def add(g):
            buf = acc.get(layer)
            if buf is None:
                buf = acc[layer] = torch.zeros(layer.out_features, layer.in_features, device=g.device,
                                               dtype=torch.float32)
            buf.addmm_(g.reshape(-1, layer.out_features).float().T, x.detach().reshape(-1, layer.in_features).float())
        output.register_hook(add)

    seen = 0
    bar = _progress(num_samples)
    handles = [m.register_forward_hook(capture) for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m.lora_R.zero_()
        for batch in batches:
            n = _batch_size(batch)
            if n == 0:
                continue
            loss = loss_fn(model, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor, got {loss!r}")
            torch.autograd.grad(loss * n, [m.lora_R for m in layers], allow_unused=True)
            seen += n
            if bar is not None:
                bar.update(n)
            if seen >= num_samples:
                break
    except BaseException:
        with torch.no_grad():
            for m, R in zip(layers, saved_R):
                m.lora_R.copy_(R)
        raise
    finally:
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    if seen == 0:
        with torch.no_grad():
            for m, R in zip(layers, saved_R):
                m.lora_R.copy_(R)
        raise ValueError("batches gave no examples to estimate the gradient from")
    if seen < num_samples:
        warnings.warn(f"lora_sb_: batches ran out after {seen} of num_samples={num_samples} examples; "
                      "the estimate uses those", stacklevel=2)
    with torch.no_grad():
        for layer in layers:
            grad = acc.pop(layer, None)
            if grad is None:          # the layer took no part in the loss: ΔW = 0
                grad = torch.zeros(layer.out_features, layer.in_features, device=layer.lora_R.device)
            delta = grad.mul_(-lr / seen)
            del grad
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            del delta
            k = min(layer.r, S.shape[0])
            R = torch.zeros(layer.r, layer.r, device=S.device)
            R[range(k), range(k)] = S[:k] / layer.scaling
            _set_factors(layer, U, S, Vh, R)
    return model
