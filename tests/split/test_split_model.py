"""SplitModel: a causal LM cut into a client and a server part that exchange only tensors,
checked against the unsplit model's loss and gradients (privatize off, and on through a hook
at the cut), over a serialising "wire", in a short training run, and on bad input."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

import lorafast
from support.common import fresh_seed
from lorafast.split.model import SplitModel
from lorafast.split.privatize import privatize

transformers = pytest.importorskip("transformers")

VOCAB = 61
TARGETS = ["q_proj", "v_proj", "up_proj"]
SIZES = dict(hidden_size=32, intermediate_size=44, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, max_position_embeddings=64)


def adapted(model):
    """model with adapters whose B is random (so that A gets gradients too), eval mode, fp32."""
    lorafast.inject_adapters(model.eval(), TARGETS, r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    return model


def llama(n_layers=3, **kw):
    return adapted(transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=n_layers, **SIZES, **kw)))


def batch(b=3, t=9):
    """Token ids, an attention mask with left padding on one sample, and labels ignoring the padding."""
    ids = torch.randint(0, VOCAB, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :3] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def unsplit(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach()


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(got_model, want_model, rtol=1e-5, atol=1e-7):
    got, want = trainable(got_model), trainable(want_model)
    assert got.keys() == want.keys() and len(want) == 2 * len(TARGETS) * len(want_model.model.layers)
    for name, p in want.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        torch.testing.assert_close(got[name].grad, p.grad, rtol=rtol, atol=atol, msg=name)


def wire(t):
    """A transport: the tensor serialised to bytes and read back."""
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("cut", [1, 2])
@pytest.mark.parametrize("how", ["step", "three_calls", "wire"])
def test_split_step_equals_unsplit_model(cut, how):
    fresh_seed()
    model = llama()
    ref = copy.deepcopy(model)
    ids, mask, labels = batch()
    want = unsplit(ref, ids, mask, labels)

    split = SplitModel(model, cut)
    if how == "step":
        loss = split.step(ids, labels, mask)
    else:
        h = split.client_forward(ids, mask)
        assert type(h) is torch.Tensor and h.grad_fn is None and not h.requires_grad
        assert h.shape == (*ids.shape, model.config.hidden_size)
        if how == "wire":
            h = wire(h)
        loss, grad_h = split.server_step(h, labels, mask)
        assert loss.grad_fn is None and grad_h.grad_fn is None and grad_h.shape == h.shape
        if how == "wire":
            loss, grad_h = wire(loss), wire(grad_h)
        split.client_backward(grad_h)

    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    assert_same_grads(model, ref)


@pytest.mark.parametrize("cut", [1, 2])
def test_parameters_are_the_models_own_and_split_by_side(cut):
    fresh_seed()
    model = llama()
    split = SplitModel(model, cut)
    client, server = split.client_parameters(), split.server_parameters()
    owned = {id(p) for p in model.parameters()}
    assert {id(p) for p in client} <= owned and {id(p) for p in server} <= owned
    assert not {id(p) for p in client} & {id(p) for p in server}
    assert {id(p) for p in client} | {id(p) for p in server} == {id(p) for p in model.parameters() if p.requires_grad}
    per_layer = 2 * len(TARGETS)
    assert len(client) == cut * per_layer and len(server) == (3 - cut) * per_layer
    assert {id(p) for p in client} == {id(p) for layer in model.model.layers[:cut] for p in layer.parameters()
                                       if p.requires_grad}
    # The model itself is untouched: same layers, same norm, nothing copied.
    assert len(model.model.layers) == 3 and isinstance(model.model.norm, nn.Module)
    assert not isinstance(model.model.norm, nn.Identity)


def test_two_optimizers_train_like_one():
    """Two AdamW optimizers (client, server) over three steps give the unsplit model's weights."""
    fresh_seed()
    model = llama()
    ref = copy.deepcopy(model)
    ids, mask, labels = batch()
    split = SplitModel(model, 2)
    opts = [torch.optim.AdamW(params, lr=1e-2) for params in (split.client_parameters(), split.server_parameters())]
    ref_opt = torch.optim.AdamW(list(trainable(ref).values()), lr=1e-2)
    for _ in range(3):
        for o in opts:
            o.zero_grad()
        split.step(ids, labels, mask)
        for o in opts:
            o.step()
        ref_opt.zero_grad()
        unsplit(ref, ids, mask, labels)
        ref_opt.step()
    for name, p in trainable(ref).items():
        torch.testing.assert_close(trainable(model)[name], p, rtol=1e-5, atol=1e-6, msg=name)


def mixed_qwen2():
    cfg = transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=3, max_window_layers=2,
                                   **SIZES)
    assert cfg.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    return adapted(transformers.Qwen2ForCausalLM(cfg))


def mistral():
    return adapted(transformers.MistralForCausalLM(transformers.MistralConfig(num_hidden_layers=4, sliding_window=3,
                                                                              **SIZES)))


