"""Checking privacy on a tiny Llama: the one-run audit's ε lower bound next to the accountant's ε.

Three DP-SGD runs of the same model (LoRA adapters on q_proj and v_proj, synthetic next-token
data), each audited by ``lorafast.dp.audit.PrivacyAudit`` with gradient canaries:

* ``dp-sgd``: the real engine at noise multiplier σ. The lower bound must stay below ε.
* ``noise removed``: the same run with the noise silently dropped (the accountant still
  believes σ): a bug of the kind an audit exists to catch. The lower bound exceeds ε.
* ``ffa, no noise``: FFA-LoRA (A frozen and random, only B trains) with clipping and no noise:
  the accountant's ε is infinite, and the implicit-noise diagnostic
  (``lorafast.dp.implicit_noise``) says what noise the random projection would amount to if
  it were fresh each step. The audit shows what that is worth as a guarantee.

    python examples/privacy_audit.py [--canaries 2000] [--epochs 4] [--sigma 1.5] [--tiny]
"""
from __future__ import annotations

import argparse
import math

import torch

import lorafast
from lorafast.dp import DPOptimizer, PrivacyEngine
from lorafast.dp import implicit_noise
from lorafast.dp.audit import PrivacyAudit

TARGETS = ["q_proj", "v_proj"]
DELTA = 1e-5


def sequences(n: int, vocab: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """next = 3·x + 1 mod V, with one token in four random."""
    x = torch.empty(n, seq, dtype=torch.long)
    x[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(1, seq):
        rule = (3 * x[:, t - 1] + 1) % vocab
        x[:, t] = torch.where(torch.rand(n, generator=g) < 0.75, rule, torch.randint(vocab, (n,), generator=g))
    return x


class Sequences(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def tiny_llama(vocab: int, seq: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq)
    return LlamaForCausalLM(cfg)


class _NoNoise:
    """The broken mechanism: DPOptimizer adds no noise, the accountant is not told."""

    def __enter__(self):
        self.original = DPOptimizer.noise_std
        DPOptimizer.noise_std = property(lambda self: 0.0)

    def __exit__(self, *exc):
        DPOptimizer.noise_std = self.original


def audited_run(data, *, variant: str, sigma: float, canaries: int, epochs: int, batch_size: int, layers: int,
                vocab: int, seq: int):
    """Train privately with a PrivacyAudit attached; returns (model, report)."""
    model = lorafast.inject_adapters(tiny_llama(vocab, seq, layers), TARGETS, r=8, lora_alpha=16, variant=variant)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                             noise_multiplier=sigma, max_grad_norm=1.0)
    with PrivacyAudit(engine, canaries=canaries) as audit:
        for _ in range(epochs):
            for batch in loader:
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad()
    return model, audit.report(DELTA)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--canaries", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=1.5)
    ap.add_argument("--tiny", action="store_true", help="fewer canaries, steps and layers (tests)")
    args = ap.parse_args(argv)
    vocab, seq = 64, 16
    n, batch_size, layers = (64, 8, 1) if args.tiny else (256, 16, 2)
    canaries = min(args.canaries, 300) if args.tiny else args.canaries
    epochs = min(args.epochs, 2) if args.tiny else args.epochs
    data = Sequences(sequences(n, vocab, seq, torch.Generator().manual_seed(0)))
    common = dict(canaries=canaries, epochs=epochs, batch_size=batch_size, layers=layers, vocab=vocab, seq=seq)

    reports = {}
    _, reports["dp-sgd"] = audited_run(data, variant="lora", sigma=args.sigma, **common)
    with _NoNoise():
        _, reports["noise removed"] = audited_run(data, variant="lora", sigma=args.sigma, **common)
    ffa, reports["ffa, no noise"] = audited_run(data, variant="ffa", sigma=0.0, **common)

    steps = reports["dp-sgd"].steps
    print(f"tiny Llama, LoRA r=8 on {'+'.join(TARGETS)}, {n} sequences, q = {batch_size / n:g}, {steps} steps, "
          f"C = 1, δ = {DELTA:g}; {canaries} gradient canaries, 95% confidence")
    print(f"{'run':<15} {'accountant ε':>12} {'audit ε ≥':>10} {'right/guesses':>14}  verdict")
    for name, r in reports.items():
        claim = "∞" if math.isinf(r.epsilon) else f"{r.epsilon:.3f}"
        verdict = "consistent" if r.consistent else "VIOLATION"
        print(f"{name:<15} {claim:>12} {r.epsilon_lower_bound:>10.3f} {f'{r.correct}/{r.guesses}':>14}  {verdict}")
    # what the frozen random A of the FFA run would amount to as DP-SGD noise, if it were fresh
    # each step: the implicit-noise diagnostic on one batch (C: the largest per-sample norm), at the run's q and steps
    fresh = lorafast.inject_adapters(tiny_llama(vocab, seq, layers), TARGETS, r=8, lora_alpha=16, variant="ffa")
    batch = {"input_ids": data.tokens[:batch_size], "labels": data.tokens[:batch_size]}
    noise = implicit_noise(fresh, batch, sample_rate=batch_size / n, steps=steps, delta=DELTA)
    sig = [r.noise_multiplier for r in noise.values()]
    eps = [r.epsilon for r in noise.values()]
    print(f"ffa implicit noise (a diagnostic): σ_eff {min(sig):.3g}–{max(sig):.3g} over {len(noise)} layers, "
          f"'implied' ε {min(eps):.3g}–{max(eps):.3g}; the audit above rules out "
          f"ε ≤ {reports['ffa, no noise'].epsilon_lower_bound:.3g}")
    return {"reports": reports, "ffa_model": ffa, "data": data, "implicit_noise": noise}


if __name__ == "__main__":
    main()
