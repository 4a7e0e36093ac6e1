"""DPArguments: the privacy settings of a DPTrainer run, checked when they are made."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ..._checks import check_choice, check_nonnegative, check_positive, check_seed
from ...dp.accountant import MECHANISMS
from ...dp.engine import CLIPPINGS


@dataclass
class DPArguments:
    """DP-SGD settings for ``DPTrainer``, beside transformers' ``TrainingArguments``.

    Give exactly one of:
      * ``target_epsilon``: σ is calibrated so that ε(target_delta) ≤ target_epsilon after the
        run's optimizer steps (``max_steps``, or ``num_train_epochs`` × steps per epoch), and
        training stops before a step that would exceed it (a resumed run asked to go longer);
      * ``noise_multiplier``: σ as given; ε is reported at ``target_delta``.

    Args:
        target_delta: δ, below 1/N for N training records. None: 1/(10·N).
        max_grad_norm: the per-sample clipping bound C (a list, one per trainable parameter,
            with ``clipping="per_layer"``). The Trainer's own ``TrainingArguments.max_grad_norm``
            clipping of the batch gradient is turned off: this bound replaces it.
        accountant: "pld" (tight) or "rdp".
        secure_mode: Poisson batches and noise from the OS's secure generator.
        noise_seed, sampling_seed: fix the Philox noise key and the Poisson sampler's seed to
            replay a run. None (the default) draws them from the OS: a known sampling seed tells
            an observer which records each step used, which voids the privacy amplification by
            subsampling that the accounting counts on. ``TrainingArguments.seed`` is not used.
    """

    target_epsilon: Optional[float] = None
    target_delta: Optional[float] = None
    noise_multiplier: Optional[float] = None
    max_grad_norm: Union[float, Sequence[float]] = 1.0
    clipping: str = "flat"
    accountant: str = "pld"
    secure_mode: bool = False
    noise_seed: Optional[int] = None
    sampling_seed: Optional[int] = None

    def __post_init__(self):
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ValueError(f"give one of noise_multiplier or target_epsilon, not both (noise_multiplier="
                             f"{self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}): "
                             "target_epsilon calibrates the noise multiplier")
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("give one of noise_multiplier or target_epsilon")
        if self.target_epsilon is not None:
            check_positive("target_epsilon", self.target_epsilon)
        if self.noise_multiplier is not None:
            check_nonnegative("noise_multiplier", self.noise_multiplier)
        if self.target_delta is not None:
            check_positive("target_delta", self.target_delta)
            if self.target_delta >= 1:
                raise ValueError(f"target_delta must be in (0, 1), got {self.target_delta!r}")
        check_choice("clipping", self.clipping, CLIPPINGS)
        check_choice("accountant", self.accountant, MECHANISMS)
        check_seed("noise_seed", self.noise_seed)
        check_seed("sampling_seed", self.sampling_seed)
        if self.secure_mode and self.sampling_seed is not None:
            raise ValueError("sampling_seed must be None with secure_mode=True (batches come from os.urandom)")

    def delta_for(self, n_samples: int) -> float:
        """δ for a training set of ``n_samples`` records: target_delta, checked against 1/N."""
        if self.target_delta is None:
            return 1.0 / (10 * n_samples)
        if self.target_delta >= 1.0 / n_samples:
            raise ValueError(f"target_delta={self.target_delta!r} must be below 1/N = {1 / n_samples:.3g} for the "
                             f"N={n_samples} training records: a δ of 1/N allows leaking one record outright")
        return float(self.target_delta)
