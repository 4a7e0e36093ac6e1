"""The ``FedExLoRA`` strategy: FedAvg with exact aggregation of the adapters, and the
version history that keeps the clients' frozen bases equal to the server's master copy.

**Keeping the clients' frozen bases equal to the master copy.** For "fedex" and
"flora" W changes every round, by ``U V`` with rank K = k·r (k clients of rank r;
the centred FedEx factors have rank ≤ (k−1)·r). The server sends that change as
low-rank factors rather than the updated weights, because they are cheaper while
K·(out+in) < out·in. Each change bumps a base version; the server remembers which
version each node holds (the version it sent, then the one the node reports in
``BASE_VERSION_KEY``) and sends every message its node's catch-up:

* a node that took part in the last round gets that round's (U, V);
* a node that missed m rounds gets the m rounds' factors concatenated
  (K = Σ Kⱼ), or ``P.weight`` itself once that is cheaper;
* a node never heard of starts at version 0 (the ``base_weights`` given here,
  which must equal the clients' pretrained bases); a node whose reply was lost or
  failed gets ``P.weight`` (copying it is idempotent).

The versions travel as the int64 array ``BASE_VERSION_KEY`` = [from, to] (from = −1
when every layer is sent whole). ``apply_global_adapters`` applies a payload once:
given the node's ``base_version`` it skips residuals it already has, refuses ones
for another version, and returns the new version. The server keeps factors only
while they can still beat sending the weight, so its history is at most about one
extra copy of the adapted weights.

**Communication per round and adapted layer** (out × in, rank r, k clients,
4 bytes per fp32 number): each client uploads r·(out+in); each client downloads
r·(out+in) of adapters plus, for "fedex"/"flora", the residual K·(out+in) with
K = k·r, so (k+1)·r·(out+in) in all, against out·in for the updated weight. For a
4096 × 4096 projection with r = 16 and k = 8: 0.5 MiB of adapters, 4 MiB of
residual, 64 MiB for the weight. Factors stop paying at K ≥ out·in/(out+in)
(2048 here, e.g. 128 clients of rank 16). "fedavg" and "ffa" send the adapters
only (FFA's A never changes; it is resent for simplicity).
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
from flwr.supercore import log

from ... import _ops
from ..._checks import check_choice, check_count, check_finite, check_fraction, check_nonnegative
from ...federated import METHODS, aggregate
from .records import (ADAPTER_SUFFIXES, BASE_SUFFIXES, BASE_VERSION_KEY, VIRTUAL_CLIENTS_KEY, ArraysLike, split_key,
                      to_array, to_tensor, version_array)

__all__ = ["FedExLoRA"]

# The MetricRecord key of a client's base version before it became BASE_VERSION_KEY:
# clients running an older lorafast still report it, so replies are read under both.
LEGACY_BASE_VERSION_KEY = "lorafast.base-version"
_VERSION_KEYS = (BASE_VERSION_KEY, LEGACY_BASE_VERSION_KEY)
_BASE_CHANGING = ("fedex", "flora")


def _virtual_clients(content: RecordDict, weighted_by_key: str) -> list[RecordDict]:
    """A reply as the replies of its clients: itself, or for a node of m virtual clients
    (``VIRTUAL_CLIENTS_KEY`` = m, records.virtual_client_reply) m replies, the j-th with
    slice j of every stacked adapter and entry j of every list metric."""
    metrics = list(content.metric_records.values())
    if len(metrics) != 1 or VIRTUAL_CLIENTS_KEY not in metrics[0]:
        return [content]
    metrics = metrics[0]
    m = metrics[VIRTUAL_CLIENTS_KEY]
    arrays = list(content.array_records.values())
    if isinstance(m, bool) or not isinstance(m, int) or m < 1 or len(arrays) != 1:
        raise ValueError(f"a virtual-client reply needs {VIRTUAL_CLIENTS_KEY} >= 1 and one ArrayRecord, got {m!r} "
                         f"and {len(arrays)}")
    stacks = {}
    for key, value in arrays[0].items():
        if not split_key(key, ADAPTER_SUFFIXES + (".lora_R",)):
            raise ValueError(f"a virtual-client reply carries only the clients' adapters; {key!r} is not one")
        stacks[key] = value.numpy()
        if stacks[key].ndim != 3 or stacks[key].shape[0] != m:
            raise ValueError(f"a reply of {m} virtual clients must stack {key!r} as ({m}, ·, ·), got "
                             f"{stacks[key].shape}")
    per_client = {}
    for key, value in metrics.items():
        if key == VIRTUAL_CLIENTS_KEY:
            continue
        if isinstance(value, list) and len(value) != m:
            raise ValueError(f"a reply of {m} virtual clients has {len(value)} values of {key!r}")
        per_client[key] = value
    if not isinstance(per_client.get(weighted_by_key), list):
        raise ValueError(f"a reply of {m} virtual clients must give {weighted_by_key!r} as a list of {m} counts")
    return [RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v[j])) for k, v in stacks.items()}),
                        "metrics": MetricRecord({k: v[j] if isinstance(v, list) else v
                                                 for k, v in per_client.items()})})
            for j in range(m)]


def _factors_pay(rank: int, shape) -> bool:
    """Whether rank-``rank`` factors (U, V) of an (out, in) update are smaller than the weight."""
    out_f, in_f = shape
    return rank * (out_f + in_f) < out_f * in_f


def _drop_version(fn: Callable[[list[RecordDict], str], MetricRecord]):
    """Wrap a metrics aggregation so that the clients' base versions are not averaged."""
    def wrapped(records: list[RecordDict], weighting_key: str) -> MetricRecord:
        metrics = fn(records, weighting_key)
        for key in _VERSION_KEYS:
            if metrics is not None and key in metrics:
                del metrics[key]
        return metrics
    return wrapped


