"""Split learning (SplitLoRA, DP-CutMixSL)."""
