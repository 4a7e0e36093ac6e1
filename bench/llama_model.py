"""The Llama-style causal LM that bench/bench_model.py trains, PEFT-wrapped, with random weights.

``Config`` is the model's shape and the step's batch; ``build_peft`` builds a transformers
LlamaForCausalLM from a LlamaConfig (nothing is downloaded: random, seeded weights, untied
embeddings, sdpa attention) and wraps it with PEFT's LoraConfig(target_modules="all-linear",
lora_dropout=0.0), whose fp32 adapters start with a random lora_B instead of PEFT's zeros, so
that the adapters change the output and A has a gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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
        """The CSV x_value, e.g. params=1.10B,seq=2048,batch=4,r=16."""
        return f"params={human(n_params)},seq={self.seq},batch={self.batch},r={self.r}"

    @property
    def model_label(self) -> str:
        return (f"hidden={self.hidden},intermediate={self.intermediate},n_layers={self.n_layers},"
                f"n_heads={self.n_heads},n_kv_heads={self.n_kv_heads},vocab={self.vocab},"
                f"r={self.r},lora_alpha={self.lora_alpha},{str(self.dtype).replace('torch.', '')}")


def human(n: int) -> str:
    """1100048384 -> '1.10B', 37536 -> '37.5K'."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:#.3g}".rstrip(".") + suffix if n < 100 * div else f"{n / div:.0f}{suffix}"
    return str(n)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA layers by module path."""
    from peft.tuners.lora import LoraLayer
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_peft(cfg: Config, device: torch.device, b_std: float) -> tuple[nn.Module, int]:
    """The seeded PEFT model on ``device`` in train mode, lora_B ~ N(0, b_std²), and the base
    model's parameter count."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_hidden_layers=cfg.n_layers,
                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab,
                         max_position_embeddings=max(2048, cfg.seq), tie_word_embeddings=False, use_cache=False)
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
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * b_std)
    return model.train(), n_params


def make_batch(cfg: Config, device: torch.device, seed: int) -> torch.Tensor:
    """A fixed batch of random token ids (batch, seq)."""
    return torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=torch.Generator().manual_seed(seed)).to(device)