@pytest.mark.parametrize("make", [mixed_qwen2, mistral])
@pytest.mark.parametrize("cut", [1, 2, 3])
def test_other_llama_layouts(make, cut):
    """Qwen2 picks each layer's mask by its index in config.layer_types, so the server shell must
    see its own slice of them (here the sliding window is shorter than the sequence)."""
    fresh_seed()
    model = make()
    ref = copy.deepcopy(model)
    ids, mask, labels = batch()
    want = unsplit(ref, ids, mask, labels)
    loss = SplitModel(model, cut).step(ids, labels, mask)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    got, expect = trainable(model), trainable(ref)
    for name, p in expect.items():
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_frozen_client_sends_and_needs_no_backward():
    """Adapters only on the server side: the client has nothing to train and keeps no graph."""
    fresh_seed()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=3, **SIZES)).eval()
    lorafast.inject_adapters(model, ["layers.2.self_attn.q_proj"], r=4)
    ref = copy.deepcopy(model)
    ids, mask, labels = batch()
    want = unsplit(ref, ids, mask, labels)
    split = SplitModel(model, 1)
    assert split.client_parameters() == [] and len(split.server_parameters()) == 2
    torch.testing.assert_close(split.step(ids, labels, mask), want, rtol=1e-5, atol=0)
    split.client_forward(ids, mask)
    split.client_forward(ids, mask)          # nothing pending, so no RuntimeError
    with pytest.raises(RuntimeError, match="without a pending"):
        split.client_backward(torch.zeros(*ids.shape, 32))


def test_peft_model_is_split_through_its_base_model():
    peft = pytest.importorskip("peft")
    fresh_seed()
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=3, **SIZES)).eval()
    cfg = peft.LoraConfig(target_modules=TARGETS, r=4, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # PEFT's own deprecation noise
        model = peft.get_peft_model(base, cfg)
    ref = copy.deepcopy(model)
    ids, mask, labels = batch()
    want = unsplit(ref, ids, mask, labels)
    split = SplitModel(model, 2)
    assert len(split.client_parameters()) == 2 * 2 * len(TARGETS)
    torch.testing.assert_close(split.step(ids, labels, mask), want, rtol=1e-5, atol=0)
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


# -- privatize --------------------------------------------------------------------------------

def privatized_at_cut(model, cut, **cfg):
    """The unsplit model with privatize() applied to the output of layer cut−1 (a forward hook)."""
    def hook(module, args, out):
        return privatize(out, **cfg)
    return model.model.layers[cut - 1].register_forward_hook(hook)


@pytest.mark.parametrize("mode", ["sample", "token", "element"])
def test_privatize_equals_the_unsplit_model_privatized_at_the_cut(mode):
    """Clipping that bites and noise with a given seed: the split step's loss and gradients (the
    client's through the clipping Jacobian) equal those of the unsplit model with the same
    privatize() call at the cut. The first call of a seeded SplitModel uses the seed itself."""
    fresh_seed()
    model = llama()
    ref = copy.deepcopy(model)
    ids, mask, labels = batch()
    h = SplitModel(copy.deepcopy(model), 1).client_forward(ids, mask)
    scale = {"sample": h.flatten(1).norm(dim=1), "token": h.norm(dim=-1), "element": h.abs()}[mode]
    # C at the median of the clipped quantity: about half of the samples, tokens or elements are clipped.
    cfg = dict(clip_norm=scale.median().item(), noise_multiplier=0.3, mode=mode, seed=1234)
    assert 0.3 < (scale > cfg["clip_norm"]).float().mean() < 0.7
    handle = privatized_at_cut(ref, 1, **cfg)
    want = unsplit(ref, ids, mask, labels)
    handle.remove()

    loss = SplitModel(model, 1, privatize=cfg).step(ids, labels, mask)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    assert_same_grads(model, ref, rtol=1e-4, atol=1e-6)


def test_privatize_without_noise_or_clipping_equals_privatize_off():
    fresh_seed()
    model = llama()
    ref = copy.deepcopy(model)
    ids, mask, labels = batch()
    want_loss = SplitModel(ref, 2).step(ids, labels, mask)
    split = SplitModel(model, 2, privatize=dict(clip_norm=1e6, noise_multiplier=0.0, mode="sample"))
    torch.testing.assert_close(split.step(ids, labels, mask), want_loss, rtol=1e-6, atol=0)
    assert_same_grads(model, ref, rtol=1e-6, atol=1e-8)


def test_seeded_privatize_replays_and_draws_new_noise_every_step():
    fresh_seed()
    model = llama()
    ids, mask, _ = batch()
    cfg = dict(clip_norm=1.0, noise_multiplier=0.1, mode="token", seed=7)
    runs = []
    for _ in range(2):
        split = SplitModel(model, 1, privatize=cfg)
        sent = []
        for _ in range(3):
            sent.append(split.client_forward(ids, mask))
            split.client_discard()
        runs.append(sent)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    noise = [h - runs[0][0] for h in runs[0][1:]]
    assert all(n.abs().max() > 0.01 for n in noise)                # not the same noise twice
    unseeded = SplitModel(model, 1, privatize={**cfg, "seed": None})
    a = unseeded.client_forward(ids, mask)
    unseeded.client_discard()
    assert (a - unseeded.client_forward(ids, mask)).abs().max() > 0.01


def test_training_with_privatized_smashed_data_lowers_the_loss():
    fresh_seed()
    model = llama()
    ids, mask, labels = batch(4, 12)
    # Tokens' activations at the cut have norms ~0.1–0.2, so C = 1 does not clip; the noise std is 0.01.
    split = SplitModel(model, 1, privatize=dict(clip_norm=1.0, noise_multiplier=0.01, mode="token"))
    client = torch.optim.AdamW(split.client_parameters(), lr=1e-2)
    server = torch.optim.AdamW(split.server_parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        client.zero_grad()
        server.zero_grad()
        h = wire(split.client_forward(ids, mask))
        loss, grad_h = split.server_step(h, labels, mask)
        split.client_backward(wire(grad_h))
        client.step()
        server.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [0, 3, -1, 1.0, True, "1", None])
def test_cut_layer_out_of_range(cut):
    with pytest.raises(ValueError, match=r"cut_layer must be an int in \[1, 2\]"):
        SplitModel(llama(), cut)


def test_models_not_laid_out_like_llama():
    with pytest.raises(ValueError, match="laid out like LlamaForCausalLM"):
        SplitModel(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), 1)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="model.model.embed_tokens"):
        SplitModel(gpt2, 1)
    with pytest.raises(ValueError, match="laid out like"):
        SplitModel("model", 1)
    # Gemma has the attribute layout, but scales the embeddings inside model.model.forward,
    # so the server would scale h a second time.
    gemma = transformers.GemmaForCausalLM(transformers.GemmaConfig(num_hidden_layers=3, head_dim=8, **SIZES))
    with pytest.raises(ValueError, match="model_type 'gemma'"):
        SplitModel(gemma, 1)