class FedExLoRA(FedAvg):
    """FedAvg whose LoRA adapters are aggregated exactly (see ``lorafast.integrations.flower``).

    Args:
        method: "fedex" (default), "fedavg", "ffa" or "flora" (``lorafast.federated.METHODS``).
        scaling: the adapters' s = lora_alpha / r, one number or {P: s} per layer.
        base_weights: {P: (out, in) tensor} of every adapted layer's frozen base (keys
            may also read ``P.weight``); copied to an fp32 master on the tensors'
            device. Required for "fedex" and "flora", optional for "fedavg" and "ffa"
            (then only used for shape checks and ``merged_weights``).
        backend: kernel backend of the FedEx merge (None: automatic).
        fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes,
        min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key,
        train_metrics_aggr_fn, evaluate_metrics_aggr_fn: as Flower's ``FedAvg``.
    """

    # pylint: disable=too-many-arguments,too-many-locals
    def __init__(self, method: str = "fedex", *, scaling: Union[float, Mapping[str, float]],
                 base_weights: Optional[Mapping[str, Tensor]] = None, backend: Optional[str] = None,
                 fraction_train: float = 1.0, fraction_evaluate: float = 1.0, min_train_nodes: int = 2,
                 min_evaluate_nodes: int = 2, min_available_nodes: int = 2,
                 weighted_by_key: str = "num-examples", arrayrecord_key: str = "arrays",
                 configrecord_key: str = "config",
                 train_metrics_aggr_fn: Optional[Callable[[list[RecordDict], str], MetricRecord]] = None,
                 evaluate_metrics_aggr_fn: Optional[Callable[[list[RecordDict], str], MetricRecord]] = None) -> None:
        check_choice("method", method, METHODS)
        check_fraction("fraction_train", fraction_train)
        check_fraction("fraction_evaluate", fraction_evaluate)
        for name, value in (("min_train_nodes", min_train_nodes), ("min_evaluate_nodes", min_evaluate_nodes),
                            ("min_available_nodes", min_available_nodes)):
            check_count(name, value)
        if not isinstance(weighted_by_key, str) or not weighted_by_key:
            raise ValueError(f"weighted_by_key must be a non-empty string, got {weighted_by_key!r}")
        self.method = method
        self.backend = backend
        self._base: Optional[dict[str, Tensor]] = self._master_copy(base_weights)
        self._scaling = self._check_scaling(scaling)
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, weighted_by_key=weighted_by_key,
                         arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
                         train_metrics_aggr_fn=train_metrics_aggr_fn,
                         evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn)
        self.train_metrics_aggr_fn = _drop_version(self.train_metrics_aggr_fn)
        self.evaluate_metrics_aggr_fn = _drop_version(self.evaluate_metrics_aggr_fn)
        # Base versions: version v is the master after v base updates. _history[j] holds
        # {P: (U, V)} of the update from version _history_start + j to the next one.
        self._version = 0
        self._history: list[dict[str, tuple[Tensor, Tensor]]] = []
        self._history_start = 0
        self._node_version: dict[int, Optional[int]] = {}   # None: unknown, send P.weight
        self._awaiting: set[int] = set()                    # messaged, reply not seen yet

    # -- configuration checks

    def _master_copy(self, weights) -> Optional[dict[str, Tensor]]:
        if weights is None:
            if self.method in _BASE_CHANGING:
                raise ValueError(f"base_weights is required for method={self.method!r}: the server keeps the "
                                 "master copy of every adapted layer's base weight")
            return None
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError("base_weights must be a non-empty dict {layer name: (out, in) tensor}")
        master = {}
        for key, w in weights.items():
            name = key[: -len(".weight")] if isinstance(key, str) and key.endswith(".weight") else key
            if not isinstance(name, str) or not name:
                raise ValueError(f"base_weights keys must be layer names, got {key!r}")
            if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
                raise ValueError(f"base_weights[{key!r}] must be a 2-D floating-point tensor (out, in)")
            if name in master:
                raise ValueError(f"base_weights names layer {name!r} twice")
            if not torch.isfinite(w).all():
                raise ValueError(f"base_weights[{key!r}] is not finite")
            master[name] = w.detach().to(torch.float32).clone().contiguous()
        return master

    def _check_scaling(self, scaling) -> Union[float, dict[str, float]]:
        if isinstance(scaling, Mapping):
            table = {k: check_finite(f"scaling[{k!r}]", v) for k, v in scaling.items()}
            missing = sorted(set(self._base or ()) - set(table))
            if missing:
                raise ValueError(f"scaling has no value for layers {missing}")
            return table
        return check_finite("scaling", scaling)

    def scaling_of(self, layer: str) -> float:
        """The adapter scaling s of ``layer``."""
        if isinstance(self._scaling, dict):
            if layer not in self._scaling:
                raise ValueError(f"scaling has no value for layer {layer!r}")
            return self._scaling[layer]
        return self._scaling

    @property
    def base_weights(self) -> Optional[dict[str, Tensor]]:
        """The fp32 master copy {P: W} (live tensors; None if not tracked)."""
        return self._base

    @property
    def base_version(self) -> int:
        """How many base updates the master copy has had."""
        return self._version

    def summary(self) -> None:
        log(INFO, "\t├──> LoRA aggregation: method=%s, %s adapted layers, base version %d", self.method,
            "untracked" if self._base is None else len(self._base), self._version)
        super().summary()

    def _check_adapter_shapes(self, prefix: str, a_shape, b_shape, where: str) -> None:
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise ValueError(f"{where}: {prefix}.lora_A {tuple(a_shape)} and {prefix}.lora_B {tuple(b_shape)} "
                             "must be (r, in) and (out, r)")
        if self._base is None:
            return
        if prefix not in self._base:
            raise ValueError(f"base_weights has no entry for layer {prefix!r} whose adapters are in {where}")
        out_f, in_f = self._base[prefix].shape
        if a_shape[1] != in_f or b_shape[0] != out_f:
            raise ValueError(f"{where}: {prefix}.lora_A {tuple(a_shape)} and {prefix}.lora_B {tuple(b_shape)} do "
                             f"not fit base_weights[{prefix!r}] of shape ({out_f}, {in_f})")

    def _check_global_arrays(self, arrays: ArrayRecord) -> None:
        """Fail before any client trains: every adapter sent must fit a known base weight."""
        layers: dict[str, dict[str, tuple]] = {}
        for key, value in arrays.items():
            split = split_key(key, ADAPTER_SUFFIXES)
            if split is not None:
                layers.setdefault(split[0], {})[split[1]] = tuple(value.shape)
        for prefix, shapes in layers.items():
            if len(shapes) != 2:
                raise ValueError(f"initial_arrays has only one of {prefix}.lora_A and {prefix}.lora_B")
            self._check_adapter_shapes(prefix, shapes[".lora_A"], shapes[".lora_B"], "initial_arrays")

    # -- sending: every message carries its node's catch-up of the base

    def _sync_payload(self, version: Optional[int]) -> dict[str, Array]:
        current = self._version
        if version == current:
            return {BASE_VERSION_KEY: version_array(current, current)}
        entries = None
        if version is not None and self._history_start <= version < current:
            entries = self._history[version - self._history_start:]
        payload: dict[str, Array] = {}
        whole = 0
        for name, w in self._base.items():
            if entries is not None:
                factors = [e[name] for e in entries if name in e]
                rank = sum(u.shape[1] for u, _ in factors)
                if rank == 0:
                    continue
                if _factors_pay(rank, w.shape):
                    payload[f"{name}.residual_U"] = to_array(torch.cat([u for u, _ in factors], dim=1))
                    payload[f"{name}.residual_V"] = to_array(torch.cat([v for _, v in factors], dim=0))
                    continue
            payload[f"{name}.weight"] = to_array(w)
            whole += 1
        start = -1 if whole == len(self._base) else version
        payload[BASE_VERSION_KEY] = version_array(start, current)
        return payload

    def _is_base_entry(self, key: str) -> bool:
        if key == BASE_VERSION_KEY:
            return True
        split = split_key(key, BASE_SUFFIXES)
        return split is not None and split[0] in self._base

    def with_base_sync(self, messages: Iterable[Message]) -> list[Message]:
        """Add to each message's ArrayRecord what its node needs to bring its base to the
        master copy (nothing for "fedavg"/"ffa"). ``configure_train`` and
        ``configure_evaluate`` use it; use it too for messages of your own (e.g. a final
        query), and pass the replies to ``note_replies``."""
        messages = list(messages)
        if self.method not in _BASE_CHANGING:
            return messages
        payloads: dict[Optional[int], dict[str, Array]] = {}
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            version = self._node_version.get(node, 0)
            if version not in payloads:
                payloads[version] = self._sync_payload(version)
            content = msg.content
            key = self.arrayrecord_key if self.arrayrecord_key in content.array_records else None
            arrays = content.array_records[key] if key is not None else ArrayRecord()
            # the catch-up replaces any base entries of adapted layers the caller put in
            merged = {k: v for k, v in arrays.items() if not self._is_base_entry(k)}
            merged.update(payloads[version])
            records = {k: v for k, v in content.items() if k != key}
            records[key or self.arrayrecord_key] = ArrayRecord(merged)
            md = msg.metadata
            out.append(Message(RecordDict(records), dst_node_id=node, message_type=md.message_type,
                               ttl=md.ttl, group_id=md.group_id or None))
            self._node_version[node] = self._version
            self._awaiting.add(node)
        return out

    def note_replies(self, replies: Iterable[Message]) -> None:
        """Record the base version each replying node reports; a node that failed or did
        not reply is unknown and gets the whole base weights next time."""
        for msg in replies:
            node = msg.metadata.src_node_id
            self._awaiting.discard(node)
            if msg.has_error():
                self._node_version[node] = None
                continue
            for metrics in msg.content.metric_records.values():
                key = next((k for k in _VERSION_KEYS if k in metrics), None)
                if key is not None:
                    v = metrics[key]
                    ok = isinstance(v, numbers.Real) and float(v).is_integer() and 0 <= v <= self._version
                    self._node_version[node] = int(v) if ok else None
        for node in self._awaiting:
            self._node_version[node] = None
        self._awaiting.clear()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._check_global_arrays(arrays)
        return self.with_base_sync(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.with_base_sync(super().configure_evaluate(server_round, arrays, config, grid))

    # -- aggregation

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        replies = list(replies)
        self.note_replies(replies)
        # validated below, once a node's virtual clients are replies of their own
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        contents = [c for msg in valid for c in _virtual_clients(msg.content, self.weighted_by_key)]
        validate_message_reply_consistency(replies=contents, weighted_by_key=self.weighted_by_key,
                                           check_arrayrecord=True)
        raw = [next(iter(c.metric_records.values()))[self.weighted_by_key] for c in contents]
        try:
            weights = [check_nonnegative(self.weighted_by_key, w) for w in raw]
        except ValueError:
            weights = None
        if weights is None or sum(weights) <= 0:
            raise ValueError(f"the clients' {self.weighted_by_key!r} metrics must be finite, >= 0 and not all "
                             f"zero, got {raw}")
        records = [next(iter(c.array_records.values())) for c in contents]
        arrays = self._aggregate_arrays(records, weights)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        replies = list(replies)
        self.note_replies(replies)
        return super().aggregate_evaluate(server_round, replies)

    def _client_adapters(self, records: list[ArrayRecord], prefix: str) -> tuple[list[Tensor], list[Tensor]]:
        """The clients' (A, B) of layer ``prefix``, checked: shapes against the base and each
        other, floating point, finite, and a shared A for "ffa"."""
        if f"{prefix}.lora_A" not in records[0] or f"{prefix}.lora_B" not in records[0]:
            raise ValueError(f"client replies carry only one of {prefix}.lora_A and {prefix}.lora_B")
        device = self._base[prefix].device if self._base is not None and prefix in self._base else "cpu"
        A = [to_tensor(r[f"{prefix}.lora_A"]).to(device) for r in records]
        B = [to_tensor(r[f"{prefix}.lora_B"]).to(device) for r in records]
        for i, (a, b) in enumerate(zip(A, B)):
            self._check_adapter_shapes(prefix, tuple(a.shape), tuple(b.shape), f"client reply {i}")
            if a.shape != A[0].shape:
                raise ValueError(f"client reply {i}: {prefix}.lora_A has shape {tuple(a.shape)} but client 0's "
                                 f"is {tuple(A[0].shape)}; one global adapter is broadcast, so all clients "
                                 "must share each layer's rank")
            if not (a.is_floating_point() and b.is_floating_point()):
                raise ValueError(f"client reply {i}: {prefix} adapters must be floating point")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"client reply {i}: {prefix} adapters are not finite")
        if self.method == "ffa" and any(not torch.equal(a, A[0]) for a in A[1:]):
            raise ValueError(f"method='ffa' needs every client to share {prefix}.lora_A exactly")
        self.scaling_of(prefix)
        return A, B

    def _aggregate_layer(self, prefix: str, A: list[Tensor], B: list[Tensor], weights: list[float],
                         p: Tensor) -> tuple[Tensor, Tensor, Optional[tuple[Tensor, Tensor]]]:
        """(global lora_A, global lora_B, base update (U, V) or None) of one layer; "fedex"
        and "flora" update the master copy."""
        s = self.scaling_of(prefix)
        if self._base is not None:
            weight = self._base[prefix]
        else:  # fedavg / ffa leave W alone: a stride-0 stand-in of the right shape
            weight = torch.zeros(1, 1, device=A[0].device).expand(B[0].shape[0], A[0].shape[1])
        res = aggregate(weight, A, B, method=self.method, client_weights=weights, scaling=s, backend=self.backend)
        if self.method != "flora":
            return res.lora_A, res.lora_B, res.residual
        # W += s·[B₁…B_k][p₁A₁; …; p_kA_k]; the adapters restart from (Ā, 0)
        U, V = (s * res.lora_B.to(torch.float32)).contiguous(), res.lora_A.to(torch.float32).contiguous()
        _ops.fedex_merge_(weight, U, V, None, self.backend)
        lora_A = torch.einsum("k,kri->ri", p.to(A[0].device), torch.stack([a.double() for a in A])).to(A[0].dtype)
        return lora_A, torch.zeros_like(B[0]), (U, V)

    def _aggregate_arrays(self, records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
        keys = list(records[0].keys())
        layers = sorted({s[0] for k in keys if (s := split_key(k, ADAPTER_SUFFIXES))})
        clients = {prefix: self._client_adapters(records, prefix) for prefix in layers}

        # Everything is checked: from here on the master copy changes.
        out: dict[str, Array] = {}
        update: dict[str, tuple[Tensor, Tensor]] = {}
        p = torch.tensor(weights, dtype=torch.float64)
        p = p / p.sum()
        for prefix in layers:
            lora_A, lora_B, residual = self._aggregate_layer(prefix, *clients[prefix], weights, p)
            if residual is not None:
                update[prefix] = residual
            out[f"{prefix}.lora_A"], out[f"{prefix}.lora_B"] = to_array(lora_A), to_array(lora_B)

        for key in keys:  # everything else: FedAvg's weighted mean, accumulated in float64
            if split_key(key, ADAPTER_SUFFIXES):
                continue
            values = [r[key].numpy() for r in records]
            mean = sum(float(w) * v.astype(np.float64) for w, v in zip(p.tolist(), values))
            out[key] = Array(np.asarray(mean).astype(values[0].dtype))

        if update:
            self._history.append(update)
            self._version += 1
            self._prune_history()
        return ArrayRecord(out)

    def _prune_history(self) -> None:
        """Drop updates that no catch-up will use: once the factors from an update to now
        cost more than the weight for every layer, older nodes get the weight anyway."""
        rank = {name: 0 for name in self._base}
        keep = 0
        for j in range(len(self._history) - 1, -1, -1):
            for name, (u, _) in self._history[j].items():
                rank[name] += u.shape[1]
            if not any(rank[name] and _factors_pay(rank[name], w.shape) for name, w in self._base.items()):
                break
            keep += 1
        drop = len(self._history) - keep
        if drop:
            del self._history[:drop]
            self._history_start += drop

    # -- inspection

    def merged_weights(self, arrays: ArraysLike) -> dict[str, Tensor]:
        """{P: W + s·B A} (fp32) for the global adapters in ``arrays`` (e.g. ``result.arrays``):
        the global model's effective weights."""
        if self._base is None:
            raise ValueError("merged_weights needs base_weights")
        out = {}
        for prefix, w in self._base.items():
            if f"{prefix}.lora_A" not in arrays or f"{prefix}.lora_B" not in arrays:
                raise ValueError(f"arrays has no adapters for layer {prefix!r}")
            A = to_tensor(arrays[f"{prefix}.lora_A"]).to(device=w.device, dtype=torch.float32)
            B = to_tensor(arrays[f"{prefix}.lora_B"]).to(device=w.device, dtype=torch.float32)
            out[prefix] = w + self.scaling_of(prefix) * (B @ A)
        return out
