"""Times one federated round's local step of k clients: one after another, or as one batched step.

TinyLlama-1.1B's shape (bench/llama_model.py: random weights, bf16), LoRA r=16, alpha 32 on every
linear layer but the output, fp32 adapters; k = 4, 16, 64 clients, each with its own adapter and
batch of 4 × 512 tokens. A round: each client's forward with labels, backward, AdamW step. Providers:

  peft-sequential      the PEFT model, client after client: its adapter copied in, a step with its
                       own AdamW state, the adapter copied back out
  lorafast-sequential  the same after lorafast.from_peft (fused single-adapter LoRALinear layers)
  lorafast-multi       inject_adapters(..., clients=k): the k batches as one of 4k sequences; one
                       forward, backward (of k × the mean loss: each client's own gradient) and
                       AdamW step inside `with lorafast.clients(model, client_ids)`

All share one frozen base. Rows: time per round, tokens_per_s (k·4·512 / time), peak_memory
(bench/memory.py; a sequential round's is one client's step plus the k stored adapters and AdamW
states). First, on a tiny model with k=2 (fp32 and bf16), one batch mixing both clients gives each
the loss (within 1e-4 / 1e-2) and adapter gradients (1e-3 / 1e-1) of the single-adapter model with
its adapter; else nothing is timed and the run exits 1, as when a provider raises. Targets at k=16:
lorafast-multi ≥ 3x peft-sequential's speed and ≥ 2x lorafast-sequential's, peak memory ≤ 1.15x
lorafast-sequential's. --quick: k=16; `--device cpu`: hidden 32, 2 layers, seq 16, batch 2, k=2, 3.

    python bench/bench_multi.py [--quick] [--out PATH] [--device cuda|cpu] [--providers ...]
                                [--clients K ...] [--batch N] [--seq T] [--layers L]
"""
from __future__ import annotations