def test_a_forward_replaced_on_the_instance_is_refused():
    """accelerate's device-map hooks bind a new forward to model.model; a shell would run it."""
    model = llama()
    model.model.forward = model.model.forward
    with pytest.raises(ValueError, match="overridden on the instance"):
        SplitModel(model, 1)


def test_tied_trainable_weights_are_refused():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=3, tie_word_embeddings=True,
                                                                   **SIZES))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tied"):
        SplitModel(model, 1)
    model.lm_head.weight.requires_grad_(False)            # frozen, as inject_adapters leaves it
    SplitModel(model, 1)


@pytest.mark.parametrize("cfg, match", [
    ({"clip_norm": 1.0}, "missing"),
    ({"clip_norm": 1.0, "noise_multiplier": 0.1, "sigma": 1}, "unknown"),
    ({"clip_norm": -1.0, "noise_multiplier": 0.1}, "clip_norm"),
    ({"clip_norm": 1.0, "noise_multiplier": 0.1, "mode": "row"}, "mode"),
    ({"clip_norm": 1.0, "noise_multiplier": 0.1, "seed": -3}, "seed"),
    ([("clip_norm", 1.0)], "privatize must be None or a dict"),
])
def test_bad_privatize_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        SplitModel(llama(), 1, privatize=cfg)


def test_server_refuses_a_wrong_shape_and_changes_nothing():
    fresh_seed()
    model = llama()
    ids, mask, labels = batch()
    split = SplitModel(model, 1)
    h = split.client_forward(ids, mask)
    for bad in (h[:, :-1], h[..., :-1], h[0], h.long(), h.tolist()):
        with pytest.raises(ValueError, match=r"h must be a floating-point tensor of shape \(3, 9, 32\)"):
            split.server_step(bad, labels, mask)
    with pytest.raises(ValueError, match="attention_mask"):
        split.server_step(h, labels, mask[:, 1:])
    with pytest.raises(ValueError, match="labels"):
        split.server_step(h, labels.float(), mask)
    assert all(p.grad is None for p in model.parameters())
    # The client is still waiting, and a good answer still completes the step.
    loss, grad_h = split.server_step(h, labels, mask)
    split.client_backward(grad_h)
    assert all(p.grad is not None for p in split.client_parameters())


def test_client_protocol_errors():
    fresh_seed()
    model = llama()
    ids, mask, labels = batch()
    split = SplitModel(model, 1)
    with pytest.raises(RuntimeError, match="without a pending client_forward"):
        split.client_backward(torch.zeros(*ids.shape, 32))
    h = split.client_forward(ids, mask)
    with pytest.raises(RuntimeError, match="before client_backward"):
        split.client_forward(ids, mask)
    _, grad_h = split.server_step(h, labels, mask)
    with pytest.raises(ValueError, match=r"grad_h must be a tensor of the sent activation's shape \(3, 9, 32\)"):
        split.client_backward(grad_h[:, 1:])
    assert all(p.grad is None for p in split.client_parameters())
    split.client_backward(grad_h)                     # the refused call lost nothing
    split.client_forward(ids, mask)
    split.client_discard()
    split.client_forward(ids, mask)                   # discarding frees the client for the next step
    with pytest.raises(ValueError, match="input_ids"):
        SplitModel(model, 2).client_forward(ids.float())
    with pytest.raises(ValueError, match="attention_mask"):
        SplitModel(model, 2).client_forward(ids, mask[:1])
