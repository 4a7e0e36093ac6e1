"""A whole federated run in one process: k clients' local steps as one batched step.

The model's MultiLoRALinear layers hold the k clients' adapters over the shared frozen
base (``inject_adapters(model, ..., clients=k)``). Each local step takes a batch from every
client, runs them together through the model (one base GEMM per layer for all clients) and
gives each client the gradient of its own mean loss: the step's loss is Σ_c mean_{i∈c} ℓᵢ,
and the clients' parameters are disjoint slices, so client c's slice receives exactly the
gradient of its loss alone. One AdamW over the stacks equals k clients' own AdamWs (its
state is per element), created afresh every round as each client's local training is. At
the end of a round every layer is aggregated as the Flower strategy aggregates it
(``federated.aggregate(layer)``) and the global adapter written back into all k slots.
With ``resample_rounds=τ`` every τ-th round then ends with Flora's resampling
(lorafast.resample): the global adapter is folded into the shared base and every client
restarts from a new random A (the seed schedule's, from ``seed``) with B = 0.

With ``dp=`` every client is its own DP-SGD run (``PrivacyEngine.make_private_clients``):
its batches Poisson sampled from its data, its samples clipped within it, one noise draw
per client per step, and its ε reported after each round.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .._checks import check_choice, check_count, check_positive, check_seed
from ..multi_lora import clients as client_context, multi_layers
from ..resample import resample_adapters, resample_layers
from .aggregate import METHODS, _normalise, aggregate


@dataclass
class SimulationResult:
    """Per-round metrics: ``rounds[t]`` has "round", "train_loss" (the clients' mean local loss,
    weighted as the aggregation is), "client_loss" (each client's mean over its local steps)
    and whatever ``eval_fn`` returned."""
    rounds: list[dict] = field(default_factory=list)

    def series(self, key: str) -> list[float]:
        return [r[key] for r in self.rounds if key in r]

    def plot(self, path: Union[str, Path], title: str = "federated simulation") -> Path:
        """A PNG of every scalar metric against the round (matplotlib)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        keys = [k for k, v in self.rounds[0].items() if k != "round" and isinstance(v, (int, float))]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
        x = self.series("round")
        for ax, key in zip(axes[0], keys):
            ax.plot(x, self.series(key), marker="o")
            ax.set_xlabel("round")
            ax.set_title(key)
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def causal_lm_loss(model: nn.Module, batch: dict) -> Tensor:
    """Per-sample loss of a Hugging Face causal LM: the mean next-token cross-entropy over each
    sample's labelled tokens (labels -100 are ignored, as transformers does)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(labels.shape)
    return tok.sum(1) / (labels != -100).sum(1).clamp_min(1)


def classification_loss(model: nn.Module, batch) -> Tensor:
    """Per-sample cross-entropy of ``(x, y)`` batches."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def _concat(batches: list):
    """One batch of the clients' batches, along the first dimension."""
    first = batches[0]
    if isinstance(first, dict):
        return {k: torch.cat([b[k] for b in batches]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(torch.cat(parts) for parts in zip(*batches))
    return torch.cat(batches)


def _size(batch) -> int:
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    return len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(v.to(device) for v in batch)
    return batch.to(device)


class _Cycle:
    """An endless stream of one client's shuffled batches."""

    def __init__(self, loader: DataLoader):
        self.loader, self.it = loader, iter(loader)

    def next(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


DP_KEYS = {"noise_multiplier", "max_grad_norm", "delta", "noise_seed", "clipping", "accountant"}


def _dp_config(dp) -> dict:
    if not isinstance(dp, dict) or not {"noise_multiplier", "max_grad_norm"} <= set(dp) or set(dp) - DP_KEYS:
        raise ValueError(f"dp must be a dict with noise_multiplier and max_grad_norm (and optionally delta, "
                         f"noise_seed, clipping, accountant), got {dp!r}")
    return {"delta": 1e-5, **dp}


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def simulate(model: nn.Module, client_datasets: Sequence, *, rounds: int, local_steps: int, method: str = "fedex",
             client_weights=None, dp=None, batch_size: int = 4, lr: float = 1e-4, weight_decay: float = 0.0,
             loss_fn: Optional[Callable] = None, collate_fn: Optional[Callable] = None,
             eval_fn: Optional[Callable[[nn.Module], dict]] = None, seed: int = 0, progress: bool = True,
             plot: Optional[Union[str, Path]] = None, resample_rounds: Optional[int] = None) -> SimulationResult:
    """Run ``rounds`` federated rounds of ``local_steps`` local steps for every client at once.

    Args:
        model: a model whose MultiLoRALinear layers hold k clients (``inject_adapters(...,
            clients=k)`` or ``from_peft(..., clients=k)``), on the device to run on.
        client_datasets: k map-style datasets, one per client; items collate (``collate_fn``,
            default torch's) into dicts of tensors or (x, y) tuples of one shape across clients.
        method: "fedex", "fedavg", "ffa" or "flora" (``federated.aggregate`` on each layer).
        client_weights: k aggregation weights; default each client's dataset size.
        dp: per-client DP-SGD, a dict: ``noise_multiplier`` and ``max_grad_norm`` (one value
            or one per client), and optionally ``delta`` (1e-5, for the ε reported in each
            round's "epsilon"), ``noise_seed``, ``clipping``, ``accountant``. Each client's
            batches are then Poisson sampled with ``batch_size`` expected samples.
        batch_size: each client's samples per local step.
        lr, weight_decay: the clients' AdamW.
        loss_fn: ``loss_fn(model, batch) -> (n,)`` per-sample losses; default
            ``causal_lm_loss`` for dict batches with "labels", ``classification_loss`` for (x, y).
        eval_fn: ``eval_fn(model) -> dict`` of metrics after each round's aggregation (every
            client then holds the global adapter, so client id 0 evaluates the global model).
        seed: the clients' data order, and the base of the resampling's seed schedule.
        progress: a progress bar per round (tqdm, where installed).
        plot: a path: the per-round metrics are also plotted there (PNG).
        resample_rounds: Flora: after every this many rounds' aggregation, resample every
            "lora"/"ffa" layer (``resample_adapters(model, seed, count=round)``); None: never.
    """
    layers = multi_layers(model)
    if not layers:
        raise ValueError("model has no MultiLoRALinear layers: convert it with inject_adapters(..., clients=k) or "
                         "from_peft(..., clients=k)")
    k = layers[0].clients
    if not isinstance(client_datasets, Sequence) or len(client_datasets) != k:
        raise ValueError(f"client_datasets must be a list of {k} datasets, one per client of the model's "
                         f"MultiLoRALinear layers, got {type(client_datasets).__name__}"
                         + (f" of {len(client_datasets)}" if isinstance(client_datasets, Sequence) else ""))
    sizes = []
    for i, ds in enumerate(client_datasets):
        try:
            sizes.append(len(ds))
        except TypeError:
            raise ValueError(f"client_datasets[{i}] must be a map-style dataset with a length") from None
        if sizes[-1] == 0:
            raise ValueError(f"client_datasets[{i}] is empty")
    check_count("rounds", rounds, minimum=1)
    check_count("local_steps", local_steps, minimum=1)
    check_count("batch_size", batch_size, minimum=1)
    check_choice("method", method, METHODS)
    check_positive("lr", lr)
    dp = _dp_config(dp) if dp is not None else None
    if resample_rounds is not None:
        check_count("resample_rounds", resample_rounds, minimum=1)
        check_seed("seed", seed)
        if not resample_layers(model):
            raise ValueError("resample_rounds needs MultiLoRALinear layers of variant 'lora' or 'ffa'")
    device = layers[0].weight.device
    weights = _normalise(sizes if client_weights is None else client_weights, k, torch.device("cpu")).tolist()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=lr, weight_decay=weight_decay)
    engine = None
    if dp is not None:
        from ..dp import PrivacyEngine
        engine = PrivacyEngine(accountant=dp.get("accountant", "pld"))
        model, opt, loader = engine.make_private_clients(
            module=model, optimizer=opt, client_datasets=list(client_datasets), expected_batch_size=batch_size,
            noise_multiplier=dp["noise_multiplier"], max_grad_norm=dp["max_grad_norm"],
            clipping=dp.get("clipping", "flat"), steps=rounds * local_steps, collate_fn=collate_fn,
            noise_seed=dp.get("noise_seed"), sampling_seed=seed)
        private = iter(loader)
        next_batch = lambda: next(private)  # noqa: E731
    else:
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(k)]
        streams = [_Cycle(DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, collate_fn=collate_fn))
                   for ds, g in zip(client_datasets, gens)]
        next_batch = lambda: _client_batches(streams)  # noqa: E731
    result = SimulationResult()
    model.train()
    try:
        for t in range(1, rounds + 1):
            bar = _progress(local_steps, f"round {t}/{rounds}", progress)
            losses = _local_steps(model, k, opt, local_steps, next_batch, loss_fn, device, bar)
            for layer in layers:
                aggregate(layer, method=method, client_weights=weights)
            if resample_rounds is not None and t % resample_rounds == 0:
                resample_adapters(model, seed, count=t)
            row = {"round": t, "train_loss": float(sum(w * x for w, x in zip(weights, losses))),
                   "client_loss": losses}
            if engine is not None:
                row["epsilon"] = engine.client_epsilons(dp["delta"])
                row["max_epsilon"] = max(row["epsilon"])
            if eval_fn is not None:
                model.eval()
                with torch.no_grad():
                    row.update(eval_fn(model))
                model.train()
            if not all(math.isfinite(x) for x in losses):
                raise FloatingPointError(f"round {t}: a client's loss is not finite ({losses}); lower lr")
            result.rounds.append(row)
            if progress:
                print(f"round {t}/{rounds}: " + ", ".join(f"{key} {v:.4f}" for key, v in row.items()
                                                          if isinstance(v, float)), file=sys.stderr)
    finally:
        if engine is not None:
            from ..dp.grad_sample import detach
            detach(model)
    if plot is not None:
        result.plot(plot)
    return result


def _client_batches(streams):
    """(batch, client_ids): one batch from each client's stream, in client order."""
    batches = [s.next() for s in streams]
    ids = torch.cat([torch.full((_size(b),), c, dtype=torch.int64) for c, b in enumerate(batches)])
    return _concat(batches), ids


def _local_steps(model, k, opt, steps, next_batch, loss_fn, device, bar) -> list[float]:
    """A round's local steps from a fresh optimizer state (as a client's local training starts);
    each client's mean loss over them."""
    opt.state.clear()
    totals = torch.zeros(k, dtype=torch.float64)
    for _ in range(steps):
        batch, ids = next_batch()
        batch, ids = _to(batch, device), ids.to(device)
        fn = loss_fn or (causal_lm_loss if isinstance(batch, dict) else classification_loss)
        with client_context(model, ids):
            per = fn(model, batch)
        counts = torch.bincount(ids, minlength=k).to(per.dtype).clamp_min(1)
        client_loss = torch.zeros(k, dtype=per.dtype, device=device).index_add_(0, ids, per) / counts
        client_loss.sum().backward()     # each client's slice: the gradient of its own mean loss
        opt.step()
        opt.zero_grad(set_to_none=True)
        totals += client_loss.detach().double().cpu()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{client_loss.mean().item():.4f}")
    if bar is not None:
        bar.close()
    return (totals / steps).tolist()
