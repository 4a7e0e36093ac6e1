r"""The "implicit noise" of LoRA with a frozen random A: a diagnostic, NOT a privacy guarantee.

Malekmohammadi & Farnadi (arXiv 2409.17538, "On the Implicit Relation Between Low-Rank
Adaptation and Differential Privacy"; from v8 "LoRA Provides Differential Privacy by Design
via Random Sketching") observe that training B against a random A injects noise into the
gradient of the full weight. With A frozen (``variant="ffa"``) and y = x Wᵀ + s·x Aᵀ Bᵀ, the
gradient reaching B is ∇B = s·∇W·Aᵀ (∇W: the loss's gradient w.r.t. the effective weight
W + sBA), so an SGD step on B with learning rate η moves the effective weight by

    ΔW = s·ΔB·A = −η s² ∇W AᵀA = −η·(s² r v)·(∇W + N),     N = ∇W (AᵀA / (r v) − I),

exactly, at every step and whatever B is. A's entries are i.i.d. with mean 0, variance v and
fourth moment μ₄ = κ v², so E[AᵀA] = r v I: over A's distribution the step is full
fine-tuning at learning rate η·s²·r·v plus a zero-mean "noise" N. For a row g of ∇W,
(g AᵀA)_i = Σ_k A_ki (Σ_j g_j A_kj) is a sum of r i.i.d. terms, whence (derived here: the
paper's own formula could not be read verbatim; its abstract and summaries describe Gaussian
A ~ N(0, 1/r), so E[AᵀA] = I, noise ∇W(AᵀA − I) and a variance falling as 1/r: the κ = 3 case)

    Cov(N_row) = (‖g‖² I + g gᵀ + (κ − 3) diag(g²)) / r,
    Var(N_i)   = (‖g‖² + (κ − 2) g_i²) / r,        Σ_{rows, i} Var = ‖∇W‖²_F (in − 2 + κ) / r.

Gaussian A (κ = 3) gives (‖g‖² + g_i²)/r, the paper's setting (≈ ‖g‖²/r unless one coordinate
of the row dominates); lorafast draws A
Kaiming-uniform, U(−b, b) with b = 1/√in (``layers.draw_adapters``, as PEFT's default), so
v = b²/3, μ₄ = b⁴/5, κ = 9/5 and Var(N_i) = (‖g‖² − g_i²/5)/r. The noise-to-signal ratio
√(E‖N‖²)/‖∇W‖ = √((in − 2 + κ)/r) does not depend on the data.

``implicit_noise`` measures this on one batch and expresses it as the noise multiplier σ_eff of
a DP-SGD step with the same clipping bound C and batch size n: DP-SGD's update
(Σᵢ clip(gᵢ) + N(0, σ²C²I))/n has noise variance σ²C²/n² per coordinate, so σ_eff =
n·√(mean per-coordinate Var)/C. Optionally it reports the ε that DP-SGD with σ_eff would get.

Why this is not a privacy guarantee (formal DP in lorafast comes only from explicit clipping,
calibrated noise and an accountant, ``lorafast.dp.PrivacyEngine``):
  * A is frozen: drawn once (from ``layer.seed``, shared by FFA clients and saved with the
    model), not afresh each step. Given A, the B update −η s ∇W Aᵀ is a deterministic function
    of the data, with no noise at all; N is "noise" only to someone who does not know A.
  * The noise scales with the signal (Cov ∝ ∇W's rows) and lies in ∇W's column space, so it
    does not hide what changes outside it; rows share one A and are correlated. The one-run
    audit (``lorafast.dp.audit.PrivacyAudit``) of an unnoised FFA run tells its gradient
    canaries apart almost perfectly (examples/privacy_audit.py).
  * σ_eff depends on the batch (through ‖∇W‖/C) and C is not enforced: nothing clips.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_count, check_delta, check_positive, check_sample_rate
from ..layers import LoRALinear
from .accountant import MECHANISMS, compute_epsilon
from .grad_sample import LOSS_REDUCTIONS, is_attached

__all__ = ["ImplicitNoise", "implicit_noise", "implicit_noise_variance", "summary",
           "UNIFORM_KURTOSIS", "GAUSSIAN_KURTOSIS"]

UNIFORM_KURTOSIS = 9 / 5     # μ₄/v² of U(−b, b): (b⁴/5)/(b²/3)²; lorafast's A
GAUSSIAN_KURTOSIS = 3.0      # of N(0, v); the paper's A

ASSUMPTIONS = (
    "A is drawn afresh, independently, for every step; FALSE for a frozen A: it is drawn once, reused "
    "every step and known to whoever has layer.seed or the model, and given A the update is noiseless",
    "the noise is independent of the data; FALSE: its covariance scales with the rows of ∇W, and a "
    "change outside ∇W's column space gets no noise",
    "the noise is isotropic Gaussian; it is not: σ_eff matches only its mean per-coordinate variance, "
    "its rows are correlated through the shared A, and it is Gaussian only approximately "
    "(the paper bounds the distance by a Berry-Esseen argument)",
    "every per-sample gradient has norm <= C and σ_eff is the same at every step; nothing clips here "
    "and σ_eff changes with the batch",
    "batches are Poisson sampled with rate sample_rate",
)


def implicit_noise_variance(grad: Tensor, r: int, kurtosis: float = UNIFORM_KURTOSIS) -> Tensor:
    """Var(N) per coordinate, (‖g_o‖² + (κ − 2) g_oi²)/r, of the noise N = ∇W(AᵀA/(r v) − I) for
    ``grad`` ∇W (out, in) and A (r, in) with i.i.d. zero-mean entries of kurtosis κ = μ₄/v²."""
    g2 = grad.square()
    return (g2.sum(1, keepdim=True) + (kurtosis - 2) * g2) / r


@dataclass(frozen=True)
class ImplicitNoise:
    """One layer's implicit noise on one batch (see the module docstring for the formulas).

    ``grad`` is ḡ = (1/n) Σᵢ gᵢ, the batch-mean gradient of the effective weight (out, in),
    float64; ``scale`` s²·r·v, so that an SGD step on B moves W by −η·scale·(ḡ + N);
    ``noise_var_total`` and ``noise_var_mean`` are Σ and mean of Var(N) over W's coordinates,
    ``noise_to_signal`` is √(noise_var_total)/‖ḡ‖; ``max_grad_norm`` is the C of the comparison
    (given, or the largest per-sample norm in the batch), ``clipped`` the samples above it;
    ``noise_multiplier`` σ_eff = n·√(noise_var_mean)/C; ``epsilon`` DP-SGD's ε(δ) for σ_eff
    after ``steps`` steps at ``sample_rate``, under ``assumptions`` (which do not hold).
    """
    layer: str
    rank: int
    in_features: int
    out_features: int
    batch_size: int
    scale: float
    kurtosis: float
    grad_norm: float
    max_per_sample_norm: float
    max_grad_norm: float
    clipped: int
    noise_var_total: float
    noise_var_mean: float
    noise_to_signal: float
    noise_multiplier: float
    epsilon: Optional[float] = None
    delta: Optional[float] = None
    sample_rate: Optional[float] = None
    steps: Optional[int] = None
    assumptions: tuple[str, ...] = ASSUMPTIONS
    grad: Optional[Tensor] = field(default=None, repr=False, compare=False)

    @property
    def noise_var(self) -> Tensor:
        """Var(N) per coordinate of W, (out, in) float64."""
        return implicit_noise_variance(self.grad, self.rank, self.kurtosis)

    def __str__(self) -> str:
        eps = "" if self.epsilon is None else (
            f"; DP-SGD with σ_eff: ε = {self.epsilon:.4g} at δ = {self.delta:g} after {self.steps} steps, "
            f"q = {self.sample_rate:g} (a comparison, NOT a guarantee: its assumptions fail for a frozen A)")
        return (f"{self.layer} (r={self.rank}, {self.out_features}×{self.in_features}, n={self.batch_size}): "
                f"‖ḡ‖ = {self.grad_norm:.4g}, implicit noise/signal = {self.noise_to_signal:.4g}, "
                f"C = {self.max_grad_norm:.4g} ({self.clipped} above), σ_eff = {self.noise_multiplier:.4g}" + eps)


def summary(records: Mapping[str, ImplicitNoise]) -> str:
    """A fixed-width table of ``implicit_noise``'s records, one row per layer."""
    head = ("layer", "r", "out×in", "‖ḡ‖", "noise/signal", "C", "clipped", "σ_eff", "ε")
    rows = [(name, str(x.rank), f"{x.out_features}×{x.in_features}", f"{x.grad_norm:.3g}",
             f"{x.noise_to_signal:.3g}", f"{x.max_grad_norm:.3g}", f"{x.clipped}/{x.batch_size}",
             f"{x.noise_multiplier:.3g}", "-" if x.epsilon is None else f"{x.epsilon:.3g}")
            for name, x in records.items()]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head, *rows]]
    note = "(a diagnostic: a frozen A gives no differential privacy; see lorafast.dp.implicit_noise)"
    return "\n".join([*lines, note])


