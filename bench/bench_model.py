"""Times one LoRA training step of a ~1B-parameter Llama-style model: PEFT against lorafast.from_peft.

The model is a transformers LlamaForCausalLM built from a LlamaConfig with random
weights (nothing is downloaded): the TinyLlama-1.1B shape, hidden=2048,
intermediate=5632, 22 layers, 32 attention heads and 4 key/value heads, vocab 32000,
untied embeddings, 1.10B parameters, attn_implementation="sdpa", bf16 weights. PEFT
wraps it with LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
lora_dropout=0.0): 154 adapted linears (7 per layer), 12.6M trainable parameters, in
fp32 (PEFT's default, autocast_adapter_dtype=True). lora_B starts random, N(0, 0.02²),
instead of PEFT's zeros, so that the adapters change the output and A has a gradient.
Sequence 2048, batch 4 (--batch, --seq, --layers change them). Providers:

  peft           the PEFT model as is (nn.Linear base layer plus lora_A / lora_B modules)
  lorafast       a deep copy of the same PEFT model after lorafast.from_peft(model), which
                 replaces every PEFT LoRA layer in place by a fused lorafast.LoRALinear that
                 shares its parameter tensors; lorafast picks its backend as usual
                 (automatic selection on the GPU)
  lorafast-cuda  the same lorafast model under lorafast.use_backend("cuda"): the CUDA C++
                 kernels (csrc/). GPU only: not in the CPU smoke mode's default, and
                 skipped with a banner where lorafast._backend.cuda_status() says the CUDA
                 backend cannot run (or with --device cpu)

One step = forward with labels (the causal-LM loss, mean over tokens), backward,
AdamW (lr 1e-4, torch defaults otherwise) over the trainable parameters, then
zero_grad(set_to_none=True), on a fixed batch of random token ids (labels = inputs).
Metrics per provider, x_name `config`, x_value e.g. `params=1.10B,seq=2048,batch=4,r=16`:

  time          ms per step: CUDA events through triton.testing.do_bench (p50/p20/p80)
  tokens_per_s  batch·seq / time (the time's p80 gives the rate's p20)
  peak_memory   MB (2**20 bytes): torch.cuda.max_memory_allocated over one step after
                reset_peak_memory_stats, 3 steps. It counts every live tensor: the
                resident model, AdamW's state, the batch and the activations saved for
                backward. While one provider runs the other model waits on the CPU, so
                neither is charged for the other (lorafast and lorafast-cuda share one).

Before timing, the two models (identical weights) run forward and backward on the same
batch: the losses must agree to a relative 1e-2, the lora_A / lora_B gradients of three
adapted layers (the first q_proj, a middle v_proj, the last down_proj) to a relative
(Frobenius) error of 1e-1 (two correct bf16 models differ by a few percent after 22
layers, a bug by O(1); 1e-4 and 1e-3 in fp32), and from_peft must have replaced every
PEFT LoRA layer by a lorafast.LoRALinear with the same scaling and the same number of
trainable parameters. With lorafast-cuda the loss and gradient check runs a second time,
under backend "cuda". Otherwise nothing is timed and the run exits 1.

Target: the lorafast step at least 1.25x faster than PEFT's, with a peak memory no higher.

    python bench/bench_model.py [--quick] [--out PATH] [--device cuda|cpu] [--providers ...]
                                [--batch N] [--seq T] [--layers L]

--batch (default 4), --seq (default 2048) and --layers (default 22) change the batch and
the model in either mode; --quick times fewer steps (10 instead of 30). Without a GPU
only `--device cpu` runs anything: a tiny model (hidden=32, 2 layers, 4 heads, 2
key/value heads, intermediate=64, vocab 128, r=4, alpha=8, seq 16, batch 2, bf16) timed
with a wall clock, lorafast on its torch backend, and peak_memory the peak bytes of live
tensor storages that a dispatch mode counts (LiveBytes below: resident model, optimizer
state and batch, plus every tensor an op returns until it is freed; not temporaries
inside one op), so that the script itself can be tested.

Exit status: 0 when every provider ran (or was skipped: out of memory, no CUDA backend);
1 when lorafast.from_peft is missing, the check fails, or a provider raises.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lorafast  # before triton: on a CPU-only machine it switches Triton to its interpreter
from lorafast import _backend
from lorafast.validate import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` however the script is launched
import common  # noqa: E402

KERNEL = "model_step"
MODE = "train_step"
X_NAME = "config"
ALL_PROVIDERS = ("peft", "lorafast", "lorafast-cuda")
CUDA_PROVIDER = "lorafast-cuda"  # lorafast under use_backend("cuda"): GPU only
BACKEND = {CUDA_PROVIDER: "cuda"}  # a provider's forced lorafast backend (absent: automatic)
LR = 1e-4
B_STD = 0.02          # lora_B ~ N(0, B_STD²) instead of zeros
DATA_SEED = 2
# The check: relative error of the loss, and of each checked adapter gradient (Frobenius).
# Two correct bf16 implementations differ by bf16 rounding carried through every layer: on
# a 22-layer model (hidden 256, CPU, lorafast's torch backend) the adapter gradients of
# PEFT and lorafast differ by about 2%. A real bug (a wrong scaling, a missing, stale or
# transposed adapter) is an O(1) error.
LOSS_TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}
GRAD_TOL = {torch.bfloat16: 1e-1, torch.float32: 1e-3}

TARGET_SPEEDUP = 1.25  # peft time / lorafast time, at least
TARGET_MEMORY = 1.0    # lorafast peak / peft peak, at most

# transformers deprecation chatter from PEFT's wrapping, repeated on every run.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


@dataclass(frozen=True)
class Config:
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    seq: int
    batch: int
    r: int
    lora_alpha: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def label(self, n_params: int) -> str:
        return f"params={human(n_params)},seq={self.seq},batch={self.batch},r={self.r}"

    @property
    def model_label(self) -> str:
        return (f"hidden={self.hidden},intermediate={self.intermediate},n_layers={self.n_layers},"
                f"n_heads={self.n_heads},n_kv_heads={self.n_kv_heads},vocab={self.vocab},"
                f"r={self.r},lora_alpha={self.lora_alpha},{str(self.dtype).replace('torch.', '')}")


# TinyLlama-1.1B's shape: 1,100,048,384 parameters.
GPU_CONFIG = Config(hidden=2048, intermediate=5632, n_layers=22, n_heads=32, n_kv_heads=4, vocab=32000,
                    seq=2048, batch=4, r=16, lora_alpha=32)
CPU_CONFIG = Config(hidden=32, intermediate=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=128,
                    seq=16, batch=2, r=4, lora_alpha=8)


def human(n: int) -> str:
    """1100048384 -> '1.10B', 37536 -> '37.5K'."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:#.3g}".rstrip(".") + suffix if n < 100 * div else f"{n / div:.0f}{suffix}"
    return str(n)


