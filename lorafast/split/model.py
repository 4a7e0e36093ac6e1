"""SplitLoRA (arXiv 2407.00952): a causal LM cut at a decoder layer into a client part and a
server part that exchange only tensors.

The client runs the embeddings and the first ``cut_layer`` decoder layers and sends their
output h ("smashed data"), optionally clipped and noised by :func:`privatize`. The server
runs the remaining layers, the final norm and the LM head, computes the loss, backpropagates
into its own parameters and returns dL/dh. The client backpropagates dL/dh into its own
parameters. Both parts keep the model's own parameters (no copies), so two optimizers over
``client_parameters()`` and ``server_parameters()`` train the one model.

Each part runs the model's own ``model.model.forward`` on a shallow "shell" of it that shares
every submodule but sees only its own slice of ``layers``: the client shell has the final norm
replaced by Identity, and the server shell is called with ``inputs_embeds=h`` (so the embedding
is skipped). transformers thus builds the causal mask (from ``attention_mask``) and the rotary
position embeddings on each side exactly as in the unsplit model.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Optional

import torch
from torch import Tensor, nn

from ..interop.targets import hf_root

__all__ = ["SplitModel"]

# Model types whose ``model.model.forward`` treats ``inputs_embeds`` exactly as the output of
# ``embed_tokens`` (no embedding scale or multiplier applied afterwards) and whose causal-LM
# forward is ``lm_head(model(...).last_hidden_state)`` then ``loss_function`` (no logit scale or
# soft-capping). Gemma, Granite, Cohere and others share the attribute layout but not this.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_PRIVATIZE_KEYS = ("clip_norm", "noise_multiplier", "mode", "seed", "backend")
_GOLDEN = 0x9E3779B97F4A7C15   # odd constant: distinct per-step Philox keys from one base seed
_SEED_MASK = 2**63 - 1


def _check_layout(model) -> tuple[nn.Module, nn.Module]:
    """(the causal LM, its decoder ``model.model``); ValueError unless laid out like Llama."""
    expected = ("model must be a decoder-only causal LM laid out like LlamaForCausalLM "
                f"(model_type in {SUPPORTED_MODEL_TYPES}): model.model.embed_tokens, model.model.layers "
                "(nn.ModuleList), model.model.norm and model.lm_head")
    if not isinstance(model, nn.Module):
        raise ValueError(f"{expected}; got {type(model).__name__}")
    lm = hf_root(model)
    decoder = getattr(lm, "model", None)
    ok = (isinstance(decoder, nn.Module) and isinstance(getattr(lm, "lm_head", None), nn.Module)
          and all(isinstance(getattr(decoder, n, None), nn.Module) for n in ("embed_tokens", "norm"))
          and isinstance(getattr(decoder, "layers", None), nn.ModuleList))
    if not ok:
        raise ValueError(f"{expected}; {type(lm).__name__} is not")
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{expected}; got model_type {model_type!r} ({type(lm).__name__})")
    if "forward" in vars(decoder):
        # accelerate's device-map hooks replace forward on the instance, bound to it: a shell
        # would run that bound method, i.e. all the layers.
        raise ValueError("model.model.forward is overridden on the instance (accelerate hooks from a device_map?); "
                         "SplitModel needs the class's own forward")
    n_cfg = getattr(decoder.config, "num_hidden_layers", None)
    if n_cfg != len(decoder.layers):
        raise ValueError(f"model has {len(decoder.layers)} decoder layers but its config says "
                         f"num_hidden_layers={n_cfg}; they must agree")
    return lm, decoder


def _shell(decoder: nn.Module, layers: list, norm: Optional[nn.Module], layer_offset: int) -> nn.Module:
    """A shallow copy of ``decoder`` sharing its submodules but running only ``layers``.

    Qwen2/Qwen3 pick each layer's mask as ``config.layer_types[i]`` by position i in the layer
    list, so the shell gets a shallow config copy with its slice of ``layer_types``."""
    shell = copy.copy(decoder)
    shell._modules = dict(decoder._modules)
    shell._modules["layers"] = nn.ModuleList(layers)
    if norm is not None:
        shell._modules["norm"] = norm
    config = copy.copy(decoder.config)
    config.num_hidden_layers = len(layers)
    layer_types = getattr(decoder.config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = list(layer_types[layer_offset:layer_offset + len(layers)])
    shell.config = config
    return shell


def _check_tokens(value, name: str, shape=None) -> None:
    if not isinstance(value, Tensor) or value.dim() != 2 or value.is_floating_point() or value.is_complex():
        raise ValueError(f"{name} must be an integer tensor of shape (batch, seq), got "
                         f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
                         f"{' ' + str(value.dtype) if isinstance(value, Tensor) else ''}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (batch, seq), got {tuple(value.shape)}")


class SplitModel:
    """A causal LM split after decoder layer ``cut_layer`` into a client and a server part.

    ``model``: a transformers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or
    Qwen3ForCausalLM (or a PeftModel wrapping one), typically with adapters from
    :func:`lorafast.inject_adapters`. It is not copied: both parts use its parameters, and
    ``model.train()`` / ``.eval()`` / ``.to()`` act on both.
    ``cut_layer``: the client runs layers ``[0, cut_layer)``, the server ``[cut_layer, L)``;
    an int in [1, L − 1].
    ``privatize``: None, or a dict of :func:`lorafast.split.privatize.privatize` arguments
    (``clip_norm``, ``noise_multiplier`` required; ``mode``, ``seed``, ``backend``) applied to
    the smashed data before it is sent. With ``seed=None`` every call draws a seed from the
    OS; with an int seed, call k uses a key derived from (seed, k) (call 0: seed itself), so
    a run replays but no two steps share noise. The seed is the client's secret: whoever
    knows it can subtract the noise.

    One training step::

        h = split.client_forward(input_ids, attention_mask)          # client → wire
        loss, grad_h = split.server_step(h, labels, attention_mask)  # server → wire
        split.client_backward(grad_h)                                # client
        client_opt.step(); server_opt.step()

    or ``loss = split.step(input_ids, labels, attention_mask)``. The tensors that cross the
    cut (h, grad_h) are plain tensors of shape (batch, seq, hidden) with no autograd history,
    so any transport that carries tensors can sit between the calls. The server also needs
    ``labels`` and ``attention_mask`` (the causal mask is rebuilt from it on each side).
    The loss is the model's own (``model.loss_function``: shifted cross-entropy, labels of
    −100 ignored), so without privatize a step gives the loss and gradients of
    ``model(input_ids, attention_mask=..., labels=...).loss.backward()``.
    """

    def __init__(self, model: nn.Module, cut_layer: int, *, privatize: Optional[Mapping] = None):
        lm, decoder = _check_layout(model)
        n_layers = len(decoder.layers)
        if isinstance(cut_layer, bool) or not isinstance(cut_layer, int) or not 1 <= cut_layer <= n_layers - 1:
            raise ValueError(f"cut_layer must be an int in [1, {n_layers - 1}] (the model has {n_layers} decoder "
                             f"layers and each side needs at least one), got {cut_layer!r}")
        cfg = self._check_privatize(privatize, decoder)
        self.model = model
        self.cut_layer = cut_layer
        self.privatize = cfg
        self._lm, self._decoder = lm, decoder
        self._pending: Optional[Tensor] = None   # the client's sent activation, with its graph
        self._calls = 0                          # privatized client_forward calls (per-step seeds)
        shared = {id(p) for p in self.client_parameters()} & {id(p) for p in self._server_module_params()}
        if shared:
            names = [n for n, p in lm.named_parameters(remove_duplicate=False) if id(p) in shared]
            raise ValueError(f"parameters {names} are trainable and used on both sides of the cut (tied "
                             "weights); freeze or untie them so that each side owns its own parameters")

    @staticmethod
    def _check_privatize(privatize, decoder) -> Optional[dict]:
        if privatize is None:
            return None
        if not isinstance(privatize, Mapping):
            raise ValueError("privatize must be None or a dict of privatize() arguments, "
                             f"got {type(privatize).__name__}")
        cfg = dict(privatize)
        unknown = sorted(set(cfg) - set(_PRIVATIZE_KEYS))
        missing = [k for k in ("clip_norm", "noise_multiplier") if k not in cfg]
        if unknown or missing:
            raise ValueError(f"privatize must have keys clip_norm and noise_multiplier, and optionally mode, seed, "
                             f"backend; got unknown {unknown}, missing {missing}")
        from .privatize import privatize as _privatize
        # Let privatize() itself vouch for every value now, rather than at the first step.
        probe = decoder.embed_tokens.weight
        _privatize(torch.ones(1, 1, device=probe.device, dtype=probe.dtype), **{**cfg, "seed": cfg.get("seed") or 0})
        return cfg

    # -- parameters -------------------------------------------------------------------------

    def _client_modules(self) -> list:
        return [self._decoder.embed_tokens, *self._decoder.layers[: self.cut_layer]]

    def _server_module_params(self) -> list:
        mods = [*self._decoder.layers[self.cut_layer:], self._decoder.norm, self._lm.lm_head]
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    def client_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters the client owns: embeddings and the first cut_layer layers."""
        seen, out = set(), []
        for m in self._client_modules():
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def server_parameters(self) -> list[nn.Parameter]:
        """Every other trainable parameter of the model (the later layers, final norm, LM head)."""
        client = {id(p) for p in self.client_parameters()}
        return [p for p in self._lm.parameters() if p.requires_grad and id(p) not in client]

    # -- client -----------------------------------------------------------------------------

    def client_forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Run the client layers on ``input_ids`` (batch, seq) and return the smashed data to send:
        a new tensor (batch, seq, hidden) without autograd history, privatized if configured.
        The client keeps its graph until :meth:`client_backward` (or :meth:`client_discard`)."""
        if self._pending is not None:
            raise RuntimeError("client_forward called again before client_backward: the previous step's "
                               "activations are still waiting for their gradient (call client_backward(grad_h), "
                               "or client_discard() to drop them)")
        _check_tokens(input_ids, "input_ids")
        if attention_mask is not None:
            _check_tokens(attention_mask, "attention_mask", input_ids.shape)
        shell = _shell(self._decoder, list(self._decoder.layers[: self.cut_layer]), nn.Identity(), 0)
        h = shell(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if self.privatize is not None:
            from .privatize import privatize as _privatize
            cfg = dict(self.privatize)
            if cfg.get("seed") is not None:
                cfg["seed"] = (cfg["seed"] + self._calls * _GOLDEN) & _SEED_MASK
            h = _privatize(h, **cfg)
            self._calls += 1
        if h.requires_grad:
            self._pending = h
        # A copy, not a view: whatever the transport or server does to it cannot touch the graph.
        return h.detach().clone()

    def client_backward(self, grad_h: Tensor) -> None:
        """Backpropagate the server's dL/dh into the client's parameters (accumulating into .grad)."""
        if self._pending is None:
            raise RuntimeError("client_backward called without a pending client_forward")
        if not isinstance(grad_h, Tensor) or tuple(grad_h.shape) != tuple(self._pending.shape):
            raise ValueError(f"grad_h must be a tensor of the sent activation's shape {tuple(self._pending.shape)}, "
                             f"got {tuple(grad_h.shape) if isinstance(grad_h, Tensor) else type(grad_h).__name__}")
        if not grad_h.is_floating_point():
            raise ValueError(f"grad_h must be floating point, got {grad_h.dtype}")
        h = self._pending
        h.backward(grad_h.to(device=h.device, dtype=h.dtype))
        self._pending = None

    def client_discard(self) -> None:
        """Drop a pending client_forward's graph (e.g. when the server's answer is lost)."""
        self._pending = None

    # -- server -----------------------------------------------------------------------------

    def server_step(self, h: Tensor, labels: Tensor, attention_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Run the server layers and LM head from the received ``h`` (batch, seq, hidden), compute
        the causal-LM loss against ``labels`` (batch, seq; −100 ignored), backpropagate into the
        server's parameters (accumulating into .grad) and return ``(loss, grad_h)``, both
        without autograd history; grad_h = dL/dh has h's shape."""
        _check_tokens(labels, "labels")
        hidden = self._decoder.config.hidden_size
        want = (*labels.shape, hidden)
        if not isinstance(h, Tensor) or tuple(h.shape) != want or not h.is_floating_point():
            got = f"{tuple(h.shape)} {h.dtype}" if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"h must be a floating-point tensor of shape {want} (labels' batch and seq, hidden "
                             f"size), got {got}")
        if attention_mask is not None:
            _check_tokens(attention_mask, "attention_mask", labels.shape)
        h = h.detach().requires_grad_(True)
        shell = _shell(self._decoder, list(self._decoder.layers[self.cut_layer:]), None, self.cut_layer)
        with torch.enable_grad():
            out = shell(inputs_embeds=h, attention_mask=attention_mask, use_cache=False).last_hidden_state
            logits = self._lm.lm_head(out)
            loss = self._loss(logits, labels)
            loss.backward()
        return loss.detach(), h.grad

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        # As the model's own forward computes it (ForCausalLMLoss: token t+1 predicted at
        # position t, in fp32, mean over the labels that are not −100).
        return self._lm.loss_function(logits=logits, labels=labels, vocab_size=self._lm.config.vocab_size)

    # -- both, in one process ---------------------------------------------------------------

    def step(self, input_ids: Tensor, labels: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """client_forward → server_step → client_backward in one process; returns the loss."""
        _check_tokens(labels, "labels", input_ids.shape if isinstance(input_ids, Tensor) else None)
        h = self.client_forward(input_ids, attention_mask)
        try:
            loss, grad_h = self.server_step(h, labels, attention_mask)
        except BaseException:
            self.client_discard()
            raise
        if self._pending is not None:
            self.client_backward(grad_h)
        return loss

    def __repr__(self) -> str:
        return (f"SplitModel({type(self._lm).__name__}, cut_layer={self.cut_layer}/{len(self._decoder.layers)}, "
                f"privatize={self.privatize})")
