"""Times one DP-SGD training step of a LoRA transformer against non-private training and Opacus.

One step (forward, backward, optimizer.step(), zero_grad(); cross-entropy, SGD, a fixed batch) of
bench/dp_model.py's TinyTransformer: hidden=1024, 8 layers, 16 heads, LoRA r=16 on every
projection, T=512, bf16 base, fp32 adapters; batch 16 and 64. Providers:

  lorafast-nonprivate  layer="lorafast", plain training: the floor
  lorafast-dp          the same under lorafast.dp.PrivacyEngine (PLD accountant), flat clipping,
                       noise_multiplier=1, max_grad_norm=1, the automatic backend
  lorafast-dp-cuda     make_private(backend="cuda"): the CUDA C++ kernels (csrc/); GPU only
  opacus               layer="plain" (PEFT-style nn.Linear adapters) under opacus.PrivacyEngine
  opacus-ghost         the same with Opacus ghost clipping (grad_sample_mode="ghost")

Rows: time and, on a GPU, peak_memory (bench/memory.py). First each DP provider's clipped,
averaged gradient of a noiseless step must match a per-sample reference loop and Opacus (per
tensor ≤ 2e-2 in bf16, 1e-4 in the CPU smoke mode's fp32), or it is not timed and the run exits 1,
as when a lorafast provider raises. `--device cpu`: hidden=32, 2 layers, T=8, batch 4 and 8.

    python bench/bench_dp.py [--quick] [--out PATH] [--device cuda|cpu] [--providers ...]
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lorafast  # before triton: on a CPU-only machine it switches Triton to its interpreter
from lorafast.validate import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` and `dp_model` however the script is launched
import common  # noqa: E402
import memory  # noqa: E402
from common import Case, Needs, Ratio  # noqa: E402
from dp_model import TinyTransformer, copy_weights, randomize_lora_B_, trainable_parameters  # noqa: E402

MODE = "train_step"
DP_PROVIDERS = ("lorafast-dp", "lorafast-dp-cuda", "opacus", "opacus-ghost")
CUDA_PROVIDER = "lorafast-dp-cuda"  # backend="cuda": GPU only
NOISE_MULTIPLIER, MAX_GRAD_NORM = 1.0, 1.0
LR = 1e-4             # timed steps: small enough that many updates stay finite
CHECK_LR = 1e4        # check step: the update lr·g dwarfs the weights, so (before − after)/lr is g to fp32 precision
# Per-tensor relative error allowed in the gradient check: two correct bf16 implementations differ by
# about 1% on the q/k adapters (softmax in bf16); in fp32 any real error is orders of magnitude above 1e-4.
MAX_REL_ERR = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
N_BATCHES = 2         # dataset = N_BATCHES full batches, so that Opacus's expected batch size is the batch
B_STD = 1e-2          # lora_B ~ N(0, B_STD²) instead of zeros (see dp_model.randomize_lora_B_)
# Targets: lorafast-dp's time and memory over non-private training's, and Opacus hooks' time over lorafast-dp's.
TARGET_DP_TIME, TARGET_DP_MEMORY, TARGET_OPACUS_SPEEDUP = 1.15, 1.10, 3.0

# Expected here and repeated on every run: Opacus without secure_mode, and module backward hooks on a
# model whose input does not require grad.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass(frozen=True)
class Config:
    hidden: int
    n_layers: int
    n_heads: int
    r: int
    T: int
    batch: int
    dtype: torch.dtype = torch.bfloat16  # inputs, base weights, LayerNorms; adapters and head are fp32

    @property
    def label(self) -> str:
        return f"batch={self.batch},T={self.T}"

    @property
    def model_label(self) -> str:
        return f"hidden={self.hidden},n_layers={self.n_layers},n_heads={self.n_heads},r={self.r}"


GPU_CONFIGS = [Config(1024, 8, 16, 16, 512, b) for b in (16, 64)]
QUICK_CONFIGS = GPU_CONFIGS[:1]
CPU_CONFIGS = [Config(32, 2, 2, 4, 8, b) for b in (4, 8)]


def make_model(cfg: Config, layer: str, device: torch.device) -> TinyTransformer:
    """The same weights for every provider: a seeded lorafast build with random B, copied into
    a plain build when one is asked for."""
    torch.manual_seed(0)
    lorafast.manual_seed(0)
    kw = dict(hidden=cfg.hidden, n_layers=cfg.n_layers, n_heads=cfg.n_heads, r=cfg.r, dtype=cfg.dtype, device=device)
    model = randomize_lora_B_(TinyTransformer(layer="lorafast", **kw), B_STD, torch.Generator().manual_seed(1))
    return copy_weights(model, TinyTransformer(layer="plain", **kw)) if layer == "plain" else model


def make_loader(cfg: Config) -> DataLoader:
    """N_BATCHES batches of random (B, T, hidden) inputs and binary labels, on the CPU."""
    g = torch.Generator().manual_seed(2)
    n = N_BATCHES * cfg.batch
    x = torch.randn(n, cfg.T, cfg.hidden, generator=g).to(cfg.dtype)
    return DataLoader(TensorDataset(x, torch.randint(0, 2, (n,), generator=g)), batch_size=cfg.batch, shuffle=False)


def build(provider: str, cfg: Config, device: torch.device, *, noise: float, clip: float, lr: float) -> Case:
    """``provider`` on ``cfg``: Case.fn is one step (forward, backward, optimizer.step, zero_grad) and
    Case.state the trainable parameters under dp_model's shared names (before the engine wraps the module)."""
    model = make_model(cfg, "plain" if provider.startswith("opacus") else "lorafast", device)
    params, loader = trainable_parameters(model), make_loader(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    private = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise, max_grad_norm=clip,
                   poisson_sampling=False)
    loss, zero = F.cross_entropy, {}
    if provider in ("lorafast-dp", CUDA_PROVIDER):
        from lorafast.dp import PrivacyEngine
        model, opt, loader = PrivacyEngine(accountant="pld").make_private(
            **private, clipping="flat", backend="cuda" if provider == CUDA_PROVIDER else None)
    elif provider == "opacus":
        import opacus
        model, opt, loader = opacus.PrivacyEngine().make_private(**private)
        zero = {"set_to_none": True}
    elif provider == "opacus-ghost":  # Opacus >= 1.5: the wrapped criterion's backward() runs both passes
        import opacus
        model, opt, loss, loader = opacus.PrivacyEngine().make_private(
            **private, criterion=nn.CrossEntropyLoss(), grad_sample_mode="ghost")
        zero = {"set_to_none": True}
    x, y = (t.to(device) for t in next(iter(loader)))

    def step():
        loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(**zero)
    return Case(provider, step, state=params)


