"""PrivacyEngine: Opacus's API, lorafast's fused per-sample kernels.

    engine = PrivacyEngine(accountant="pld")
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer,
        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    ... loss.backward(); optimizer.step(); optimizer.zero_grad() ...
    engine.get_epsilon(delta=1e-5)

For k clients simulated in one model (MultiLoRALinear layers), ``make_private_clients``
makes each client its own DP-SGD run (lorafast.dp.clients): Poisson sampling per client,
clipping within each client, one noise draw per client per step, an accountant per client.

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
from ..multi_lora import multi_layers
from .accountant import MECHANISMS, Accountant, get_noise_multiplier
from .clients import ClientDPDataLoader, ClientDPOptimizer, client_noise_multipliers, client_noise_seeds
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
        self.client_accountants: Optional[list[Accountant]] = None   # per-client DP (make_private_clients)
        self.optimizer: Optional[DPOptimizer] = None                  # the last make_private's

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
        if multi_layers(module):
            raise ValueError("module has MultiLoRALinear layers (k clients' adapters): make each client private "
                             "with make_private_clients")
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

        dp_optimizer = self._attach(module, optimizer, named, noise_multiplier, bounds, clipping, loss_reduction,
                                    noise_seed, backend, sample_rate, expected)
        return module, dp_optimizer, loader

    def _attach(self, module, optimizer, named, noise_multiplier, bounds, clipping, loss_reduction, noise_seed,
                backend, sample_rate: float, expected_batch_size: float) -> DPOptimizer:
        """Per-sample mode on ``module`` and a DPOptimizer around ``optimizer`` whose steps the
        accountant records at rate ``sample_rate``: make_private once its loader is settled (a
        sampler of its own, as the Trainer integration has, calls this with its q and E)."""
        store = GradSampleStore([p for _, p in named], loss_reduction=loss_reduction,
                                backend=backend)
        dp_optimizer = DPOptimizer(optimizer, store=store, noise_multiplier=noise_multiplier,
                                   max_grad_norm=bounds, per_layer=clipping == "per_layer",
                                   expected_batch_size=expected_batch_size, noise_seed=noise_seed,
                                   secure_mode=self.secure_mode)
        dp_optimizer.parameter_names = [n for n, _ in named]
        dp_optimizer.attach_step_hook(lambda opt: self.accountant.step(opt.noise_multiplier, sample_rate))
        attach(module, store)
        self.sample_rate = sample_rate
        self.optimizer = dp_optimizer     # what a PrivacyAudit of this engine watches
        return dp_optimizer

    def make_private_clients(self, *, module: nn.Module, optimizer: Optimizer, client_datasets: Sequence,
                             expected_batch_size, noise_multiplier, max_grad_norm: Union[float, Sequence[float]],
                             clipping: str = "flat", loss_reduction: str = "mean", steps: Optional[int] = None,
                             collate_fn=None, noise_seed=None, sampling_seed: Optional[int] = None,
                             backend: Optional[str] = None):
        """Per-client DP-SGD for a model whose MultiLoRALinear layers hold k clients' adapters.
        Returns (module, ClientDPOptimizer, ClientDPDataLoader); the loader yields
        ``(batch, client_ids)``: run the model inside ``lorafast.clients(model, client_ids)``.

        ``expected_batch_size`` (client c's E_c, so q_c = E_c / len(client_datasets[c])) and
        ``noise_multiplier`` are one value or one per client; ``noise_seed`` one key (client c
        takes key + c), k keys or None (from the OS). With loss_reduction "mean" the loss to
        backward is Σ_c the mean loss over client c's samples (what ``federated.simulate``
        forms); with "sum" the sum of every sample's loss. ``client_epsilons`` reports ε per
        client, ``get_epsilon`` the largest."""
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
        if is_attached(module):
            raise ValueError("module is already private (make_private was called on it before)")
        layers = multi_layers(module)
        if not layers:
            raise ValueError("module has no MultiLoRALinear layers: make_private_clients is for k clients in one "
                             "model (inject_adapters(..., clients=k)); use make_private for one")
        k = layers[0].clients
        if not isinstance(optimizer, Optimizer) or isinstance(optimizer, DPOptimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer (not yet private), got "
                             f"{type(optimizer).__name__}")
        if distributed_world()[1] > 1:
            raise ValueError("make_private_clients runs on one process (torch.distributed is initialised)")
        if not isinstance(client_datasets, (list, tuple)) or len(client_datasets) != k:
            raise ValueError(f"client_datasets must be a list of {k} datasets, one per client of the model's "
                             f"MultiLoRALinear layers")
        check_choice("clipping", clipping, CLIPPINGS)
        check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        sigmas = client_noise_multipliers(noise_multiplier, k)
        seeds = client_noise_seeds(noise_seed, k)
        named = trainable_parameters(module)
        stacked = {id(p) for m in layers for p in (m.lora_A, m.lora_B, m.lora_R) if p is not None}
        shared = [n for n, p in named if id(p) not in stacked]
        if shared:
            raise ValueError(f"module: trainable parameters {shared[:3]} are shared by every client; per-client DP "
                             "trains only the clients' own adapters (freeze them)")
        if not named:
            raise ValueError("module has no trainable parameters")
        bounds = _check_bounds(max_grad_norm, clipping, len(named), [n for n, _ in named])
        loader = ClientDPDataLoader(client_datasets, expected_batch_size, steps=steps, collate_fn=collate_fn,
                                    seed=sampling_seed, secure_mode=self.secure_mode)
        store = GradSampleStore([p for _, p in named], loss_reduction=loss_reduction, backend=backend, clients=k)
        dp_optimizer = ClientDPOptimizer(optimizer, store=store, noise_multipliers=sigmas, max_grad_norm=bounds,
                                         per_layer=clipping == "per_layer",
                                         expected_batch_sizes=loader.expected_batch_sizes, noise_seeds=seeds,
                                         secure_mode=self.secure_mode)
        dp_optimizer.parameter_names = [n for n, _ in named]
        self.client_accountants = [Accountant(self.accountant_name) for _ in range(k)]
        rates = loader.sample_rates

        def account(opt):
            for acc, sigma, q in zip(self.client_accountants, sigmas, rates):
                acc.step(sigma, q)
        dp_optimizer.attach_step_hook(account)
        attach(module, store)
        self.sample_rates = rates
        return module, dp_optimizer, loader

    def client_epsilons(self, delta: float) -> list[float]:
        """Each client's ε at this δ over the steps taken (after ``make_private_clients``)."""
        if self.client_accountants is None:
            raise ValueError("client_epsilons is for make_private_clients; this engine made no clients private")
        return [acc.get_epsilon(delta) for acc in self.client_accountants]

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
        """ε spent so far at this δ, over the steps actually taken (per client: the largest)."""
        if self.client_accountants is not None:
            return max(self.client_epsilons(delta))
        return self.accountant.get_epsilon(delta)
