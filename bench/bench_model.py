"""Times one LoRA training step of a ~1B-parameter Llama-style model: PEFT against lorafast.from_peft.

The model (bench/llama_model.py): TinyLlama-1.1B's shape with random weights, bf16, wrapped by
PEFT with LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), fp32 adapters. One step
on a fixed batch of 4 × 2048 tokens (--batch, --seq, --layers): forward with labels, backward,
AdamW, zero_grad. Providers:

  peft           the PEFT model as is (nn.Linear base layer plus lora_A / lora_B modules)
  lorafast       a deep copy of it after lorafast.from_peft(model): every PEFT LoRA layer replaced
                 in place by a fused lorafast.LoRALinear sharing its parameters; backend automatic
  lorafast-cuda  the same under lorafast.use_backend("cuda"): the CUDA C++ kernels (csrc/); GPU only

Rows: time, tokens_per_s, peak_memory (bench/memory.py; the model not under test waits on the
CPU). First both models run one batch: losses within 1e-2, lora_A / lora_B gradients of three
layers within 1e-1, every layer replaced alike, under each forced backend; else nothing is timed
and the run exits 1, as when a provider raises. Target: ≥ 1.25x PEFT's speed, peak memory no
higher. `--device cpu`: a tiny model (hidden 32, 2 layers, seq 16, batch 2).

    python bench/bench_model.py [--quick] [--out PATH] [--device cuda|cpu] [--providers ...]
                                [--batch N] [--seq T] [--layers L]
"""
from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import lorafast  # before triton: on a CPU-only machine it switches Triton to its interpreter
from lorafast import _backend
from lorafast.validate import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` however the script is launched
import common  # noqa: E402
import memory  # noqa: E402
from llama_model import Config, build_peft, human, lora_layers, make_batch, trainable  # noqa: E402
from common import Case, Ratio  # noqa: E402

MODE = "train_step"
CUDA_PROVIDER = "lorafast-cuda"  # lorafast under use_backend("cuda"): GPU only
BACKEND = {CUDA_PROVIDER: "cuda"}  # a provider's forced lorafast backend (absent: automatic)
LR, B_STD, DATA_SEED = 1e-4, 0.02, 2   # AdamW's lr; lora_B ~ N(0, B_STD²) instead of zeros
# Relative errors of the check. Two correct bf16 implementations differ by bf16 rounding carried through
# every layer (about 2% on the adapter gradients of a 22-layer model); a real bug is an O(1) error.
LOSS_TOL, GRAD_TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}, {torch.bfloat16: 1e-1, torch.float32: 1e-3}
TARGET_SPEEDUP, TARGET_MEMORY = 1.25, 1.0  # peft time / lorafast time at least; lorafast peak / peft peak at most
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers chatter from PEFT


# TinyLlama-1.1B's shape: 1,100,048,384 parameters.
GPU_CONFIG = Config(hidden=2048, intermediate=5632, n_layers=22, n_heads=32, n_kv_heads=4, vocab=32000,
                    seq=2048, batch=4, r=16, lora_alpha=32)
CPU_CONFIG = Config(hidden=32, intermediate=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=128,
                    seq=16, batch=2, r=4, lora_alpha=8)


# (layer index as a function of n_layers, module path under the layer) of the checked adapters
CHECKED = ((lambda n: 0, "self_attn.q_proj"), (lambda n: n // 2, "self_attn.v_proj"),
           (lambda n: n - 1, "mlp.down_proj"))


def _loss_and_grads(model: nn.Module, ids: torch.Tensor, grads_of: Callable[[], dict]) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    out = float(loss.detach()), {k: None if g is None else g.detach().float().clone() for k, g in grads_of().items()}
    model.zero_grad(set_to_none=True)
    return out


def _judged(what: str, err: float, tol: float) -> bool:
    common.log(f"  {what} rel. err {err:.3g} (tolerance {tol:g}): {'ok' if err <= tol else 'FAILED'}")
    return err <= tol  # also catches NaN


def check_same(peft_model: nn.Module, fast_model: nn.Module, cfg: Config, device: torch.device) -> bool:
    """from_peft replaced every LoRA layer, and both models give the same loss and adapter
    gradients on one batch. Logs every finding; False when anything disagrees."""
    want, left = lora_layers(peft_model), lora_layers(fast_model)
    got = {name: m for name, m in fast_model.named_modules() if isinstance(m, lorafast.LoRALinear)}
    missing, adapter = sorted(set(want) - set(got)), peft_model.active_adapter
    n_want, n_got = sum(p.numel() for p in trainable(peft_model)), sum(p.numel() for p in trainable(fast_model))
    bad = [n for n in want.keys() & got.keys() if not math.isclose(want[n].scaling[adapter], got[n].scaling,
                                                                   rel_tol=1e-6)]
    common.log(f"check: from_peft replaced {len(got)} of {len(want)} PEFT LoRA layers by lorafast.LoRALinear"
               + (f"; {len(left)} PEFT LoRA layers remain" if left else ""))
    if missing:
        common.log(f"  FAILED: not replaced: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    common.log(f"  trainable parameters: peft {n_want:,}, lorafast {n_got:,}{'' if n_want == n_got else ': FAILED'}")
    for n in bad[:1]:
        common.log(f"  FAILED: {n}: scaling {got[n].scaling} in lorafast, {want[n].scaling[adapter]} in PEFT")
    if left or set(got) != set(want) or n_want != n_got or bad:
        return False
    paths = []
    for idx, sub in CHECKED:
        hits = [n for n in want if n.endswith(f"layers.{idx(cfg.n_layers)}.{sub}")]
        if len(hits) != 1:
            raise RuntimeError(f"expected one PEFT LoRA layer named *layers.{idx(cfg.n_layers)}.{sub}, found {hits}")
        paths += hits
    names, ids = [(p, ab) for p in paths for ab in ("lora_A", "lora_B")], make_batch(cfg, device, DATA_SEED)
    loss_want, g_want = _loss_and_grads(peft_model, ids, lambda: {
        f"{p}.{ab}": getattr(want[p], ab)[adapter].weight.grad for p, ab in names})
    loss_got, g_got = _loss_and_grads(fast_model, ids, lambda: {
        f"{p}.{ab}": getattr(got[p], ab).grad for p, ab in names})
    ok = _judged(f"loss: peft {loss_want:.6g}, lorafast {loss_got:.6g},",
                 abs(loss_got - loss_want) / max(abs(loss_want), 1e-30), LOSS_TOL[cfg.dtype])
    for k in g_want:
        if g_want[k] is None or g_got[k] is None:
            common.log(f"  grad {k}: no gradient ({'peft' if g_want[k] is None else 'lorafast'}): FAILED")
            ok = False
        else:
            err = rel_err(g_got[k], g_want[k]) if g_got[k].shape == g_want[k].shape else float("inf")
            ok &= _judged(f"grad {k.replace('base_model.model.model.', '')}:", err, GRAD_TOL[cfg.dtype])
    return bool(ok)


class ModelStepSuite(common.Suite):
    KERNEL, X_NAME, MODES = "model_step", "config", (MODE,)
    PROVIDERS, CUDA_PROVIDER = ("peft", "lorafast", CUDA_PROVIDER), CUDA_PROVIDER
    CUDA_LOST = "no CUDA rows, no CUDA check"
    PROVIDERS_NOTE = "; the check always builds both models"
    QUICK_HELP = "fewer timed steps"
    SMOKE_WHAT = "tiny model"
    SMOKE = "a tiny model, wall-clock timing, lorafast on its torch backend, peak memory counted from live tensors."
    TIMING = {"step": True, "max_rep_ms": 60_000, "cpu_warmup": 2, "cpu_reps": 10}
    CELLS = ("time", "tokens_per_s", "peak_memory")
    OOM_HINT = " (try a smaller --batch)"

    @classmethod
    def add_arguments(cls, ap):
        ap.add_argument("--batch", type=common.positive, default=None, help="sequences per step (default 4; CPU 2)")
        ap.add_argument("--seq", type=common.positive, default=None, help="tokens per sequence (default 2048; CPU 16)")
        ap.add_argument("--layers", type=common.positive, default=None, help="decoder layers (default 22; CPU 2)")

    def size_list(self, which):
        a = self.args
        changes = {k: v for k, v in (("batch", a.batch), ("seq", a.seq), ("n_layers", a.layers)) if v is not None}
        return [replace(CPU_CONFIG if which == "cpu" else GPU_CONFIG, **changes)]

    def requires(self):
        ok, versions = common.import_status("transformers", "peft")
        return ok, f"transformers AND peft ARE NEEDED ({versions}): pip install 'lorafast[hf]'"

    def header_extra(self):
        return [common.import_status("transformers", "peft")[1],
                f"lorafast backend {_backend.select('lora_linear_fwd', self.device, self.sizes[0].dtype)}"]

    def prepare(self):
        """Both models, and the check of the lorafast one (under each forced backend); 1 when anything fails."""
        if not callable(getattr(lorafast, "from_peft", None)):
            common.banner("lorafast.from_peft IS NOT AVAILABLE (this lorafast predates the PEFT interop).\nThe "
                          "lorafast provider cannot be built and the two models cannot be checked: nothing is timed.")
            return 1
        cfg, t0 = self.sizes[0], time.perf_counter()
        peft_model, n_params = build_peft(cfg, self.device, B_STD)
        self.x_label = cfg.label(n_params)
        common.log(f"model {cfg.model_label}: {n_params:,} parameters ({human(n_params)}), "
                   f"{sum(p.numel() for p in trainable(peft_model)):,} trainable in {len(lora_layers(peft_model))} "
                   f"LoRA layers; {cfg.batch}x{cfg.seq} = {cfg.tokens:,} tokens per step; built in "
                   f"{time.perf_counter() - t0:.1f} s")
        checked = "lorafast.from_peft"
        try:
            fast_model = lorafast.from_peft(copy.deepcopy(peft_model))
            for checked in ["lorafast"] + [p for p in self.providers if p in BACKEND]:
                if checked in BACKEND:
                    common.log(f"check of {checked}: lorafast backend {BACKEND[checked]!r}")
                with lorafast.use_backend(BACKEND.get(checked)):
                    if not check_same(peft_model, fast_model, cfg, self.device):
                        raise common.CheckFailed("it does not compute what the PEFT model does (see above)")
        except torch.cuda.OutOfMemoryError as e:
            common.banner(f"OUT OF MEMORY in the check (both models are on the GPU): try a smaller --batch.\n"
                          f"{common.first_line(e)}")
            return 1
        except Exception as e:
            why = str(e) if isinstance(e, common.CheckFailed) else f"it raised {type(e).__name__}: {e}"
            common.banner(f"CHECK FAILED: {checked}: {why}\nNothing is timed.")
            return 1
        common.free(self.device)
        self.models = {"peft": peft_model, "lorafast": fast_model, CUDA_PROVIDER: fast_model}

    def label(self, cfg):
        return self.x_label

    def context(self, provider):
        return lorafast.use_backend(BACKEND.get(provider))

    def build(self, provider, cfg, inputs, modes):
        """One step of the provider's model (Case.state: model, optimizer, batch)."""
        model = self.models[provider]
        if not self.cpu:  # only the model under test on the GPU
            for m in self.models.values():
                if m is not model:
                    m.to("cpu")
            common.free(self.device)
            model.to(self.device)
        opt, ids = torch.optim.AdamW(trainable(model), lr=LR), make_batch(cfg, self.device, DATA_SEED)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return Case(provider, step, state=(model, opt, ids))

    def memory(self, case, mode):
        model, opt, ids = case.state
        return memory.peak_memory_mb(case.fn, self.device, lambda: [
            *model.parameters(), *model.buffers(), *(v for s in opt.state.values() for v in s.values()), ids])

    def rates(self, cfg, mode, inputs):
        return [("tokens_per_s", "tokens/s", cfg.tokens)]

    def release(self, case):
        case.state[0].zero_grad(set_to_none=True)

    def fails_run(self, provider, check):
        return True

    def ratios(self):
        return [Ratio("peft", "lorafast", target=TARGET_SPEEDUP, at_most=False),
                Ratio("lorafast", "peft", "peak_memory", TARGET_MEMORY)]

    def info(self, cfg, inputs):
        return {"tokens": cfg.tokens, "model": cfg.model_label}


SUITE = ModelStepSuite
main = SUITE.main  # the entry point, main(argv=None) -> int, as lorafast/cli.py calls it


if __name__ == "__main__":
    sys.exit(main())
