"""Models and ground truth for the DP engine tests.

The truth for a private step is torch.func: vmap over samples of grad of each sample's
loss, on the same model with LoRALinear computed by lorafast.reference (the custom ops
have no vmap rule), then clip, sum and divide in float64.
"""
import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import lorafast
from lorafast import reference


class TinyNet(nn.Module):
    """Every kind of trainable parameter lorafast.dp accepts: LoRA (A, B), FFA (B), XS (R), a head."""

    def __init__(self, d_in=7, d_hidden=9, n_classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lora = lorafast.LoRALinear(d_in, d_hidden, r=3, lora_alpha=6, variant="lora", seed=seed + 1)
        self.ffa = lorafast.LoRALinear(d_hidden, d_hidden, r=2, variant="ffa", seed=seed + 2)
        self.xs = lorafast.LoRALinear(d_hidden, d_hidden, r=2, variant="xs", seed=seed + 3)
        self.norm = nn.LayerNorm(d_hidden)
        self.norm.requires_grad_(False)
        self.head = nn.Linear(d_hidden, n_classes)
        with torch.no_grad():   # B and R start at zero; make every gradient non-trivial
            for p in (self.lora.lora_B, self.ffa.lora_B, self.xs.lora_R):
                p.normal_(0, 0.5)

    def forward(self, x):   # x (N, T, d_in)
        h = torch.tanh(self.lora(x))
        h = torch.tanh(self.ffa(h)) + h
        h = self.norm(self.xs(h))
        return self.head(h.mean(1))


def make_batch(n, T=4, d_in=7, n_classes=3):
    return torch.randn(n, T, d_in), torch.randint(0, n_classes, (n,))


@contextlib.contextmanager
def reference_layers():
    """LoRALinear computed by the pure-PyTorch reference, so that torch.func can transform it."""
    original = lorafast.LoRALinear.forward

    def forward(self, x):
        return reference.lora_linear(x, self.weight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling,
                                     lora_R=self.lora_R)
    lorafast.LoRALinear.forward = forward
    try:
        yield
    finally:
        lorafast.LoRALinear.forward = original


def per_sample_grads(model, x, y):
    """{name: (N, *shape)} float64 per-sample gradients of cross-entropy, trainable parameters only."""
    m64 = _float64_copy(model)
    params = {n: p.detach() for n, p in m64.named_parameters() if p.requires_grad}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(m64, p, (xi[None],)), yi[None])
    with reference_layers():
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x.double(), y)


def _float64_copy(model):
    from lorafast.dp import detach
    m = copy.deepcopy(model).double()
    detach(m)          # a private model's copy is private too: compute it plainly
    return m


def clipped_mean(grads: dict, bounds, expected_batch, per_layer=False):
    """{name: Σᵢ clip(gᵢ) / E} in float64, flat or per parameter."""
    names = list(grads)
    n = grads[names[0]].shape[0]
    flat = [grads[k].reshape(n, -1) for k in names]
    if per_layer:
        coefs = [(c / f.norm(dim=1)).clamp(max=1) for f, c in zip(flat, bounds)]
    else:
        coef = (bounds / torch.cat(flat, 1).norm(dim=1)).clamp(max=1)
        coefs = [coef] * len(flat)
    return {k: (f * c[:, None]).sum(0).reshape(grads[k].shape[1:]) / expected_batch
            for k, f, c in zip(names, flat, coefs)}
