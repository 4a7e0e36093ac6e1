"""Times one DP-SGD training step of a LoRA transformer against non-private training and Opacus.

One step is forward, backward, optimizer.step() and zero_grad() on a fixed batch
(data loading is not timed), loss = cross-entropy (mean), SGD. The model is
bench/dp_model.py's TinyTransformer: hidden=1024, 8 layers, 16 heads, LoRA r=16 on
every projection, T=512, bf16 base weights and fp32 adapters; batch 16 and 64.
Providers:

  lorafast-nonprivate  layer="lorafast", plain training: the floor
  lorafast-dp          layer="lorafast" under lorafast.dp.PrivacyEngine (PLD accountant),
                       flat clipping, noise_multiplier=1, max_grad_norm=1; kernels on the
                       automatic backend
  lorafast-dp-cuda     the same with make_private(backend="cuda"): the CUDA C++ kernels
                       (csrc/); GPU only, not in the CPU smoke mode's default
  opacus               layer="plain" (PEFT-style nn.Linear adapters) under
                       opacus.PrivacyEngine, hooks mode (per-sample gradients)
  opacus-ghost         the same with Opacus ghost clipping (grad_sample_mode="ghost")

A provider whose library is missing (opacus, lorafast.dp), or lorafast-dp-cuda where the
CUDA backend cannot run (lorafast._backend.cuda_status(), or --device cpu), is skipped with
a banner.

Metrics per (provider, batch):
  time         ms per step: CUDA events through triton.testing.do_bench (p50/p20/p80)
  peak_memory  MB: torch.cuda.max_memory_allocated over one step, after
               reset_peak_memory_stats. It counts every live tensor at the peak, so it
               includes the resident model (frozen bf16 base, fp32 adapters, head), the
               fixed batch on the GPU, gradients, per-sample gradients or norms, noise and
               the activations saved for backward; nothing is subtracted. The allocator's
               cache is not counted.

Before timing, each DP provider is checked once with noise_multiplier=0 on one batch
(batch 16): its clipped, averaged gradient of every adapter and of the head (read from
the SGD update) must match a per-sample reference loop and, where both run,
lorafast-dp (and lorafast-dp-cuda) must match Opacus: relative error ≤ 2e-2 per tensor
in bf16 (≤ 1e-4 in fp32, which the CPU smoke mode uses). The check's clipping bound is the median
per-sample gradient norm, so that about half the batch is clipped.

    python bench/bench_dp.py [--quick] [--out PATH] [--device cuda|cpu] [--providers ...]

Without a GPU only `--device cpu` runs anything: a tiny model (hidden=32, 2 layers,
T=8, batch 4 and 8) timed with a wall clock and no peak_memory rows, so that the
script itself can be tested.

Exit status: 0 when every requested provider ran or was skipped for a missing library
or CUDA backend, out of memory, or (baselines only) an error; 1 when a gradient check
fails or a lorafast provider raises.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lorafast  # before triton: on a CPU-only machine it switches Triton to its interpreter
from lorafast.validate import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` and `dp_model` however the script is launched
import common  # noqa: E402
from dp_model import TinyTransformer, copy_weights, randomize_lora_B_, trainable_parameters  # noqa: E402

KERNEL = "dp_step"
MODE = "train_step"
X_NAME = "config"
ALL_PROVIDERS = ("lorafast-nonprivate", "lorafast-dp", "lorafast-dp-cuda", "opacus", "opacus-ghost")
DP_PROVIDERS = ("lorafast-dp", "lorafast-dp-cuda", "opacus", "opacus-ghost")
CUDA_PROVIDER = "lorafast-dp-cuda"  # backend="cuda": GPU only
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LR = 1e-4             # timed steps: small enough that many updates stay finite
CHECK_LR = 1e4        # check step: the update lr·g dwarfs the weights, so (before − after)/lr is g to fp32 precision
# Per-tensor relative error allowed in the gradient check. bf16 is the benchmark's dtype: two
# correct bf16 implementations differ by about 1% on the q/k adapters (softmax in bf16).
# The CPU smoke mode checks in fp32, where any real error is orders of magnitude above this.
MAX_REL_ERR = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
N_BATCHES = 2         # dataset = N_BATCHES full batches, so that Opacus's expected batch size is the batch
DTYPE = torch.bfloat16  # inputs, base weights, LayerNorms; adapters and head are fp32
B_STD = 1e-2          # lora_B ~ N(0, B_STD²) instead of zeros (see dp_model.randomize_lora_B_)

# Performance targets: lorafast-dp against lorafast-nonprivate and Opacus hooks.
TARGET_DP_TIME = 1.15
TARGET_DP_MEMORY = 1.10
TARGET_OPACUS_SPEEDUP = 3.0

# Expected here and repeated on every run: Opacus without secure_mode, and module backward
# hooks on a model whose input does not require grad.
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
    dtype: torch.dtype = DTYPE

    @property
    def label(self) -> str:
        return f"batch={self.batch},T={self.T}"

    @property
    def model_label(self) -> str:
        return f"hidden={self.hidden},n_layers={self.n_layers},n_heads={self.n_heads},r={self.r}"


GPU_CONFIGS = [Config(1024, 8, 16, 16, 512, b) for b in (16, 64)]
QUICK_CONFIGS = GPU_CONFIGS[:1]
CPU_CONFIGS = [Config(32, 2, 2, 4, 8, b) for b in (4, 8)]


class ProviderError(RuntimeError):
    """A provider could not be built or run."""


# ------------------------------------------------------------------ libraries


def lorafast_dp_status() -> tuple[bool, str]:
    """(usable, "ok" or why not)."""
    try:
        importlib.import_module("lorafast.dp")
    except Exception as e:  # a missing dependency (dp-accounting) raises more than ImportError
        return False, f"{type(e).__name__}: {e}"
    return True, "ok"


def opacus_status() -> tuple[bool, str]:
    """(usable, version or why not)."""
    try:
        import opacus
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"
    return True, getattr(opacus, "__version__", "unknown version")


def resolve_providers(requested: Optional[list[str]], device: torch.device) -> list[str]:
    """The requested providers whose libraries import here; the others are dropped loudly.
    The CPU default leaves out the CUDA provider."""
    wanted = list(dict.fromkeys(requested or common.default_providers(ALL_PROVIDERS, CUDA_PROVIDER, device)))
    ours = [p for p in wanted if p in ("lorafast-dp", CUDA_PROVIDER)]
    if ours:
        ok, info = lorafast_dp_status()
        if not ok:
            common.banner(f"lorafast.dp IS NOT AVAILABLE ({info}).\nSkipped: {', '.join(ours)}: "
                          "no DP timing, no DP gradient check, no DP ratios.")
            wanted = [p for p in wanted if p not in ours]
    wanted = common.drop_unusable_cuda(wanted, CUDA_PROVIDER, device, "no CUDA rows, no CUDA gradient check")
    if {"opacus", "opacus-ghost"} & set(wanted):
        ok, info = opacus_status()
        if ok:
            common.banner(f"Opacus baseline: opacus {info}")
        else:
            common.banner(f"OPACUS IS NOT AVAILABLE ({info}).\nProviders `opacus` and `opacus-ghost` are "
                          "skipped: no Opacus rows, no Opacus comparison.")
            wanted = [p for p in wanted if not p.startswith("opacus")]
    return wanted


# ------------------------------------------------------------------ model and data


def make_model(cfg: Config, layer: str, device: torch.device) -> TinyTransformer:
    """The same weights for every provider: a seeded lorafast build with random B, copied into
    a plain build when one is asked for."""
    torch.manual_seed(0)
    lorafast.manual_seed(0)
    kw = dict(hidden=cfg.hidden, n_layers=cfg.n_layers, n_heads=cfg.n_heads, r=cfg.r, dtype=cfg.dtype, device=device)
    model = TinyTransformer(layer="lorafast", **kw)
    randomize_lora_B_(model, std=B_STD, generator=torch.Generator().manual_seed(1))
    if layer == "plain":
        model = copy_weights(model, TinyTransformer(layer="plain", **kw))
    return model


def make_loader(cfg: Config) -> DataLoader:
    """N_BATCHES batches of random (B, T, hidden) inputs and binary labels, on the CPU."""
    g = torch.Generator().manual_seed(2)
    n = N_BATCHES * cfg.batch
    x = torch.randn(n, cfg.T, cfg.hidden, generator=g).to(cfg.dtype)
    y = torch.randint(0, 2, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=cfg.batch, shuffle=False)


def first_batch(loader, device: torch.device) -> tuple[Tensor, Tensor]:
    x, y = next(iter(loader))
    return x.to(device), y.to(device)


# ------------------------------------------------------------------ providers


@dataclass
class Case:
    """One provider built on one config, ready to step."""
    provider: str
    step: Callable[[], None]        # forward, backward, optimizer.step, zero_grad
    params: dict[str, nn.Parameter]  # trainable parameters under dp_model's shared names


def _sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def _plain_step(model, opt, x, y, zero_kw: dict) -> Callable[[], None]:
    def step():
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(**zero_kw)
    return step


def build_nonprivate(cfg, device, *, noise, clip, lr) -> Case:
    model = make_model(cfg, "lorafast", device)
    params = trainable_parameters(model)
    opt = _sgd(model, lr)
    x, y = first_batch(make_loader(cfg), device)
    return Case("lorafast-nonprivate", _plain_step(model, opt, x, y, {}), params)


def build_lorafast_dp(provider: str, backend: Optional[str]):
    """lorafast.dp with its kernels on ``backend`` (None: automatic selection)."""
    def build(cfg, device, *, noise, clip, lr) -> Case:
        from lorafast.dp import PrivacyEngine
        model = make_model(cfg, "lorafast", device)
        params = trainable_parameters(model)  # before wrapping: the engine may wrap the module
        opt = _sgd(model, lr)
        model, opt, loader = PrivacyEngine(accountant="pld").make_private(
            module=model, optimizer=opt, data_loader=make_loader(cfg), noise_multiplier=noise,
            max_grad_norm=clip, clipping="flat", poisson_sampling=False, backend=backend)
        x, y = first_batch(loader, device)
        return Case(provider, _plain_step(model, opt, x, y, {}), params)
    return build


def build_opacus(ghost: bool):
    def build(cfg, device, *, noise, clip, lr) -> Case:
        import opacus
        model = make_model(cfg, "plain", device)
        params = trainable_parameters(model)
        opt = _sgd(model, lr)
        kw = dict(module=model, optimizer=opt, data_loader=make_loader(cfg), noise_multiplier=noise,
                  max_grad_norm=clip, poisson_sampling=False)
        engine = opacus.PrivacyEngine()
        if not ghost:
            model, opt, loader = engine.make_private(**kw)
            x, y = first_batch(loader, device)
            return Case("opacus", _plain_step(model, opt, x, y, {"set_to_none": True}), params)
        # Ghost clipping (Opacus >= 1.5): make_private also wraps the criterion, whose
        # backward() runs the two backward passes (per-sample norms, then clipped sum).
        model, opt, criterion, loader = engine.make_private(**kw, criterion=nn.CrossEntropyLoss(),
                                                            grad_sample_mode="ghost")
        x, y = first_batch(loader, device)

        def step():
            criterion(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return Case("opacus-ghost", step, params)
    return build


BUILDERS = {"lorafast-nonprivate": build_nonprivate, "lorafast-dp": build_lorafast_dp("lorafast-dp", None),
            CUDA_PROVIDER: build_lorafast_dp(CUDA_PROVIDER, "cuda"),
            "opacus": build_opacus(ghost=False), "opacus-ghost": build_opacus(ghost=True)}


# ------------------------------------------------------------------ gradient check


def reference_clipped_grads(cfg: Config, device: torch.device) -> tuple[dict[str, Tensor], float, int]:
    """A per-sample loop over the plain build: (Σᵢ gᵢ·min(1, C/(‖gᵢ‖+1e-6)) / B per parameter,
    C, how many samples were clipped), with C the median per-sample norm (flat over all
    trainable parameters; 1e-6 as in Opacus)."""
    model = make_model(cfg, "plain", device)
    params = trainable_parameters(model)
    x, y = first_batch(make_loader(cfg), device)
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
    """The averaged clipped gradient a DP provider applies in one step with no noise,
    read from the SGD update as (before − after) / lr, so that it does not depend on
    where the engine keeps its gradients."""
    case = BUILDERS[provider](cfg, device, noise=0.0, clip=clip, lr=CHECK_LR)
    before = {k: p.detach().clone() for k, p in case.params.items()}
    case.step()
    common.sync(device)
    return {k: (before[k] - p.detach()) / CHECK_LR for k, p in case.params.items()}


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
        if p in updates and "opacus" in updates:
            if not compare(updates[p], updates["opacus"], tol, f"{p} vs opacus:") and p not in failed:
                failed.append(p)
    for p in failed:
        common.banner(f"GRADIENT CHECK FAILED: {p}'s clipped gradients disagree (tolerance {tol:g}).\n"
                      f"{p} is not timed and the run exits non-zero.")
    return failed


# ------------------------------------------------------------------ measuring


def peak_memory_mb(case: Case, device: torch.device, steps: int = 3) -> list[float]:
    return common.cuda_peak_mb(case.step, device, steps)


def time_step(case: Case, device: torch.device, quick: bool) -> list[float]:
    return common.time_train_step(case.step, device, quick)


def run_provider(provider: str, cfg: Config, device: torch.device, env: dict, quick: bool,
                 p50s: dict) -> tuple[list[dict], bool]:
    """Rows for one provider on one config, and False when a lorafast provider broke."""
    rows, line = [], []
    try:
        case = BUILDERS[provider](cfg, device, noise=NOISE_MULTIPLIER, clip=MAX_GRAD_NORM, lr=LR)
        case.step()  # warm-up: first-call allocations, kernel compilation
        if device.type == "cuda":
            q = peak_memory_mb(case, device)
            rows.append(common.row(KERNEL, provider, MODE, "peak_memory", "MB", X_NAME, cfg.label, q, env))
            p50s.setdefault(cfg.label, {}).setdefault(provider, {})["peak_memory"] = q[0]
            line.append(f"peak {q[0]:,.1f} MB")
        q = time_step(case, device, quick)
        rows.append(common.row(KERNEL, provider, MODE, "time", "ms", X_NAME, cfg.label, q, env))
        p50s.setdefault(cfg.label, {}).setdefault(provider, {})["time"] = q[0]
        line.insert(0, f"p50 {q[0]:.4f} ms")
    except torch.cuda.OutOfMemoryError as e:
        common.banner(f"OUT OF MEMORY: {provider} on {cfg.label}: no row written.\n{str(e).splitlines()[0]}")
        return [], True
    except Exception as e:
        common.banner(f"SKIP {provider} on {cfg.label}: failed to run: {type(e).__name__}: {e}")
        return [], not provider.startswith("lorafast")
    finally:
        case = None
        common.free(device)
    common.log(f"{cfg.label:18s} {provider:20s} " + ", ".join(line))
    return rows, True


# ------------------------------------------------------------------ report


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _verdict(value: Optional[float], target: Optional[float], at_most: bool) -> str:
    """The ratio, with whether it meets ``target`` (none for a ratio without a target)."""
    if value is None:
        return "n/a"
    if target is None:
        return f"{value:.2f}x"
    ok = value <= target if at_most else value >= target
    return f"{value:.2f}x ({'met' if ok else 'MISSED'}: {'<=' if at_most else '>='} {target}x)"


def print_table(p50s: dict, providers: list[str], cpu: bool) -> None:
    """Medians per provider, then lorafast-dp against non-private training and against Opacus."""
    head = ["config"] + [f"{p} ms" + ("" if cpu else " / MB") for p in providers]
    lines = []
    for label, by in p50s.items():
        cells = [label]
        for p in providers:
            m = by.get(p, {})
            t, mem = m.get("time"), m.get("peak_memory")
            cells.append("-" if t is None else f"{t:.4f}" if mem is None else f"{t:.4f} / {mem:,.0f}")
        lines.append(cells)
    print("\n" + common.format_rows(head, lines))

    head = ["config", "dp/nonprivate time", "dp/nonprivate memory", "opacus/dp time", "opacus-ghost/dp time"]
    lines = []
    for label, by in p50s.items():
        get = lambda p, k: by.get(p, {}).get(k)  # noqa: E731
        dp_t, dp_m = get("lorafast-dp", "time"), get("lorafast-dp", "peak_memory")
        lines.append([label,
                      _verdict(_ratio(dp_t, get("lorafast-nonprivate", "time")), TARGET_DP_TIME, True),
                      _verdict(_ratio(dp_m, get("lorafast-nonprivate", "peak_memory")), TARGET_DP_MEMORY, True),
                      _verdict(_ratio(get("opacus", "time"), dp_t), TARGET_OPACUS_SPEEDUP, False),
                      _verdict(_ratio(get("opacus-ghost", "time"), dp_t), None, False)])
    print("\n" + common.format_rows(head, lines))
    if cpu:
        print("(CPU smoke mode: these ratios say nothing about GPU performance)")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    return common.parse_cli(argv, __doc__, KERNEL, "batch 16 only, fewer timed steps", ALL_PROVIDERS,
                            f"default: all of {' '.join(ALL_PROVIDERS)} (with --device cpu, all but {CUDA_PROVIDER})")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cpu = args.device == "cpu"
    device = common.open_device(args.device, "tiny model", "a tiny model, wall-clock timing, NO peak_memory "
                                "rows (no CUDA allocator).")
    if device is None:
        return 0
    configs = CPU_CONFIGS if cpu else QUICK_CONFIGS if args.quick else GPU_CONFIGS
    providers = resolve_providers(args.providers, device)
    env = common.env_info(device)
    common.log(f"device {env['gpu_name']} | torch {env['torch_version']} | triton {env['triton_version']} "
               f"| commit {env['commit']} | model {configs[0].model_label} | providers {' '.join(providers)}")

    # On the CPU the check runs in fp32, where the tolerance can be tight (see MAX_REL_ERR).
    failed = check_gradients(replace(configs[0], dtype=torch.float32) if cpu else configs[0], providers, device)
    timed = [p for p in providers if p not in failed]
    rows, p50s, broken = [], {}, []
    work = [(cfg, p) for cfg in configs for p in timed]
    for cfg, p in common.progress(work, desc=KERNEL):
        new, ok = run_provider(p, cfg, device, env, args.quick, p50s)
        rows += new
        if not ok:
            broken.append(f"{p} on {cfg.label}")

    out = common.write_csv(args.out or common.default_out(KERNEL, device), rows)
    print_table(p50s, timed, cpu)
    print(f"wrote {len(rows)} rows to {out}")
    if failed or broken:
        common.banner("FAILED: " + "; ".join([f"gradient check of {p}" for p in failed] + broken))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