# ------------------------------------------------------------------ gradient check


def reference_clipped_grads(cfg: Config, device: torch.device) -> tuple[dict[str, Tensor], float, int]:
    """A per-sample loop over the plain build: (Σᵢ gᵢ·min(1, C/(‖gᵢ‖+1e-6)) / B per parameter, C, how
    many samples were clipped), C the median per-sample norm (flat over all trainable parameters)."""
    model = make_model(cfg, "plain", device)
    params = trainable_parameters(model)
    x, y = (t.to(device) for t in next(iter(make_loader(cfg))))
    per_sample = []
    for i in range(cfg.batch):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        per_sample.append({k: p.grad.detach().float().clone() for k, p in params.items()})
    norms = torch.stack([torch.cat([g.flatten() for g in gs.values()]).norm() for gs in per_sample])
    clip = norms.median().item()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    ref = {k: sum(f * gs[k] for f, gs in zip(factors, per_sample)) / cfg.batch for k in params}
    return ref, clip, int((norms > clip).sum())


def dp_update(provider: str, cfg: Config, device: torch.device, clip: float) -> dict[str, Tensor]:
    """The averaged clipped gradient a DP provider applies in one noiseless step, read from the SGD
    update as (before − after) / lr, so that it does not depend on where the engine keeps gradients."""
    case = build(provider, cfg, device, noise=0.0, clip=clip, lr=CHECK_LR)
    before = {k: p.detach().clone() for k, p in case.state.items()}
    case.fn()
    common.sync(device)
    return {k: (before[k] - p.detach()) / CHECK_LR for k, p in case.state.items()}


def compare(got: dict[str, Tensor], want: dict[str, Tensor], tol: float, what: str) -> bool:
    """Logs the worst per-tensor relative error (the criterion) and that of all tensors together."""
    errs = {k: rel_err(got[k], want[k]) for k in want}
    name = max(errs, key=lambda k: errs[k])
    whole = rel_err(torch.cat([got[k].flatten() for k in want]), torch.cat([want[k].flatten() for k in want]))
    ok = errs[name] <= tol  # also catches NaN
    common.log(f"  {what:30s} worst rel. err {errs[name]:.3g} ({name}), all together {whole:.3g}: "
               f"{'ok' if ok else 'FAILED'}")
    return ok