# ------------------------------------------------------------------ libraries


def library_status() -> tuple[bool, str]:
    """(usable, versions or why not) for transformers and peft."""
    try:
        import peft
        import transformers
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"
    return True, f"transformers {transformers.__version__}, peft {peft.__version__}"


def from_peft_status() -> tuple[bool, str]:
    if callable(getattr(lorafast, "from_peft", None)):
        return True, "ok"
    return False, "lorafast has no from_peft (this lorafast predates the PEFT interop)"


def resolve_providers(requested: Optional[list[str]], device: torch.device) -> list[str]:
    """The requested providers in ALL_PROVIDERS order, the CUDA one dropped loudly where it
    cannot run; the CPU default leaves it out."""
    default = common.default_providers(ALL_PROVIDERS, CUDA_PROVIDER, device)
    wanted = [p for p in ALL_PROVIDERS if p in (requested or default)]
    wanted = common.drop_unusable_cuda(wanted, CUDA_PROVIDER, device, "no CUDA rows, no CUDA check")
    return wanted


# ------------------------------------------------------------------ models and data


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA layers by module path."""
    from peft.tuners.lora import LoraLayer
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def fast_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, lorafast.LoRALinear)}


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_peft(cfg: Config, device: torch.device) -> tuple[nn.Module, int]:
    """The seeded PEFT model on ``device`` in train mode, and the base model's parameter count."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab,
                         max_position_embeddings=max(2048, cfg.seq), tie_word_embeddings=False,
                         use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=cfg.dtype, attn_implementation="sdpa")
    n_params = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                                            lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for lin in layer.lora_B.values():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * B_STD)
    model.train()
    return model, n_params