import copy
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lorafast  # before triton: on a CPU-only machine it switches Triton to its interpreter
from lorafast import _backend
from lorafast.validate import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` however the script is launched
import common  # noqa: E402
import memory  # noqa: E402
from llama_model import Config, build_peft, human, make_batch, trainable  # noqa: E402
from common import Case, Ratio  # noqa: E402

MODE, PEFT, SEQ, MULTI = "local_step", "peft-sequential", "lorafast-sequential", "lorafast-multi"
LR, B_STD, DATA_SEED, CHECK_K, TARGET_K = 1e-4, 0.02, 2, 2, 16
LOSS_TOL, GRAD_TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}, {torch.bfloat16: 1e-1, torch.float32: 1e-3}
TARGET_PEFT, TARGET_SEQ, TARGET_MEMORY = 3.0, 2.0, 1.15
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers chatter from PEFT

GPU_CONFIG = Config(hidden=2048, intermediate=5632, n_layers=22, n_heads=32, n_kv_heads=4, vocab=32000,
                    seq=512, batch=4, r=16, lora_alpha=32)
CPU_CONFIG = Config(hidden=32, intermediate=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab=128,
                    seq=16, batch=2, r=4, lora_alpha=8)
CLIENTS = {"full": (4, 16, 64), "quick": (TARGET_K,), "cpu": (2, 3)}


@dataclass(frozen=True)
class Round:
    k: int        # clients
    cfg: Config   # the model, and one client's batch


def n_params(c: Config) -> int:
    """The base model's parameter count (untied embeddings), as build_peft counts it."""
    layer = 2 * c.hidden * (c.hidden + c.hidden // c.n_heads * c.n_kv_heads) + 3 * c.hidden * c.intermediate
    return 2 * c.vocab * c.hidden + c.hidden + c.n_layers * (layer + 2 * c.hidden)


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy that shares the frozen parameters (the base) and copies the adapters."""
    return copy.deepcopy(model, {id(p): p for p in model.parameters() if not p.requires_grad})


def multi_model(peft_model: nn.Module, cfg: Config, k: int) -> nn.Module:
    base = shared_copy(peft_model).unload()  # the transformers model without PEFT's layers, base shared
    return lorafast.inject_adapters(base, "all-linear", r=cfg.r, lora_alpha=cfg.lora_alpha, clients=k)


def check_multi(cfg: Config, device: torch.device) -> bool:
    """Each client's loss and adapter gradients from one batch mixing CHECK_K clients (rows shuffled)
    equal the single-adapter lorafast model's holding that client's adapter. Logs every finding."""
    peft_model, _ = build_peft(cfg, device, B_STD)
    single, multi = lorafast.from_peft(shared_copy(peft_model)), multi_model(peft_model, cfg, CHECK_K)
    one, many = ({n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, kind)}
                 for model, kind in ((single, lorafast.LoRALinear), (multi, lorafast.MultiLoRALinear)))
    common.log(f"check ({str(cfg.dtype)[6:]}): {len(many)} MultiLoRALinear layers of {CHECK_K} clients, "
               f"{len(one)} LoRALinear layers{'' if one and set(one) == set(many) else ': FAILED, not the same'}")
    if not one or set(one) != set(many):
        return False
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every client its own adapter, large enough to matter
        for m in many.values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) / m.in_features ** 0.5)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) / (2 * m.r ** 0.5))
    batches = [make_batch(cfg, device, DATA_SEED + c) for c in range(CHECK_K)]
    perm = torch.randperm(CHECK_K * cfg.batch, generator=g).to(device)
    rows, cids = torch.cat(batches)[perm], torch.arange(CHECK_K, device=device).repeat_interleave(cfg.batch)[perm]
    with lorafast.clients(multi, cids):
        logits = multi(input_ids=rows).logits
    losses = [F.cross_entropy(logits[cids == c, :-1].flatten(0, 1).float(), rows[cids == c, 1:].flatten())
              for c in range(CHECK_K)]
    sum(losses).backward()
    flat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
    ok = True
    for c in range(CHECK_K):
        with torch.no_grad():
            for n, m in one.items():
                m.lora_A.copy_(many[n].lora_A[c])
                m.lora_B.copy_(many[n].lora_B[c])
        single.zero_grad(set_to_none=True)
        loss = single(input_ids=batches[c], labels=batches[c]).loss
        loss.backward()
        want, got = loss.item(), losses[c].item()
        grads = [flat(t for n in one for t in (many[n].lora_A.grad[c], many[n].lora_B.grad[c])),
                 flat(t for m in one.values() for t in (m.lora_A.grad, m.lora_B.grad))]
        for what, err, tol in ((f"loss: single {want:.6g}, multi {got:.6g},", abs(got - want) / abs(want), LOSS_TOL),
                               ("adapter gradients:", rel_err(*grads), GRAD_TOL)):
            common.log(f"  client {c} {what} rel. err {err:.3g} (tolerance {tol[cfg.dtype]:g}): "
                       f"{'ok' if err <= tol[cfg.dtype] else 'FAILED'}")
            ok &= err <= tol[cfg.dtype]  # also catches NaN
    return bool(ok)


class MultiRoundSuite(common.Suite):
    KERNEL, X_NAME, MODES = "multi_lora_round", "config", (MODE,)
    PROVIDERS, BASELINE = (PEFT, SEQ, MULTI), PEFT
    QUICK_HELP = f"k={TARGET_K} only, fewer timed rounds"
    SMOKE_WHAT = "tiny model"
    SMOKE = "a tiny model, wall-clock timing, lorafast on its torch backend, peak memory counted from live tensors."
    TIMING = {"step": True, "max_rep_ms": 60_000, "cpu_warmup": 1, "cpu_reps": 7}
    CELLS = ("time", "tokens_per_s", "peak_memory")
    OOM_HINT = " (try fewer --clients or a smaller --batch)"

    @classmethod
    def add_arguments(cls, ap):
        ap.add_argument("--clients", type=common.positive, nargs="+", default=None, help="k (default 4 16 64; CPU 2 3)")
        ap.add_argument("--batch", type=common.positive, default=None, help="sequences per client (default 4; CPU 2)")
        ap.add_argument("--seq", type=common.positive, default=None, help="tokens per sequence (default 512; CPU 16)")
        ap.add_argument("--layers", type=common.positive, default=None, help="decoder layers (default 22; CPU 2)")

    def size_list(self, which):
        a = self.args
        changes = {k: v for k, v in (("batch", a.batch), ("seq", a.seq), ("n_layers", a.layers)) if v is not None}
        cfg = replace(CPU_CONFIG if which == "cpu" else GPU_CONFIG, **changes)
        return [Round(k, cfg) for k in a.clients or CLIENTS[which]]

    def label(self, x):
        return f"clients={x.k},{x.cfg.label(n_params(x.cfg))}"

    def requires(self):
        ok, versions = common.import_status("transformers", "peft")
        return ok, f"transformers AND peft ARE NEEDED ({versions}): pip install 'lorafast[hf]'"

    def header_extra(self):
        return [common.import_status("transformers", "peft")[1],
                f"lorafast backend {_backend.select('lora_linear_multi_fwd', self.device, self.sizes[0].cfg.dtype)}"]

    def prepare(self):
        """The check on a tiny model (fp32 and bf16), then the shared PEFT model; 1 when the check fails."""
        try:
            ok = all(check_multi(replace(CPU_CONFIG, dtype=dt), self.device) for dt in (torch.float32, torch.bfloat16))
            why = "it does not compute each client's single-adapter step (see above)"
        except Exception as e:
            ok, why = False, f"it raised {type(e).__name__}: {e}"
        if not ok:
            common.banner(f"CHECK FAILED: {MULTI}: {why}\nNothing is timed.")
            return 1
        cfg = self.sizes[0].cfg
        self.peft_model, n = build_peft(cfg, self.device, B_STD)
        assert n == n_params(cfg), (n, n_params(cfg))
        common.log(f"model {cfg.model_label}: {n:,} parameters ({human(n)}); {cfg.batch}x{cfg.seq} = "
                   f"{cfg.tokens:,} tokens per client")
        common.free(self.device)

    def inputs(self, x):
        batches = [make_batch(x.cfg, self.device, DATA_SEED + c) for c in range(x.k)]
        return batches, torch.cat(batches), torch.arange(x.k, device=self.device).repeat_interleave(x.cfg.batch)

    def build(self, provider, x, inputs, modes):
        """One round of the provider (Case.state: its model, and every tensor it keeps). Sequential: each
        client's adapter copied in, a step with the client's own AdamW state, the adapter copied back out."""
        batches, rows, cids = inputs
        model = (multi_model(self.peft_model, x.cfg, x.k) if provider == MULTI else self.peft_model
                 if provider == PEFT else lorafast.from_peft(shared_copy(self.peft_model)))
        params = trainable(model)
        opt = torch.optim.AdamW(params, lr=LR)
        saved = [] if provider == MULTI else [[p.detach().clone() for p in params] for _ in batches]
        states = [defaultdict(dict) for _ in saved]

        def update(loss):
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def batched():
            with lorafast.clients(model, cids):  # k × the mean loss: each client's gradient is its own loss's
                update(model(input_ids=rows, labels=rows).loss * x.k)

        def sequential():
            for ids, adapter, state in zip(batches, saved, states):
                with torch.no_grad():
                    torch._foreach_copy_(params, adapter)
                opt.state = state
                update(model(input_ids=ids, labels=ids).loss)
                with torch.no_grad():
                    torch._foreach_copy_(adapter, params)

        def kept():
            return [*model.parameters(), *model.buffers(), *batches, rows, cids, *(t for a in saved for t in a),
                    *(v for s in (opt.state, *states) for d in s.values() for v in d.values())]
        return Case(provider, batched if provider == MULTI else sequential, state=(model, kept))

    def memory(self, case, mode):
        return memory.peak_memory_mb(case.fn, self.device, case.state[1])

    def rates(self, x, mode, inputs):
        return [("tokens_per_s", "tokens/s", x.k * x.cfg.tokens)]

    def release(self, case):
        case.state[0].zero_grad(set_to_none=True)

    def fails_run(self, provider, check):
        return True

    def ratios(self):
        at = self.label(Round(TARGET_K, self.sizes[0].cfg))
        return [Ratio(PEFT, MULTI, target=TARGET_PEFT, at_most=False, at=at),
                Ratio(SEQ, MULTI, target=TARGET_SEQ, at_most=False, at=at),
                Ratio(MULTI, SEQ, "peak_memory", TARGET_MEMORY, at=at)]

    def info(self, x, inputs):
        return {"tokens": x.k * x.cfg.tokens, "clients": x.k, "model": x.cfg.model_label}


SUITE = MultiRoundSuite
main = SUITE.main  # the entry point, main(argv=None) -> int, as lorafast/cli.py calls it


if __name__ == "__main__":
    sys.exit(main())
