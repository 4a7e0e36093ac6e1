"""Sixteen non-IID clients fine-tuning one tiny Llama in one process: fedavg vs fedex vs ffa.

Every client's adapter lives in the same model (``inject_adapters(..., clients=16)``: each
target projection becomes a ``MultiLoRALinear`` over the shared frozen base), so a round's
local steps for all sixteen clients are batched steps and no client holds a model copy.
``lorafast.federated.simulate`` runs the rounds and aggregates each layer as the Flower
strategy does.

Data: client c's sequences follow a shared rule (next = 3·x + 1 mod V) half of the time and
its own rule (next = m_c·x + c mod V) otherwise, and clients hold 8 to 32 sequences: the
clients disagree, so averaging their adapters separately (fedavg) is inexact where fedex
is exact. After each round the global model (every slot then holds the global adapter) is
evaluated on every client's held-out sequences.

    python examples/federated_simulation.py [--rounds 8] [--local-steps 5] [--plot out.png] [--tiny]
"""
from __future__ import annotations

import argparse
import copy

import torch

import lorafast
from lorafast.federated import causal_lm_loss, simulate

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def client_sequences(c: int, n: int, vocab: int, seq: int, g: torch.Generator) -> torch.Tensor:
    x = torch.empty(n, seq, dtype=torch.long)
    x[:, 0] = torch.randint(vocab, (n,), generator=g)
    m = 5 + 2 * c
    for t in range(1, seq):
        own = torch.rand(n, generator=g) < 0.5
        x[:, t] = torch.where(own, (m * x[:, t - 1] + c) % vocab, (3 * x[:, t - 1] + 1) % vocab)
    return x


class Sequences(torch.utils.data.Dataset):
    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--plot", default=None, help="write the eval loss per round and method to this PNG")
    ap.add_argument("--tiny", action="store_true", help="a smaller model and fewer clients (tests)")
    args = ap.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    k = 4 if args.tiny else args.clients
    vocab, seq = 64, 16 if args.tiny else 32
    g = torch.Generator().manual_seed(0)
    train, held = [], []
    for c in range(k):
        x = client_sequences(c, 8 * (1 + c % 4) + 8, vocab, seq, g)
        train.append(Sequences(x[8:]))
        held.append(x[:8])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1 if args.tiny else 2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=seq)
    base = LlamaForCausalLM(cfg)

    def eval_fn(model):
        x = torch.cat(held)
        with lorafast.clients(model, torch.zeros(len(x), dtype=torch.int64)):   # the global adapter
            return {"eval_loss": causal_lm_loss(model, {"input_ids": x, "labels": x}).mean().item()}

    results = {}
    for method in ("fedavg", "fedex", "ffa"):
        torch.manual_seed(1)   # the same adapter init for every method
        model = lorafast.inject_adapters(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8, clients=k,
                                         variant="ffa" if method == "ffa" else "lora")
        results[method] = simulate(model, train, rounds=args.rounds, local_steps=args.local_steps, method=method,
                                   batch_size=4, lr=3e-2, eval_fn=eval_fn, progress=not args.tiny)
    print(f"{k} clients, {args.rounds} rounds × {args.local_steps} local steps; held-out loss of the global model")
    print("round  " + "  ".join(f"{m:>8}" for m in results))
    for t in range(args.rounds):
        print(f"{t + 1:5d}  " + "  ".join(f"{r.rounds[t]['eval_loss']:8.4f}" for r in results.values()))
    if args.plot:
        _plot(results, args.plot)
        print(f"chart: {args.plot}")
    return {m: r.series("eval_loss") for m, r in results.items()}


def _plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for method, r in results.items():
        ax.plot(r.series("round"), r.series("eval_loss"), marker="o", label=method)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out loss, global model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
