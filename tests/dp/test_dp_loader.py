"""Poisson sampling: batch-size statistics, empty batches, seeding, secure mode, sharding, validation."""
import math
import warnings

import pytest
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler,
                              SubsetRandomSampler, TensorDataset)

from lorafast.dp.data_loader import DPDataLoader, PoissonBatchSampler

T, D = 5, 3


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def sequence_dataset(n=40):
    return TensorDataset(torch.randn(n, T, D), torch.randint(0, 7, (n,)))


class NestedDataset(Dataset):
    """Samples mixing dicts, tuples, lists, half-precision tensors, Python numbers and strings."""

    def __init__(self, n=20):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {
            "x": torch.full((2, 4), float(i), dtype=torch.float16),
            "pair": (torch.tensor([i, i], dtype=torch.int32), 0.5 * i),
            "parts": [torch.zeros(3, dtype=torch.bool), i],
            "name": f"s{i}",
        }


def batch_sizes(sampler):
    return torch.tensor([len(b) for b in sampler], dtype=torch.float64)


def test_batch_size_mean_and_variance():
    n, q, steps = 1000, 0.05, 2000
    sizes = batch_sizes(PoissonBatchSampler(n, q, steps, generator=seeded(0)))
    assert len(sizes) == steps
    var = n * q * (1 - q)
    # 6 standard errors: the mean's is sqrt(var/steps), the sample variance's about var·sqrt(2/steps)
    assert abs(sizes.mean().item() - n * q) < 6 * math.sqrt(var / steps)
    assert abs(sizes.var().item() - var) < 6 * var * math.sqrt(2 / steps)


def test_each_index_included_at_rate_q():
    n, q, steps = 300, 0.1, 2000
    sampler = PoissonBatchSampler(n, q, steps, generator=seeded(1))
    counts = torch.zeros(n)
    for batch in sampler:
        assert batch == sorted(set(batch)), "indices must be distinct"
        assert all(0 <= i < n for i in batch)
        counts[batch] += 1
    sd = math.sqrt(steps * q * (1 - q))
    assert (counts - steps * q).abs().max().item() < 6 * sd
    # independence across indices: the counts' spread is binomial, not inflated
    assert abs(counts.var().item() / sd**2 - 1) < 6 * math.sqrt(2 / (n - 1))


def test_default_steps_and_len():
    assert len(PoissonBatchSampler(10, 0.25)) == 4
    assert len(PoissonBatchSampler(10, 1.0)) == 1
    assert len(PoissonBatchSampler(10, 0.3)) == 3
    assert len(PoissonBatchSampler(10, 0.1, steps=7)) == 7
    assert [list(range(10))] == list(PoissonBatchSampler(10, 1.0))


def test_empty_batches_collate_to_empty_tensors():
    loader = DPDataLoader(sequence_dataset(), 0.002, generator=seeded(2))
    assert len(loader) == 500
    shapes = set()
    for x, y in loader:
        assert x.shape[1:] == (T, D) and x.dtype == torch.float32
        assert y.shape == x.shape[:1] and y.dtype == torch.int64
        shapes.add(len(x))
    assert 0 in shapes and max(shapes) > 0  # P(empty) = 0.998**40 ≈ 0.92


def test_empty_nested_batch():
    loader = DPDataLoader(NestedDataset(), 1e-4, generator=seeded(3))
    full = torch.utils.data.default_collate([loader.dataset[0], loader.dataset[1]])
    empties = [b for b, _ in zip(loader, range(50)) if len(b["x"]) == 0]
    assert len(empties) >= 2, "expected empty batches at q=1e-4"
    batch = empties[0]
    assert set(batch) == set(full)

    def check(empty, ref):
        if isinstance(ref, torch.Tensor):
            assert isinstance(empty, torch.Tensor)
            assert empty.shape == (0, *ref.shape[1:]) and empty.dtype == ref.dtype
        elif isinstance(ref, dict):
            for k in ref:
                check(empty[k], ref[k])
        elif isinstance(ref, (list, tuple)) and all(isinstance(v, str) for v in ref):
            assert len(empty) == 0
        else:
            assert type(empty) is type(ref) and len(empty) == len(ref)
            for e, r in zip(empty, ref):
                check(e, r)

    check(batch, full)
    batch.pop("x")  # mutating one empty batch doesn't leak into the next
    assert empties[-1] is not batch and empties[-1]["x"].shape == (0, 2, 4)


def test_fixed_generator_replays_and_default_differs():
    ds = sequence_dataset(200)
    a = [y.tolist() for _, y in DPDataLoader(ds, 0.1, generator=seeded(7))]
    b = [y.tolist() for _, y in DPDataLoader(ds, 0.1, generator=seeded(7))]
    assert a == b
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the default seed comes from the OS, not from torch's global RNG
        runs.append([list(s) for s in PoissonBatchSampler(200, 0.1)])
    assert runs[0] != runs[1]
    sampler = PoissonBatchSampler(200, 0.1, generator=seeded(7))
    assert list(sampler) != list(sampler), "each epoch draws fresh batches"