def check_gradients(cfg: Config, providers: list[str], device: torch.device) -> list[str]:
    """Checks every DP provider in ``providers``; returns those that failed (loudly)."""
    dp = [p for p in providers if p in DP_PROVIDERS]
    if not dp:
        return []
    tol = MAX_REL_ERR[cfg.dtype]
    common.log(f"gradient check on {cfg.label}, {str(cfg.dtype).replace('torch.', '')}: noise_multiplier=0, "
               f"tolerance {tol:g} per tensor; per-sample reference loop ...")
    ref, clip, n_clipped = reference_clipped_grads(cfg, device)
    common.log(f"  clipping bound C = {clip:.4g} (median per-sample norm): {n_clipped}/{cfg.batch} samples clipped")
    common.free(device)
    updates, failed = {}, []
    for p in common.progress(dp, desc="gradient check"):
        try:
            updates[p] = dp_update(p, cfg, device, clip)
        except Exception as e:
            common.banner(f"GRADIENT CHECK: {p} failed to run: {type(e).__name__}: {e}")
            failed.append(p)
            continue
        finally:
            common.free(device)
        if not compare(updates[p], ref, tol, f"{p} vs reference:"):
            failed.append(p)
    for p in ("lorafast-dp", CUDA_PROVIDER):
        if p in updates and "opacus" in updates and not compare(updates[p], updates["opacus"], tol, f"{p} vs opacus:"):
            failed += [] if p in failed else [p]
    for p in failed:
        common.banner(f"GRADIENT CHECK FAILED: {p}'s clipped gradients disagree (tolerance {tol:g}).\n"
                      f"{p} is not timed and the run exits non-zero.")
    return failed


class DpStepSuite(common.Suite):
    KERNEL, X_NAME, MODES = "dp_step", "config", (MODE,)
    PROVIDERS, CUDA_PROVIDER = ("lorafast-nonprivate", *DP_PROVIDERS), CUDA_PROVIDER
    CUDA_LOST = "no CUDA rows, no CUDA gradient check"
    SIZES = {"cpu": CPU_CONFIGS, "quick": QUICK_CONFIGS, "full": GPU_CONFIGS}
    QUICK_HELP = "batch 16 only, fewer timed steps"
    SMOKE_WHAT, SMOKE = "tiny model", "a tiny model, wall-clock timing, NO peak_memory rows (no CUDA allocator)."
    TIMING = {"step": True}
    CELLS = ("time", "peak_memory")

    def needs(self):
        return [Needs("lorafast.dp", ("lorafast-dp", CUDA_PROVIDER), lambda: common.import_status("lorafast.dp"),
                      "no DP timing, no DP gradient check, no DP ratios"),
                Needs("OPACUS", ("opacus", "opacus-ghost"), lambda: common.import_status("opacus"),
                      "no Opacus rows, no Opacus comparison", found="Opacus baseline: {info}")]

    def ratios(self):
        return [Ratio("lorafast-dp", "lorafast-nonprivate", target=TARGET_DP_TIME),
                Ratio("lorafast-dp", "lorafast-nonprivate", "peak_memory", TARGET_DP_MEMORY),
                Ratio("opacus", "lorafast-dp", target=TARGET_OPACUS_SPEEDUP, at_most=False),
                Ratio("opacus-ghost", "lorafast-dp")]

    def header_extra(self):
        return [f"model {self.sizes[0].model_label}"]

    def prepare(self):
        # On the CPU the check runs in fp32, where the tolerance can be tight (see MAX_REL_ERR).
        cfg = replace(self.sizes[0], dtype=torch.float32) if self.cpu else self.sizes[0]
        failed = check_gradients(cfg, self.providers, self.device)
        self.failed += [f"gradient check of {p}" for p in failed]
        self.providers = [p for p in self.providers if p not in failed]

    def build(self, provider, cfg, inputs, modes):
        return build(provider, cfg, self.device, noise=NOISE_MULTIPLIER, clip=MAX_GRAD_NORM, lr=LR)

    def memory(self, case, mode):
        return None if self.cpu else memory.cuda_peak_mb(case.fn, self.device)

    def fails_run(self, provider, check):
        return provider.startswith("lorafast")

    def info(self, cfg, inputs):
        return {"model": cfg.model_label}


SUITE = DpStepSuite
main = SUITE.main  # the entry point, main(argv=None) -> int, as lorafast/cli.py calls it


if __name__ == "__main__":
    sys.exit(main())