def _frozen_a_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRALinear layers whose B trains against a frozen A; ValueError for a trainable A."""
    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        name = name or "<model>"
        if m.lora_A.requires_grad:
            raise ValueError(f"layer {name!r}: lora_A trains (requires_grad=True); the implicit-noise analysis needs "
                             "A frozen at its random init (variant='ffa')")
        if m.lora_R is not None or not m.lora_B.requires_grad:
            continue      # LoRA-XS/SB (R trains) or a fully frozen layer: no B trains against A alone
        if m.merged:
            raise ValueError(f"layer {name!r} is merged: B receives no gradient; unmerge() it first")
        bound = 1 / math.sqrt(m.in_features)
        if m.lora_A.detach().abs().max().item() > bound * (1 + 1e-6):
            raise ValueError(f"layer {name!r}: lora_A has entries beyond ±1/√in = ±{bound:.4g}, so it is not "
                             "lorafast's Kaiming-uniform draw, the distribution this analysis assumes")
        layers[name] = m
    if not layers:
        raise ValueError("model has no LoRALinear whose B trains against a frozen random A (variant='ffa')")
    return layers


def _loss(model: nn.Module, batch, loss_fn: Optional[Callable]) -> Tensor:
    if loss_fn is None:
        if not isinstance(batch, Mapping):
            raise ValueError("without loss_fn, batch must be a dict of model inputs (the loss is model(**batch).loss), "
                             f"got {type(batch).__name__}")
        out = model(**batch)
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError("model(**batch) returned no .loss (pass labels in batch, or give loss_fn)")
        return loss
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence) or len(batch) != 2:
        raise ValueError("with loss_fn, batch must be (inputs, target): the loss is loss_fn(model(inputs), target)")
    inputs, target = batch
    return loss_fn(model(**inputs) if isinstance(inputs, Mapping) else model(inputs), target)


def _flat(t: Tensor, n: int) -> Tensor:
    return t.detach().to(torch.float64).reshape(n, -1, t.shape[-1])


def _per_sample_sq_norms(X: Tensor, G: Tensor) -> Tensor:
    """‖Gᵢᵀ Xᵢ‖²_F per sample i for X (n, T, in), G (n, T, out): through the T×T Gram matrices
    (‖GᵀX‖² = ⟨G Gᵀ, X Xᵀ⟩) when they are smaller than the gradient."""
    T, d_in, d_out = X.shape[1], X.shape[2], G.shape[2]
    if T * T <= d_in * d_out:
        return ((G @ G.transpose(1, 2)) * (X @ X.transpose(1, 2))).sum((1, 2))
    return torch.einsum("nto,nti->noi", G, X).square().sum((1, 2))


def implicit_noise(model: nn.Module, batch, loss_fn: Optional[Callable] = None, *,
                   max_grad_norm: Optional[float] = None, loss_reduction: str = "mean",
                   sample_rate: Optional[float] = None, steps: Optional[int] = None,
                   delta: Optional[float] = None, accountant: str = "pld") -> dict[str, ImplicitNoise]:
    """Per frozen-A LoRALinear layer of ``model``, the implicit noise of LoRA on ``batch``: a
    diagnostic, NOT a privacy guarantee (the derivation and why: this module's docstring,
    ``sys.modules["lorafast.dp.implicit_noise"].__doc__``).

    The loss is ``model(**batch).loss`` (a Hugging Face model with labels in ``batch``) or, with
    ``loss_fn``, ``loss_fn(model(inputs), target)`` for ``batch = (inputs, target)`` (inputs a
    dict are passed as keywords). A scalar loss is the batch's mean (``loss_reduction="mean"``,
    torch's and transformers' default) or sum ("sum") of per-sample losses; a (n,) loss holds
    the per-sample losses and is reduced so. Each layer's input must have the batch first:
    sample i's gradient gᵢ is its share Gᵢᵀ Xᵢ of ∇W (×n for a mean), summed over its tokens
    and over the layer's calls.

    ∇W is computed without making W trainable, in float64 from forward hooks (the layer's input
    X and the loss's gradient G w.r.t. its output, ∇W = Σ Gᵀ X) and ``torch.autograd.grad``,
    with the model in eval mode (no dropout). Nothing about the model changes: no ``.grad`` is
    written, hooks are removed and every module's training mode is restored, even on error.
    Each record holds its ḡ (out·in·8 bytes).

    ``max_grad_norm``: the C of the DP-SGD comparison (one for all layers, as flat clipping);
    None takes each layer's largest per-sample gradient norm in the batch, the smallest C that
    clips nothing. ``sample_rate``, ``steps`` and ``delta`` (all or none): also report ε(δ) of
    DP-SGD with σ_eff by ``compute_epsilon`` (``accountant`` "pld" or "rdp"). That ε is a
    comparison, not a guarantee: the record's ``assumptions`` say what it presumes, and a frozen
    A meets none of the first three.

    Raises ValueError naming the layer whose A trains, if no LoRALinear trains B against a
    frozen A, and for bad arguments.
    """
    C = None if max_grad_norm is None else check_positive("max_grad_norm", max_grad_norm)
    check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
    check_choice("accountant", accountant, MECHANISMS)
    privacy = (sample_rate, steps, delta)
    if any(p is not None for p in privacy) and any(p is None for p in privacy):
        raise ValueError("sample_rate, steps and delta go together: give all three for ε, or none")
    if sample_rate is not None:
        sample_rate = check_sample_rate("sample_rate", sample_rate)
        steps = check_count("steps", steps, minimum=1)
        delta = check_delta("delta", delta)
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if is_attached(model):
        raise ValueError("model is in lorafast.dp's per-sample mode (PrivacyEngine.make_private), whose backward "
                         "writes per-sample gradients; run implicit_noise before make_private, or detach(model)")
    layers = _frozen_a_layers(model)

    calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}

    def hook_for(name):
        def hook(module, args, kwargs, out):
            calls[name].append((args[0] if args else kwargs["x"], out))
        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(hook_for(name), with_kwargs=True) for name, m in layers.items()]
    try:
        model.eval()
        with torch.enable_grad():
            loss = _loss(model, batch, loss_fn)
            if not isinstance(loss, Tensor) or not loss.is_floating_point() or loss.dim() > 1:
                raise ValueError(f"the loss must be a scalar or (n,) float tensor, got {loss!r:.80}")
            loss = loss if loss.dim() == 0 else (loss.mean() if loss_reduction == "mean" else loss.sum())
            if not torch.isfinite(loss).item():
                raise ValueError(f"the loss is not finite: {loss.item()}")
            outs = [y for name in layers for _, y in calls[name]]
            for name in layers:
                if not calls[name]:
                    raise ValueError(f"layer {name!r} was not called in the forward pass")
                if not all(isinstance(y, Tensor) and y.requires_grad for _, y in calls[name]):
                    raise ValueError(f"layer {name!r}: its output does not require grad (run under no_grad?)")
            grads = torch.autograd.grad(loss, outs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode

    records, it, n = {}, iter(grads), None
    for name, layer in layers.items():
        Xs, Gs = [], []
        for x, y in calls[name]:
            g = next(it)
            if x.dim() < 2 or x.shape[0] == 0 or (n is not None and x.shape[0] != n):
                raise ValueError(f"layer {name!r}: its input has shape {tuple(x.shape)}, but every layer's input "
                                 f"must have the batch first" + ("" if n is None else f" (n = {n})"))
            n = x.shape[0]
            Xs.append(_flat(x, n))
            Gs.append(_flat(torch.zeros_like(y) if g is None else g, n))
        X, G = torch.cat(Xs, 1), torch.cat(Gs, 1)
        c = n if loss_reduction == "mean" else 1            # gᵢ = c · (sample i's share of ∇W)
        grad = torch.einsum("nto,nti->oi", G, X) * (c / n)  # ḡ = (1/n) Σᵢ gᵢ
        per_sample = _per_sample_sq_norms(X, G).clamp_min(0).sqrt() * c
        max_norm = per_sample.max().item()
        bound = max_norm if C is None else C
        r, d_in, d_out = layer.r, layer.in_features, layer.out_features
        kurtosis = UNIFORM_KURTOSIS
        grad_norm = grad.norm().item()
        total = grad_norm ** 2 * (d_in - 2 + kurtosis) / r     # Σ over W's coordinates of Var(N)
        mean = total / (d_in * d_out)
        sigma = n * math.sqrt(mean) / bound if bound > 0 else 0.0
        eps = None if sample_rate is None else compute_epsilon(sigma, sample_rate, steps, delta, accountant)
        records[name] = ImplicitNoise(
            layer=name, rank=r, in_features=d_in, out_features=d_out, batch_size=n,
            scale=layer.scaling ** 2 * r / (3 * d_in), kurtosis=kurtosis, grad_norm=grad_norm,
            max_per_sample_norm=max_norm, max_grad_norm=bound, clipped=int((per_sample > bound).sum()),
            noise_var_total=total, noise_var_mean=mean,
            noise_to_signal=math.sqrt((d_in - 2 + kurtosis) / r), noise_multiplier=sigma,
            epsilon=eps, delta=delta, sample_rate=sample_rate, steps=steps, grad=grad)
    return records
