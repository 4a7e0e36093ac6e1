"""DPTrainer: DP-SGD with lorafast's per-sample kernels inside Hugging Face's Trainer.

What changes against ``transformers.Trainer``, and why:
  * the model's PEFT LoRA layers become fused lorafast layers (``fuse``), which compute
    per-sample adapter gradients inside their backward;
  * the training DataLoader samples by Poisson at q = E / N, E = per-device batch size ×
    gradient_accumulation_steps (the accountant's assumption); each Poisson batch comes as
    ``gradient_accumulation_steps`` chunks, which form one logical batch: each chunk's
    samples are clipped with their own norms, one noise draw is added at the optimizer step;
  * the loss is Σᵢ ℓᵢ with ℓᵢ record i's own loss (lorafast.integrations.transformers.losses),
    and the private gradient is (Σᵢ clip(∇ℓᵢ) + N(0, σ²C²)) / E;
  * the Trainer's optimizer (whatever class it builds or was given) is wrapped in lorafast's
    DPOptimizer; the Trainer's own clipping of the batch gradient is off;
  * ε is logged at every logging step and checkpoints carry the accountant's state.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import transformers
from transformers import Trainer

from ...dp.accountant import Accountant, get_noise_multiplier
from ...dp.data_loader import DPDataLoader, PoissonBatchSampler
from ...dp.engine import PrivacyEngine, _check_bounds
from ...dp.grad_sample import trainable_parameters
from ...dp.optimizer import DPOptimizer
from ...interop.from_peft import unfusable_layers
from ...interop.peft_format import save_adapters
from ...interop.targets import hf_root, is_peft_lora_layer
from .arguments import DPArguments
from .fusion import fuse
from .losses import per_sample_losses

logger = logging.getLogger("lorafast")
DP_STATE_NAME = "lorafast_dp_state.json"
# the Trainer methods DPTrainer overrides to sample by Poisson and to stop before a step past the budget
_TRAINER_HOOKS = ("set_initial_training_values", "get_batch_samples")
_DEFAULT_MAX_GRAD_NORM = 1.0     # TrainingArguments' default: a different value was set by the user


def _batch_size(inputs) -> Optional[int]:
    for v in (inputs.values() if isinstance(inputs, dict) else []):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    return None


def _poisson_sampler(loader) -> Optional[PoissonBatchSampler]:
    """The PoissonBatchSampler under a DataLoader (and under accelerate's wrappers), or None."""
    bs = getattr(loader, "batch_sampler", None)
    for _ in range(4):
        if isinstance(bs, PoissonBatchSampler):
            return bs
        bs = getattr(bs, "batch_sampler", None)
    return None


class DPTrainerMixin:
    """Makes a transformers ``Trainer`` (or a subclass, such as TRL's ``SFTTrainer``) train
    with DP-SGD; see the module docstring. ``DPTrainer = DPTrainerMixin + Trainer``.

    Attributes after ``train()``: ``privacy_engine`` (its ``accountant``), ``noise_multiplier``,
    ``sample_rate``, ``expected_batch_size``, ``epsilon`` (spent so far at ``delta``);
    ``fusion_report`` from construction.
    """

    def __init__(self, *args, dp_args: Optional[DPArguments] = None, **kwargs):
        missing = [hook for hook in _TRAINER_HOOKS if not hasattr(Trainer, hook)]
        if missing:
            raise ImportError(f"DPTrainer needs Trainer.{', Trainer.'.join(missing)}, which this transformers "
                              f"({transformers.__version__}) lacks: it is checked with transformers 4.57 and 5.x")
        if not isinstance(dp_args, DPArguments):
            raise ValueError(f"dp_args must be a lorafast DPArguments, got {type(dp_args).__name__}")
        super().__init__(*args, **kwargs)
        self.dp_args = dp_args
        self._check_training_args()
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError("train_dataset is required: DP-SGD samples it by Poisson")
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError("train_dataset must be a map-style dataset with __len__, not an IterableDataset: "
                             "Poisson sampling draws each record independently")
        self.n_samples = len(dataset)
        self.delta = dp_args.delta_for(self.n_samples)
        self.expected_batch_size = float(self._train_batch_size * self.args.gradient_accumulation_steps)
        if self.expected_batch_size > self.n_samples:
            raise ValueError(f"per_device_train_batch_size × gradient_accumulation_steps = "
                             f"{self.expected_batch_size:g} exceeds the {self.n_samples} training records")
        self.sample_rate = self.expected_batch_size / self.n_samples
        self._check_fusable()
        self.args = self._private_training_args(self.args)
        self.fusion_report = fuse(self.model)
        logger.info("DPTrainer: %s", self.fusion_report)
        if not trainable_parameters(self.model):   # ValueError naming a parameter without per-sample gradients
            raise ValueError("model: it has no trainable parameters")
        self.privacy_engine = PrivacyEngine(accountant=dp_args.accountant, secure_mode=dp_args.secure_mode)
        self.noise_multiplier: Optional[float] = dp_args.noise_multiplier
        self._dp_optimizer: Optional[DPOptimizer] = None
        self._resumed_state: Optional[dict] = None
        self._epsilon_cache: tuple = (None, 0.0)
        self._planned_steps: Optional[int] = None

    def _private_training_args(self, args):
        """A copy of ``args`` for DP-SGD (the caller's stays as it was): the Trainer's clipping of
        the batch gradient off, since DP clips each sample; activation checkpointing, where on,
        non-reentrant, since a reentrant one runs each segment's backward as a pass of its own."""
        user_norm = args.max_grad_norm
        args = copy.copy(args)
        args.max_grad_norm = 0.0
        if user_norm is not None and user_norm > 0 and user_norm != _DEFAULT_MAX_GRAD_NORM:
            message = (f"TrainingArguments.max_grad_norm={user_norm:g} is turned off: DP-SGD clips each sample's "
                       f"gradient to DPArguments.max_grad_norm={self.dp_args.max_grad_norm!r} instead")
            logger.warning(message)
            warnings.warn(message, UserWarning, stacklevel=3)
        if getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False):
            # transformers 5 renamed gradient_checkpointing_kwargs to activation_checkpointing_kwargs and
            # keeps the old name as a mirror: both are set
            names = [name for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
                     if hasattr(args, name)]
            kwargs = getattr(args, names[0]) or {}
            if kwargs.get("use_reentrant") is True:
                raise ValueError(f"args.{names[0]}={{'use_reentrant': True, ...}}: reentrant checkpointing runs each "
                                 "checkpointed segment's backward as a pass of its own, so DP-SGD could not clip "
                                 "each sample's whole gradient; use use_reentrant=False")
            for name in names:
                setattr(args, name, {**kwargs, "use_reentrant": False})
        return args

    # ---- checks
    def _check_fusable(self) -> None:
        """Refuse, before anything changes, a trainable PEFT layer that would stay unfused: only
        lorafast's layers give per-sample gradients (fuse() keeps such a layer for non-private
        training)."""
        if not any(is_peft_lora_layer(m) for m in self.model.modules()):
            return
        blocked = [(name, why) for name, module, why in unfusable_layers(self.model)
                   if any(p.requires_grad for p in module.parameters())]
        if blocked:
            listed = "\n".join(f"  {name}: {why}" for name, why in blocked)
            raise ValueError(f"model: {len(blocked)} trainable PEFT LoRA layer(s) cannot be fused, and DP-SGD needs "
                             f"the per-sample gradients that only fused layers compute:\n{listed}")

    def _check_training_args(self) -> None:
        args = self.args
        if getattr(args, "fp16", False):
            raise ValueError("args.fp16=True scales the loss with a GradScaler, which would scale every per-sample "
                             "gradient before clipping: use bf16=True or fp32")
        if args.world_size > 1:
            raise ValueError(f"DPTrainer runs on one process (args.world_size = {args.world_size}): "
                             "DDP would all-reduce unclipped gradients")
        # the Poisson sampler replaces the Trainer's: a sampling option that promises some other
        # order would be silently ignored, so it is refused (group_by_length before transformers 5)
        strategy = getattr(args, "train_sampling_strategy", "random")
        if getattr(args, "group_by_length", False) or strategy != "random":
            name, value = (("train_sampling_strategy", repr(strategy)) if strategy != "random"
                           else ("group_by_length", "True"))
            raise ValueError(f"args.{name}={value} sets the order of the training records, but DP-SGD samples "
                             "them by Poisson (each record joins each batch independently), as the accountant "
                             f"assumes: leave args.{name} at its default")
        if getattr(args, "packing", False) or getattr(self, "padding_free", False):
            raise ValueError("args.packing / padding_free put several records in one row, so one row's gradient "
                             "is not one record's: DP-SGD needs packing=False and padding_free=False")

    def _check_sampling(self, loader) -> None:
        sampler = _poisson_sampler(loader)
        if sampler is None:
            inner = getattr(loader, "batch_sampler", None)
            raise ValueError(
                f"the training DataLoader's sampler ({type(getattr(loader, 'sampler', None)).__name__}, batch sampler "
                f"{type(inner).__name__}) is not Poisson, while the accountant assumes Poisson sampling: don't "
                "override get_train_dataloader or _get_train_sampler in a DPTrainer")
        if abs(sampler.sample_rate - self.sample_rate) > 1e-12:
            raise ValueError(f"the training DataLoader samples at rate {sampler.sample_rate:g}, the accountant "
                             f"at {self.sample_rate:g}")

    # ---- data
    def get_train_dataloader(self):
        """Poisson batches at q = E/N, each as gradient_accumulation_steps chunks."""
        own_sampler = type(self)._get_train_sampler
        if own_sampler is not Trainer._get_train_sampler and not getattr(own_sampler, "_lorafast_ok", False):
            sampler = self._get_train_sampler(self.train_dataset)
            if sampler is not None and not isinstance(sampler, PoissonBatchSampler):
                raise ValueError(f"_get_train_sampler returns a {type(sampler).__name__}, which is not Poisson "
                                 "sampling, while the accountant assumes Poisson sampling")
        dataset, collator = self.train_dataset, self.data_collator
        try:
            import datasets
            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        seed = self.dp_args.sampling_seed
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        args = self.args
        kwargs = dict(num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                      persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0)
        if args.dataloader_num_workers > 0 and args.dataloader_prefetch_factor is not None:
            kwargs["prefetch_factor"] = args.dataloader_prefetch_factor
        loader = DPDataLoader(dataset, self.sample_rate, collate_fn=collator, generator=generator,
                              secure_mode=self.dp_args.secure_mode,
                              micro_batches=args.gradient_accumulation_steps, **kwargs)
        return self.accelerator.prepare(loader)

    def set_initial_training_values(self, args, dataloader, *rest, **kwargs):
        self._check_sampling(dataloader)
        values = super().set_initial_training_values(args, dataloader, *rest, **kwargs)
        # the run's optimizer steps (max_steps, or epochs × steps per epoch), known here before the
        # optimizer is built; transformers < 5 sets state.max_steps only after building it
        self._planned_steps = int(values[-1])
        return values

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of the next optimizer step, or none (and training stops) when that
        step would take ε past the target. The loop asks here before every step, the first one
        after a resume included, so no step past the budget is ever taken."""
        if self._dp_optimizer is not None and self.next_step_exceeds_target():
            message = (f"DPTrainer: stopping at step {self.state.global_step}: ε = {self.epsilon:.4g} at δ = "
                       f"{self.delta:.3g}, and one more step would spend ε = {self._epsilon_after_next_step():.4g} "
                       f"> target_epsilon = {self.dp_args.target_epsilon:g}")
            logger.warning(message)
            warnings.warn(message, UserWarning, stacklevel=2)
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    # ---- the private optimizer
    def _calibrated_noise_multiplier(self) -> float:
        if self._resumed_state is not None and "noise_multiplier" in self._resumed_state:
            return float(self._resumed_state["noise_multiplier"])  # the resumed run keeps its plan
        if self.dp_args.noise_multiplier is not None:
            return float(self.dp_args.noise_multiplier)
        steps = self._planned_steps
        sigma = get_noise_multiplier(self.dp_args.target_epsilon, self.delta, self.sample_rate, steps,
                                     accountant=self.dp_args.accountant)
        logger.info("DPTrainer: noise multiplier σ = %.4f gives ε ≤ %g at δ = %.3g over %d steps at q = %.4g",
                    sigma, self.dp_args.target_epsilon, self.delta, steps, self.sample_rate)
        return sigma

    def create_optimizer(self, model=None):
        if self._dp_optimizer is not None:
            return self.optimizer
        # transformers < 5 has create_optimizer(self), without the model argument
        base = super().create_optimizer() if model is None else super().create_optimizer(model)
        module = self.model
        named = trainable_parameters(module)
        bounds = _check_bounds(self.dp_args.max_grad_norm, self.dp_args.clipping, len(named), [n for n, _ in named])
        self.noise_multiplier = self._calibrated_noise_multiplier()
        engine = self.privacy_engine
        dp_optimizer = engine._attach(module, base, named, self.noise_multiplier, bounds, self.dp_args.clipping,
                                      "sum", self.dp_args.noise_seed, None, self.sample_rate,
                                      self.expected_batch_size)
        state = self._resumed_state
        if state is not None:
            engine.accountant.load_state_dict(state["accountant"])
            dp_optimizer.steps = int(state.get("steps", 0))
            if self.dp_args.noise_seed is not None:   # the same key: continue its Philox stream, never reuse it
                dp_optimizer._noise_offset = int(state.get("noise_offset", 0))
        self._dp_optimizer = dp_optimizer
        self.optimizer = dp_optimizer
        return dp_optimizer

    # ---- one micro-batch
    def per_sample_losses(self, model, inputs) -> torch.Tensor:
        """(B,) loss of each record in ``inputs``, each from that record alone. Override for a
        model whose loss ``losses.per_sample_losses`` does not know."""
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("the training batches have no 'labels': DPTrainer computes each record's loss "
                             "from the logits and labels")
        feed = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
        outputs = model(**feed)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return per_sample_losses(hf_root(self.model), logits, labels)

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        store = self._dp_optimizer.store
        if _batch_size(inputs) == 0:   # an empty Poisson chunk: no samples, the step still adds its noise
            self._dp_optimizer.fold_samples(torch.zeros((0, store.width), device=store.device),
                                            torch.zeros((0, len(store.params)), device=store.device))
            return torch.zeros((), device=self.args.device)
        with self.compute_loss_context_manager():
            losses = self.per_sample_losses(model, inputs)
        total = losses.sum()
        total.backward()          # loss_reduction "sum": row i of the per-sample buffer is ∇ℓᵢ
        return total.detach().to(self.args.device) / self.expected_batch_size

    def _get_grad_norm(self, model, grad_norm=None):
        return None   # .grad exists only inside the private step; the batch norm is not what is clipped

    # ---- privacy bookkeeping
    @property
    def epsilon(self) -> float:
        """ε spent so far at ``delta``."""
        acc = self.privacy_engine.accountant
        key = (acc.steps, len(acc.history))
        if self._epsilon_cache[0] != key:
            self._epsilon_cache = (key, acc.get_epsilon(self.delta))
        return self._epsilon_cache[1]

    def _epsilon_after_next_step(self) -> float:
        acc = Accountant(self.privacy_engine.accountant.mechanism)
        acc.load_state_dict(self.privacy_engine.accountant.state_dict())
        acc.step(self.noise_multiplier, self.sample_rate)
        return acc.get_epsilon(self.delta)

    def next_step_exceeds_target(self) -> bool:
        target = self.dp_args.target_epsilon
        if target is None or self.noise_multiplier is None:
            return False
        acc = self.privacy_engine.accountant
        planned = self._planned_steps if self._resumed_state is None else None
        if planned is not None and acc.steps + 1 <= planned:
            return False   # calibrated for max_steps: ε grows with the steps, so it is below target until then
        return self._epsilon_after_next_step() > target

    def log(self, logs, *args, **kwargs):
        if self._dp_optimizer is not None:
            logs["epsilon"] = self.epsilon
        return super().log(logs, *args, **kwargs)

    # ---- checkpoints
    def dp_state_dict(self) -> dict:
        opt = self._dp_optimizer
        return {"accountant": self.privacy_engine.accountant.state_dict(), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "expected_batch_size": self.expected_batch_size,
                "max_grad_norm": self.dp_args.max_grad_norm, "target_epsilon": self.dp_args.target_epsilon,
                "delta": self.delta, "epsilon": self.epsilon, "steps": opt.steps if opt else 0,
                "noise_offset": opt._noise_offset if opt else 0}

    def _save(self, output_dir=None, state_dict=None):
        """Adapters in PEFT's format (lorafast.save_adapters) and the privacy state."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapters(self.model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        if self._dp_optimizer is not None:
            Path(output_dir, DP_STATE_NAME).write_text(json.dumps(self.dp_state_dict(), indent=2) + "\n")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from ...interop.peft_format import load_adapters
        path = Path(resume_from_checkpoint)
        state_file = path / DP_STATE_NAME
        if not state_file.is_file():
            raise ValueError(f"resume_from_checkpoint: {path} has no {DP_STATE_NAME}, so its privacy spending is "
                             "unknown; resume only from a DPTrainer checkpoint")
        state = json.loads(state_file.read_text())
        Accountant(self.dp_args.accountant).load_state_dict(state["accountant"])   # checked before loading
        load_adapters(self.model if model is None else model, path)
        self._resumed_state = state
        logger.info("DPTrainer: resumed at ε = %.4g after %d private steps", state.get("epsilon", float("nan")),
                    int(state.get("steps", 0)))


class DPTrainer(DPTrainerMixin, Trainer):
    """``transformers.Trainer`` that trains with DP-SGD (see ``DPTrainerMixin``)::

        trainer = DPTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=ds,
                            dp_args=DPArguments(target_epsilon=8.0, target_delta=1e-5, max_grad_norm=1.0))
        trainer.train()      # "epsilon" in every trainer.state.log_history entry
    """
