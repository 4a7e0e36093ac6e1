"""PrivacyEngine: Opacus's API, lorafast's fused per-sample kernels.

    engine = PrivacyEngine(accountant="pld")
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    ... loss.backward(); optimizer.step(); optimizer.zero_grad() ...
    engine.get_epsilon(delta=1e-5)

``make_private`` validates everything before it changes anything. It returns the same
module (its LoRALinear layers and trainable nn.Linear layers now compute per-sample
gradients), a ``DPOptimizer`` around the given optimizer, and the data loader, replaced
by a Poisson-sampling one when ``poisson_sampling`` is True (the accountant's
assumption). The accountant records one Poisson-subsampled Gaussian step per
``optimizer.step()``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .._checks import check_choice, check_count, check_nonnegative, check_positive, check_seed
from .accountant import MECHANISMS, Accountant, get_noise_multiplier
from .data_loader import DPDataLoader
from .grad_sample import LOSS_REDUCTIONS, GradSampleStore, attach, is_attached, trainable_parameters
from .optimizer import DPOptimizer, distributed_world

ACCOUNTANTS = MECHANISMS
CLIPPINGS = ("flat", "per_layer")


def _check_bounds(max_grad_norm, clipping: str, n_params: int, names: list[str]):
    if clipping == "flat":
        if isinstance(max_grad_norm, (list, tuple)):
            raise ValueError("max_grad_norm must be a single number with clipping='flat' "
                             f"(a list is for clipping='per_layer'), got {max_grad_norm!r}")
        return check_positive("max_grad_norm", max_grad_norm)
    if not isinstance(max_grad_norm, (list, tuple)):
        raise ValueError("max_grad_norm must be a list with one bound per trainable parameter with "
                         f"clipping='per_layer' ({n_params}: {names}), got {max_grad_norm!r}")
    if len(max_grad_norm) != n_params:
        raise ValueError(f"max_grad_norm has {len(max_grad_norm)} bounds but the module has {n_params} "
                         f"trainable parameters ({names})")
    return [check_positive(f"max_grad_norm[{i}]", c) for i, c in enumerate(max_grad_norm)]


class PrivacyEngine:
    """Makes a model, optimizer and data loader differentially private (DP-SGD).

    Args:
        accountant: "pld" (privacy loss distributions, tight) or "rdp" (Rényi DP, looser).
        secure_mode: draw noise and Poisson batches from the OS's cryptographically secure
            generator instead of Philox / torch's generator (slower; see lorafast.dp.noise).
    """

    def __init__(self, accountant: str = "pld", secure_mode: bool = False):
        self.accountant_name = check_choice("accountant", accountant, ACCOUNTANTS)
        self.accountant = Accountant(accountant)
        self.secure_mode = bool(secure_mode)

    def make_private(self, *, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader,
                     noise_multiplier: float, max_grad_norm: Union[float, Sequence[float]],
                     clipping: str = "flat", poisson_sampling: bool = True, loss_reduction: str = "mean",
                     noise_seed: Optional[int] = None, backend: Optional[str] = None):
        """Returns (module, DPOptimizer, data_loader). ``noise_seed`` fixes the Philox noise
        key (None: from the OS); ``backend`` forces the kernels' backend."""
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(module, DistributedDataParallel):
            raise ValueError("module must not be wrapped in DistributedDataParallel: its gradient hooks "
                             "all-reduce unclipped gradients. Wrap it in lorafast.dp.DPDDP instead; the "
                             "optimizer all-reduces the clipped sums.")
        if is_attached(module):
            raise ValueError("module is already private (make_private was called on it before)")
        if not isinstance(optimizer, Optimizer) or isinstance(optimizer, DPOptimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer (not yet private), got "
                             f"{type(optimizer).__name__}")
        if not isinstance(data_loader, DataLoader):
            raise ValueError(f"data_loader must be a torch.utils.data.DataLoader, got {type(data_loader).__name__}")
        noise_multiplier = check_nonnegative("noise_multiplier", noise_multiplier)
        check_choice("clipping", clipping, CLIPPINGS)
        check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        noise_seed = check_seed("noise_seed", noise_seed)
        named = trainable_parameters(module)
        if not named:
            raise ValueError("module has no trainable parameters")
        devices = {p.device for _, p in named}
        if len(devices) > 1:
            raise ValueError(f"module's trainable parameters must be on one device, found {sorted(map(str, devices))}")
        bounds = _check_bounds(max_grad_norm, clipping, len(named), [n for n, _ in named])

        _, world = distributed_world()
        n_data = len(data_loader.dataset)
        if poisson_sampling:
            loader = DPDataLoader.from_data_loader(data_loader, secure_mode=self.secure_mode,
                                                   distributed=world > 1)
            sample_rate = loader.sample_rate
            expected = loader.expected_batch_size
        else:
            if data_loader.batch_size is None:
                raise ValueError("data_loader must have a batch_size when poisson_sampling=False")
            loader = data_loader
            expected = float(data_loader.batch_size)
            sample_rate = min(1.0, data_loader.batch_size * world / n_data)

        store = GradSampleStore([p for _, p in named], loss_reduction=loss_reduction,
                                backend=backend)
        dp_optimizer = DPOptimizer(optimizer, store=store, noise_multiplier=noise_multiplier,
                                   max_grad_norm=bounds, per_layer=clipping == "per_layer",
                                   expected_batch_size=expected, noise_seed=noise_seed,
                                   secure_mode=self.secure_mode)
        dp_optimizer.parameter_names = [n for n, _ in named]
        dp_optimizer.attach_step_hook(lambda opt: self.accountant.step(opt.noise_multiplier, sample_rate))
        attach(module, store)
        self.sample_rate = sample_rate
        return module, dp_optimizer, loader

    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader,
                                  target_epsilon: float, target_delta: float, epochs: int,
                                  max_grad_norm: Union[float, Sequence[float]], **kwargs):
        """``make_private`` with the smallest noise multiplier that keeps ε ≤ target_epsilon at
        target_delta after ``epochs`` epochs of len(data_loader) steps each."""
        check_positive("target_epsilon", target_epsilon)
        epochs = check_count("epochs", epochs, 1)
        if not isinstance(data_loader, DataLoader) or len(data_loader) == 0:
            raise ValueError("data_loader must be a non-empty torch.utils.data.DataLoader")
        sample_rate = 1.0 / len(data_loader)
        sigma = get_noise_multiplier(target_epsilon, target_delta, sample_rate, epochs * len(data_loader),
                                     accountant=self.accountant_name)
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm, **kwargs)

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at this δ, over the steps actually taken."""
        return self.accountant.get_epsilon(delta)
