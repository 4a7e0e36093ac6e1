"""lorafast inside Hugging Face's Trainer and TRL.

    from lorafast.integrations.transformers import DPTrainer, DPArguments, fuse

* ``DPTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=ds, dp_args=DPArguments(...))``:
  private LoRA fine-tuning (DP-SGD) with the Trainer's loop, logging, checkpoints and resume.
* ``DPTrainerMixin``: the same for any Trainer subclass; ``DPSFTTrainer`` is TRL's SFTTrainer
  with it (imported on first use; needs ``pip install 'lorafast[trl]'``).
* ``fuse(trainer_or_model)``: lorafast's fused LoRA layers in place of PEFT's for non-private
  training; the Trainer stays as it is. Returns a ``FusionReport``.

Needs the ``hf`` extra (transformers, PEFT); nothing here is imported by ``lorafast``.
"""
from .arguments import DPArguments
from .fusion import FusionReport, fuse
from .trainer import DPTrainer, DPTrainerMixin

__all__ = ["DPTrainer", "DPArguments", "fuse", "DPTrainerMixin", "FusionReport", "DPSFTTrainer"]


def __getattr__(name):
    if name == "DPSFTTrainer":
        from .trl import DPSFTTrainer
        return DPSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
