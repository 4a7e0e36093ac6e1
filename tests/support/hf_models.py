"""Tiny transformers models built from configs (random init, no downloads) and PEFT wrappers."""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 61


def tiny_llama(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=44, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def peft_lora(model, target_modules, **kw):
    """PEFT LoRA with non-zero B (init_lora_weights=False), so that the adapters matter."""
    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    cfg = peft.LoraConfig(target_modules=target_modules, init_lora_weights=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(model), cfg)


def token_ids(batch: int = 2, seq: int = 7):
    return torch.randint(0, VOCAB, (batch, seq))


def adapter_grads(model):
    """{layer name: {"lora_A": grad, "lora_B": grad}} for PEFT's and lorafast's parameter names alike."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        for kind in ("lora_A", "lora_B"):
            if f".{kind}" in name:
                layer = name.split(f".{kind}")[0]
                out.setdefault(layer, {})[kind] = p.grad
    return out


def tiny_tokenizer():
    """A word-level fast tokenizer over the tiny models' vocabulary, built in memory: "w0" … "w57"
    are tokens 3 … 60, after <unk>, <pad> and <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<pad>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="<eos>")


def random_texts(n: int, seed: int = 0, min_words: int = 2, max_words: int = 8) -> list[str]:
    """n texts of random words of tiny_tokenizer's vocabulary, of random lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_words, max_words + 1, (n,), generator=g)
    return [" ".join(f"w{int(t)}" for t in torch.randint(0, VOCAB - 3, (int(k),), generator=g)) for k in lengths]