def make_batch(cfg: Config, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(DATA_SEED)
    return torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device)


# ------------------------------------------------------------------ the check


# (layer index as a function of n_layers, module path under the layer) of the checked adapters
CHECKED = ((lambda n: 0, "self_attn.q_proj"), (lambda n: n // 2, "self_attn.v_proj"),
           (lambda n: n - 1, "mlp.down_proj"))


def _checked_paths(peft_model: nn.Module, n_layers: int) -> list[str]:
    names = list(lora_layers(peft_model))
    out = []
    for idx, sub in CHECKED:
        suffix = f"layers.{idx(n_layers)}.{sub}"
        hits = [n for n in names if n.endswith(suffix)]
        if len(hits) != 1:
            raise RuntimeError(f"expected one PEFT LoRA layer named *{suffix}, found {hits}")
        out.append(hits[0])
    return out


def _loss_and_grads(model: nn.Module, ids: torch.Tensor, grads_of: Callable[[], dict]) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out = float(loss.detach()), {k: None if g is None else g.detach().float().clone()
                                 for k, g in grads_of().items()}
    model.zero_grad(set_to_none=True)
    return out


def check_same(peft_model: nn.Module, fast_model: nn.Module, cfg: Config, device: torch.device) -> bool:
    """from_peft replaced every LoRA layer, and both models give the same loss and adapter
    gradients on one batch. Logs every finding; False when anything disagrees."""
    ok = True
    want, got = lora_layers(peft_model), fast_layers(fast_model)
    left = lora_layers(fast_model)
    common.log(f"check: from_peft replaced {len(got)} of {len(want)} PEFT LoRA layers by lorafast.LoRALinear"
               + (f"; {len(left)} PEFT LoRA layers remain" if left else ""))
    if set(got) != set(want) or left:
        missing = sorted(set(want) - set(got))[:3]
        common.log(f"  FAILED: not replaced: {missing}{' ...' if len(set(want) - set(got)) > 3 else ''}")
        ok = False
    n_want, n_got = sum(p.numel() for p in trainable(peft_model)), sum(p.numel() for p in trainable(fast_model))
    common.log(f"  trainable parameters: peft {n_want:,}, lorafast {n_got:,}"
               f"{'' if n_want == n_got else ': FAILED'}")
    ok &= n_want == n_got
    adapter = peft_model.active_adapter
    for name in want.keys() & got.keys():
        s_want, s_got = want[name].scaling[adapter], got[name].scaling
        if not math.isclose(s_want, s_got, rel_tol=1e-6):
            common.log(f"  FAILED: {name}: scaling {s_got} in lorafast, {s_want} in PEFT")
            ok = False
            break
    if not ok:
        return False

    paths = _checked_paths(peft_model, cfg.n_layers)

    def peft_grads():
        return {f"{p}.{ab}": getattr(want[p], ab)[adapter].weight.grad for p in paths for ab in ("lora_A", "lora_B")}

    def fast_grads():
        return {f"{p}.{ab}": getattr(got[p], ab).grad for p in paths for ab in ("lora_A", "lora_B")}

    loss_want, g_want = _loss_and_grads(peft_model, make_batch(cfg, device), peft_grads)
    loss_got, g_got = _loss_and_grads(fast_model, make_batch(cfg, device), fast_grads)
    loss_tol, grad_tol = LOSS_TOL[cfg.dtype], GRAD_TOL[cfg.dtype]
    loss_err = abs(loss_got - loss_want) / max(abs(loss_want), 1e-30)
    loss_ok = loss_err <= loss_tol  # also catches NaN
    common.log(f"  loss: peft {loss_want:.6g}, lorafast {loss_got:.6g}, rel. err {loss_err:.3g} "
               f"(tolerance {loss_tol:g}): {'ok' if loss_ok else 'FAILED'}")
    ok &= loss_ok
    for k in g_want:
        if g_want[k] is None or g_got[k] is None:
            common.log(f"  grad {k}: no gradient ({'peft' if g_want[k] is None else 'lorafast'}): FAILED")
            ok = False
            continue
        err = rel_err(g_got[k], g_want[k]) if g_got[k].shape == g_want[k].shape else float("inf")
        common.log(f"  grad {k.replace('base_model.model.model.', '')}: rel. err {err:.3g} "
                   f"(tolerance {grad_tol:g}): {'ok' if err <= grad_tol else 'FAILED'}")
        ok &= err <= grad_tol
    return bool(ok)


# ------------------------------------------------------------------ measuring


@dataclass
class Case:
    """One provider's model with its optimizer and batch, ready to step."""
    provider: str
    model: nn.Module
    opt: torch.optim.Optimizer
    inputs: list[torch.Tensor]
    step: Callable[[], None]


def make_case(provider: str, model: nn.Module, cfg: Config, device: torch.device) -> Case:
    opt = torch.optim.AdamW(trainable(model), lr=LR)
    ids = make_batch(cfg, device)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return Case(provider, model, opt, [ids], step)


class LiveBytes(TorchDispatchMode):
    """The CPU stand-in for max_memory_allocated: the peak over a region of the bytes of
    live tensor storages, counting ``resident`` (model, optimizer state, batch) from the
    start and every storage an op returns from then on until it is freed. Views share
    their base's storage and count once. Temporaries inside one op (a fused op's
    workspace) are not seen, nor is the allocator's cache."""

    def __init__(self, resident):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        for t in resident:
            self._add(t)
        self.peak = sum(self.live.values())

    def _add(self, t) -> None:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            try:
                st = t.untyped_storage()
            except (NotImplementedError, RuntimeError):  # sparse and other storage-less tensors
                return
            self.live.setdefault(StorageWeakRef(st), st.nbytes())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for k in [k for k in self.live if k.expired()]:
            del self.live[k]
        for t in tree_leaves(out):
            self._add(t)
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def peak_memory_mb(case: Case, device: torch.device, steps: int = 3) -> list[float]:
    """(p50, p20, p80) MB (2**20 bytes) of the peak over one step: the CUDA allocator's
    max_memory_allocated, or on the CPU LiveBytes's peak."""
    if device.type == "cuda":
        return common.cuda_peak_mb(case.step, device, steps)
    peaks = []
    for _ in range(steps):
        state = [v for s in case.opt.state.values() for v in s.values()]
        with LiveBytes([*case.model.parameters(), *case.model.buffers(), *state, *case.inputs]) as mode:
            case.step()
        peaks.append(mode.peak / 2 ** 20)
    return common._quantiles(peaks)


def time_step(case: Case, device: torch.device, quick: bool) -> list[float]:
    """(p50, p20, p80) ms per step (see common.time_train_step)."""
    return common.time_train_step(case.step, device, quick, max_rep_ms=60_000, cpu_warmup=2, cpu_reps=10)


def run_provider(provider: str, model: nn.Module, cfg: Config, label: str, device: torch.device,
                 env: dict, quick: bool, p50s: dict) -> tuple[list[dict], bool]:
    """Rows for one provider, and False when it raised (out of memory is not a failure)."""
    rows, mine, line = [], p50s.setdefault(provider, {}), []
    case = None
    try:
        case = make_case(provider, model, cfg, device)
        case.step()  # warm-up: AdamW's state, kernel compilation and autotuning
        q = peak_memory_mb(case, device)
        rows.append(common.row(KERNEL, provider, MODE, "peak_memory", "MB", X_NAME, label, q, env))
        mine["peak_memory"] = q[0]
        line.append(f"peak {q[0]:,.1f} MB")
        q = time_step(case, device, quick)
        rate = common._rate(q, cfg.tokens)
        rows.append(common.row(KERNEL, provider, MODE, "time", "ms", X_NAME, label, q, env))
        rows.append(common.row(KERNEL, provider, MODE, "tokens_per_s", "tokens/s", X_NAME, label, rate, env))
        mine["time"], mine["tokens_per_s"] = q[0], rate[0]
        line[:0] = [f"p50 {q[0]:,.2f} ms", f"{rate[0]:,.0f} tokens/s"]
    except torch.cuda.OutOfMemoryError as e:
        common.banner(f"OUT OF MEMORY: {provider} on {label}: no row written (try a smaller --batch).\n"
                      f"{str(e).splitlines()[0]}")
        return [], True
    except Exception as e:
        common.banner(f"FAILED: {provider} on {label} raised {type(e).__name__}: {e}")
        return [], False
    finally:
        case = None
        model.zero_grad(set_to_none=True)
        common.free(device)
    common.log(f"{provider:13s} " + ", ".join(line))
    return rows, True


# ------------------------------------------------------------------ report


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _verdict(value: Optional[float], target: float, at_most: bool) -> tuple[str, Optional[bool]]:
    if value is None:
        return "n/a", None
    ok = value <= target if at_most else value >= target
    return f"{value:.3f}x ({'met' if ok else 'MISSED'}: {'<=' if at_most else '>='} {target}x)", ok


def print_table(p50s: dict, label: str, cpu: bool) -> None:
    head = ["provider", "step ms (p50)", "tokens/s", "peak MB"]
    lines = []
    for p in ALL_PROVIDERS:
        m = p50s.get(p)
        if not m:
            continue
        fmt = lambda k, f: f.format(m[k]) if k in m else "-"  # noqa: E731
        lines.append([p, fmt("time", "{:,.2f}"), fmt("tokens_per_s", "{:,.0f}"), fmt("peak_memory", "{:,.1f}")])
    print(f"\n{label}" + (" (CPU timings, tiny smoke model)" if cpu else ""))
    print(common.format_rows(head, lines))

    get = lambda p, k: p50s.get(p, {}).get(k)  # noqa: E731
    speed, speed_ok = _verdict(_ratio(get("peft", "time"), get("lorafast", "time")), TARGET_SPEEDUP, False)
    mem, mem_ok = _verdict(_ratio(get("lorafast", "peak_memory"), get("peft", "peak_memory")), TARGET_MEMORY, True)
    print("\n" + common.format_rows(["config", "speedup (peft/lorafast time)", "memory (lorafast/peft peak)"],
                                    [[label, speed, mem]]))
    target = f"step >= {TARGET_SPEEDUP}x faster than PEFT with peak memory no higher"
    if speed_ok is None or mem_ok is None:
        print(f"target ({target}): n/a, a provider is missing")
    else:
        print(f"target ({target}): {'MET' if speed_ok and mem_ok else 'MISSED'}")
    if cpu:
        print("(CPU smoke mode: these ratios say nothing about GPU performance)")


# ------------------------------------------------------------------ main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; CPU 2)")
    extra.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; CPU 16)")
    extra.add_argument("--layers", type=int, default=None, help="decoder layers (default 22; CPU 2)")
    own, rest = extra.parse_known_args(argv)
    args = common.parse_cli(rest, __doc__, KERNEL, "fewer timed steps", ALL_PROVIDERS,
                            f"default: all of {' '.join(ALL_PROVIDERS)} (with --device cpu, all but "
                            f"{CUDA_PROVIDER}; the check always builds both models)")
    for k, v in vars(own).items():
        if v is not None and v < 1:
            raise SystemExit(f"--{k} must be >= 1, got {v}")
        setattr(args, k, v)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cpu = args.device == "cpu"
    device = common.open_device(args.device, "tiny model", "a tiny model, wall-clock timing, lorafast on its "
                                "torch backend, peak memory counted from live tensors.")
    if device is None:
        return 0
    cfg = CPU_CONFIG if cpu else GPU_CONFIG
    cfg = replace(cfg, **{k: v for k in ("batch", "seq") if (v := getattr(args, k)) is not None})
    if args.layers is not None:
        cfg = replace(cfg, n_layers=args.layers)
    providers = resolve_providers(args.providers, device)

    ok, versions = library_status()
    if not ok:
        common.banner(f"transformers AND peft ARE NEEDED ({versions}): pip install 'lorafast[hf]'")
        return 1
    ok, why = from_peft_status()
    if not ok:
        common.banner(f"lorafast.from_peft IS NOT AVAILABLE ({why}).\nThe lorafast provider cannot be built "
                      "and the two models cannot be checked: nothing is timed.")
        return 1
    env = common.env_info(device)
    backend = _backend.select("lora_linear", device, cfg.dtype)
    common.log(f"device {env['gpu_name']} | torch {env['torch_version']} | triton {env['triton_version']} "
               f"| {versions} | commit {env['commit']} | lorafast backend {backend}")

    t0 = time.perf_counter()
    peft_model, n_params = build_peft(cfg, device)
    label = cfg.label(n_params)
    n_train = sum(p.numel() for p in trainable(peft_model))
    common.log(f"model {cfg.model_label}: {n_params:,} parameters ({human(n_params)}), {n_train:,} trainable "
               f"in {len(lora_layers(peft_model))} LoRA layers; {cfg.batch}x{cfg.seq} = {cfg.tokens:,} tokens "
               f"per step; built in {time.perf_counter() - t0:.1f} s")
    try:
        fast_model = lorafast.from_peft(copy.deepcopy(peft_model))
    except Exception as e:
        common.banner(f"FAILED: lorafast.from_peft raised {type(e).__name__}: {e}\nNothing is timed.")
        return 1
    try:
        for checked in ["lorafast"] + [p for p in providers if p in BACKEND]:
            if checked in BACKEND:
                common.log(f"check of {checked}: lorafast backend {BACKEND[checked]!r}")
            with lorafast.use_backend(BACKEND.get(checked)):
                same = check_same(peft_model, fast_model, cfg, device)
            if not same:
                break
    except torch.cuda.OutOfMemoryError as e:
        common.banner(f"OUT OF MEMORY in the check (both models are on the GPU): try a smaller --batch.\n"
                      f"{str(e).splitlines()[0]}")
        return 1
    except Exception as e:
        common.banner(f"CHECK FAILED: {checked}: it raised {type(e).__name__}: {e}\nNothing is timed.")
        return 1
    if not same:
        common.banner(f"CHECK FAILED: lorafast.from_peft's model ({checked}) does not compute what the PEFT "
                      "model does (see above).\nNothing is timed.")
        return 1
    common.free(device)

    models = {"peft": peft_model, "lorafast": fast_model, CUDA_PROVIDER: fast_model}
    rows, p50s, broken = [], {}, []
    for p in common.progress(providers, desc=KERNEL):
        if device.type == "cuda":  # only the model under test on the GPU
            for m in models.values():
                if m is not models[p]:
                    m.to("cpu")
            common.free(device)
            models[p].to(device)
        with lorafast.use_backend(BACKEND.get(p)):
            new, ok = run_provider(p, models[p], cfg, label, device, env, args.quick, p50s)
        rows += new
        if not ok:
            broken.append(p)

    out = common.write_csv(args.out or common.default_out(KERNEL, device), rows)
    print_table(p50s, label, cpu)
    print(f"wrote {len(rows)} rows to {out}")
    if broken:
        common.banner("FAILED: " + ", ".join(broken) + " raised")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