def test_secure_mode():
    n, q, steps = 1000, 0.1, 200
    torch.manual_seed(0)
    first = [list(b) for b in PoissonBatchSampler(n, q, steps, secure_mode=True)]
    torch.manual_seed(0)
    second = [list(b) for b in PoissonBatchSampler(n, q, steps, secure_mode=True)]
    assert first != second
    sizes = torch.tensor([len(b) for b in first], dtype=torch.float64)
    assert abs(sizes.mean().item() - n * q) < 6 * math.sqrt(n * q * (1 - q) / steps)
    assert all(b == sorted(set(b)) and all(0 <= i < n for i in b) for b in first)
    loader = DPDataLoader(sequence_dataset(), 0.25, secure_mode=True)
    assert len(list(loader)) == 4
    with pytest.raises(ValueError, match="generator"):
        PoissonBatchSampler(n, q, secure_mode=True, generator=seeded(0))


def test_sharding_is_disjoint_and_covers():
    n, world = 10, 3
    shards = [list(PoissonBatchSampler(n, 1.0, rank=r, world_size=world))[0] for r in range(world)]
    assert shards == [list(range(r, n, world)) for r in range(world)]
    assert sorted(sum(shards, [])) == list(range(n))
    for r in range(world):
        sampler = PoissonBatchSampler(100, 0.3, 20, rank=r, world_size=world, generator=seeded(r))
        assert sampler.shard_size == len(range(r, 100, world))
        assert all(i % world == r for batch in sampler for i in batch)


def test_from_data_loader_keeps_dataset_and_collate():
    ds = sequence_dataset(40)
    calls = []

    def collate(samples):
        calls.append(len(samples))
        xs, ys = zip(*samples)
        return {"x": torch.stack(xs), "y": torch.stack(ys)}

    base = DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collate, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary loader is replaced silently
        loader = DPDataLoader.from_data_loader(base, generator=seeded(4))
    assert isinstance(loader, DPDataLoader) and isinstance(loader, DataLoader)
    assert loader.dataset is ds
    assert loader.sample_rate == pytest.approx(1 / len(base)) == pytest.approx(0.2)
    assert len(loader) == len(base)
    assert loader.expected_batch_size == pytest.approx(8.0)
    batches = list(loader)
    assert all(set(b) == {"x", "y"} for b in batches)
    assert sum(calls) == sum(len(b["y"]) for b in batches)


def test_from_data_loader_with_workers():
    base = DataLoader(sequence_dataset(40), batch_size=10, num_workers=1, pin_memory=False)
    loader = DPDataLoader.from_data_loader(base, generator=seeded(5))
    assert loader.num_workers == 1 and loader.prefetch_factor == base.prefetch_factor
    assert all(x.shape[1:] == (T, D) for x, _ in loader)


def test_from_data_loader_warns_on_custom_sampler():
    ds = sequence_dataset(20)
    custom = DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(range(10)))
    with pytest.warns(UserWarning, match="REPLACED"):
        loader = DPDataLoader.from_data_loader(custom)
    assert isinstance(loader.batch_sampler, PoissonBatchSampler)
    grouped = DataLoader(ds, batch_sampler=[[0, 1, 2], [3, 4], [5, 6, 7, 8]])
    with pytest.warns(UserWarning, match="REPLACED"):
        loader = DPDataLoader.from_data_loader(grouped)
    assert loader.sample_rate == pytest.approx(1 / 3)
    # an explicit BatchSampler over the default sampler is the ordinary loader: no warning
    plain = DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 5, drop_last=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DPDataLoader.from_data_loader(plain)


def test_distributed_needs_process_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(ValueError, match="distributed"):
        DPDataLoader(sequence_dataset(), 0.1, distributed=True)


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


@pytest.mark.parametrize("make", [
    lambda: DPDataLoader(sequence_dataset(), 0.0),
    lambda: DPDataLoader(sequence_dataset(), 1.5),
    lambda: DPDataLoader(sequence_dataset(), math.nan),
    lambda: PoissonBatchSampler(10, -0.1),
])
def test_rejects_sample_rate(make):
    with pytest.raises(ValueError, match="sample_rate"):
        make()


@pytest.mark.parametrize("make, name", [
    (lambda: DPDataLoader(Stream(), 0.1), "dataset"),
    (lambda: DPDataLoader.from_data_loader(DataLoader(Stream(), batch_size=2)), "IterableDataset"),
    (lambda: DPDataLoader(sequence_dataset(), 0.1, batch_size=4), "batch_size"),
    (lambda: DPDataLoader(sequence_dataset(), 0.1, shuffle=True), "shuffle"),
    (lambda: DPDataLoader.from_data_loader(DataLoader(sequence_dataset(), batch_size=None)), "batch_size"),
    (lambda: DPDataLoader.from_data_loader([1, 2, 3]), "data_loader"),
    (lambda: PoissonBatchSampler(0, 0.1), "num_samples"),
    (lambda: PoissonBatchSampler(10, 0.1, steps=0), "steps"),
    (lambda: PoissonBatchSampler(10, 0.1, rank=3, world_size=3), "rank"),
    (lambda: PoissonBatchSampler(2, 0.1, world_size=3), "num_samples"),
    (lambda: PoissonBatchSampler(10, 0.1, generator=0), "generator"),
])
def test_rejects_bad_arguments(make, name):
    with pytest.raises(ValueError, match=name):
        make()
