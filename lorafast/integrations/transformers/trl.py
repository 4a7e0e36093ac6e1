"""DPSFTTrainer: TRL's SFTTrainer with DP-SGD (needs the ``trl`` extra)."""
from __future__ import annotations

try:
    from trl import SFTTrainer
except ImportError as e:   # pragma: no cover - exercised only without TRL
    raise ImportError("DPSFTTrainer needs TRL: pip install 'lorafast[trl]'") from e

from .trainer import DPTrainerMixin


class DPSFTTrainer(DPTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` that trains with DP-SGD: TRL prepares and tokenizes the dataset
    (and wraps the model in PEFT when given ``peft_config``), lorafast fuses the LoRA layers,
    samples by Poisson and makes the optimizer private. Each record's loss is the mean over
    its own completion tokens (labels ≠ -100). ``packing`` and ``padding_free`` are refused:
    they put several records in one row."""
