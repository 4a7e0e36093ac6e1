"""fuse(): lorafast's fused LoRA layers in place of PEFT's, in a model or a Trainer's model."""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ...interop.from_peft import from_peft
from ...interop.peft_format import CONFIG_NAME, WEIGHTS_NAME, load_adapters, save_adapters
from ...interop.targets import PEFT_PREFIX, is_peft_lora_layer, is_peft_model, lora_layers

logger = logging.getLogger("lorafast")


@dataclass
class FusionReport:
    """Which LoRA layers run lorafast's fused op and which stayed PEFT layers, and why."""

    fused: list[str] = field(default_factory=list)
    fallen_back: list[tuple[str, str]] = field(default_factory=list)   # (layer, feature the fused op lacks)

    def __str__(self) -> str:
        total = len(self.fused) + len(self.fallen_back)
        lines = [f"lorafast: {len(self.fused)} of {total} LoRA layers fused"
                 + (f", {len(self.fallen_back)} fell back to PEFT:" if self.fallen_back else "")]
        lines += [f"  {name}: {why}" for name, why in self.fallen_back]
        return "\n".join(lines)


def _model_of(trainer_or_model) -> nn.Module:
    if isinstance(trainer_or_model, nn.Module):
        return trainer_or_model
    model = getattr(trainer_or_model, "model", None)    # a Trainer's
    if isinstance(model, nn.Module):
        return model
    raise ValueError(f"trainer_or_model must be a transformers Trainer or an nn.Module, got "
                     f"{type(trainer_or_model).__name__}")


def _save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
    """PeftModel.save_pretrained for fused layers: PEFT's format, written by lorafast."""
    if is_main_process:
        save_adapters(self, save_directory)


def _load_adapter(self, model_id, adapter_name: str = "default", *args, **kwargs):
    """PeftModel.load_adapter for fused layers (what Trainer's resume_from_checkpoint calls)."""
    path = Path(model_id)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise ValueError(f"model_id: {model_id} has no {CONFIG_NAME} and {WEIGHTS_NAME} to load")
    load_adapters(self, path)


def _route_peft_io(model: nn.Module) -> None:
    """PEFT's save_pretrained and load_adapter no longer see fused layers; on this model
    instance they go through lorafast's PEFT-format writer and reader instead, so that the
    Trainer's checkpoints, resume and final save keep working unchanged."""
    if is_peft_model(model) and not any(is_peft_lora_layer(m) for m in model.modules()):
        model.save_pretrained = types.MethodType(_save_pretrained, model)
        model.load_adapter = types.MethodType(_load_adapter, model)


def fuse(trainer_or_model) -> FusionReport:
    """Put lorafast's fused ``LoRALinear`` in place of every PEFT LoRA layer that it computes
    exactly, in ``trainer.model`` or in a model; return a ``FusionReport``.

    The layers share PEFT's parameter tensors, so a Trainer (and an optimizer it has already
    built) is left as it is and trains the same parameters, faster. Layers with a feature the
    fused op lacks (DoRA, several adapters, ...) stay PEFT layers, with a warning and a line in
    the report. When every layer is fused, the PeftModel's ``save_pretrained`` / ``load_adapter``
    write and read PEFT's format through lorafast, which Trainer checkpoints and resume use.
    A model that already has lorafast layers and no PEFT ones is reported as fused."""
    model = _model_of(trainer_or_model)
    has_peft = any(is_peft_lora_layer(m) for m in model.modules())
    if has_peft:
        from_peft(model, strict=False)
        fallen = [(n.removeprefix(PEFT_PREFIX), why) for n, why in getattr(model, "lorafast_unfused", [])]
    elif lora_layers(model):
        fallen = []
    else:
        raise ValueError(f"trainer_or_model: the model ({type(model).__name__}) has no PEFT LoRA layers and no "
                         "lorafast LoRALinear layers to fuse")
    report = FusionReport(fused=sorted(lora_layers(model)), fallen_back=fallen)
    _route_peft_io(model)
    logger.info("%s", report)
    return report
