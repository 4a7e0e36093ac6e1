"""CutMix of smashed data: masks partition the patches, counts follow λ by largest remainder,
positions are random and replayable, the mix and its gradient, label mixing, validation."""
from fractions import Fraction

import numpy as np
import pytest
import torch

from lorafast.split.cutmix import _largest_remainder, cutmix, mix_labels
from support.common import fresh_seed


def smashed(k, shape, dtype=torch.float32, requires_grad=False):
    return [torch.randn(shape, dtype=dtype).requires_grad_(requires_grad) for _ in range(k)]


def hamilton(ratios, total):
    """Largest remainder in exact rational arithmetic; equal remainders go to the lower index."""
    fr = [Fraction(float(r)) for r in ratios]
    quotas = [f / sum(fr) * total for f in fr]
    counts = [q.numerator // q.denominator for q in quotas]
    by_remainder = sorted(range(len(fr)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def counts_of(masks):
    """Per-client patch counts, checked to be the same for every sample."""
    per_sample = torch.stack([m.sum(1) for m in masks])  # (k, B)
    assert (per_sample == per_sample[:, :1]).all(), "counts differ between samples"
    return per_sample[:, 0].tolist()


def assert_partition(masks, B, P):
    assert all(m.dtype == torch.bool and m.shape == (B, P) for m in masks)
    owners = torch.stack([m.long() for m in masks]).sum(0)
    assert (owners == 1).all(), "every patch must have exactly one owner"


# ----------------------------------------------------------------- masks and counts

@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("P", [7, 13])
def test_masks_partition_patches_with_drawn_ratios(k, P):
    fresh_seed()
    B = 11
    hs = smashed(k, (B, P, 3))
    mixed, masks = cutmix(hs)
    assert len(masks) == k and mixed.shape == hs[0].shape
    assert_partition(masks, B, P)
    assert sum(counts_of(masks)) == P


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("P", [7, 13])
def test_given_ratios_fix_counts_by_largest_remainder(k, P):
    seed = fresh_seed()
    lam = np.random.default_rng(seed).dirichlet(np.ones(k))
    _, masks = cutmix(smashed(k, (5, P, 2)), lam.tolist())
    counts = counts_of(masks)
    assert counts == hamilton(lam, P)
    assert sum(counts) == P
    assert all(abs(n - l * P) < 1 for n, l in zip(counts, lam))


def test_largest_remainder_against_exact_arithmetic():
    rng = np.random.default_rng(fresh_seed())
    for _ in range(2000):
        k = int(rng.integers(1, 9))
        total = int(rng.integers(1, 60))
        lam = rng.dirichlet(np.full(k, rng.choice([0.3, 1.0, 5.0])))
        if k > 1 and rng.random() < 0.3:  # some clients with nothing
            lam[rng.random(k) < 0.4] = 0.0
            lam = lam / lam.sum() if lam.sum() > 0 else np.eye(k)[0]
        counts = _largest_remainder(lam / lam.sum(), total)
        assert counts.tolist() == hamilton(lam, total), (lam, total)
        assert counts.sum() == total and (np.abs(counts - lam * total) < 1).all()


@pytest.mark.parametrize("ratios, P, expected", [
    ([0.25, 0.25, 0.5], 2, [1, 0, 1]),               # tie between clients 0 and 1: the lower index wins
    ([0.5, 0.5], 7, [4, 3]),
    ([0.125] * 8, 4, [1, 1, 1, 1, 0, 0, 0, 0]),
    ([0.0, 0.5, 0.5], 3, [0, 2, 1]),                 # a zero ratio never gets a leftover patch
    ([0.5, 0.0, 0.5], 1, [1, 0, 0]),
    ([0.2, 0.3, 0.5], 10, [2, 3, 5]),                 # exact quotas are used as is
    ([0.1, 0.2, 0.7], 10, [1, 2, 7]),
    ([1 / 3, 1 / 3, 1 / 3], 13, [5, 4, 4]),
    ([0.0, 1.0], 13, [0, 13]),
])
def test_counts_ties_and_zeros(ratios, P, expected):
    assert hamilton(ratios, P) == expected
    _, masks = cutmix(smashed(len(ratios), (3, P)), ratios)
    assert counts_of(masks) == expected
    for r in (torch.tensor(ratios), np.array(ratios), tuple(ratios)):  # the same from a tensor or an array
        _, masks = cutmix(smashed(len(ratios), (3, P)), r)
        assert counts_of(masks) == expected


# ----------------------------------------------------------------- randomness

def test_positions_are_random_and_uniform():
    fresh_seed()
    B, P, ratios = 4000, 16, [0.25, 0.25, 0.5]
    _, masks = cutmix(smashed(3, (B, P, 1)), ratios)
    rows = {tuple(m.tolist()) for m in masks[2][:200]}
    assert len(rows) >= 190  # C(16, 8) = 12870 arrangements of client 2's patches
    for m, r in zip(masks, ratios):
        freq = m.double().mean(0)  # how often each patch goes to this client
        assert (freq - r).abs().max() < 0.05, freq  # ±6 standard deviations


def test_drawn_ratios_vary_and_average_to_uniform():
    fresh_seed()
    P, calls = 60, 300
    fractions = np.array([[m[0].double().mean().item() for m in cutmix(smashed(3, (1, P)))[1]]
                          for _ in range(calls)])
    assert len({tuple(f) for f in fractions}) > calls // 2  # λ is redrawn every call
    # Dirichlet(1, 1, 1) has mean 1/3 per client (standard error of the mean ≈ 0.014 here)
    assert np.abs(fractions.mean(0) - 1 / 3).max() < 0.08, fractions.mean(0)


def test_seed_replays_and_different_seeds_differ():
    seed = fresh_seed()
    hs = smashed(3, (8, 13, 4))
    m1, k1 = cutmix(hs, seed=seed)
    m2, k2 = cutmix(hs, seed=seed)
    assert torch.equal(m1, m2) and all(torch.equal(a, b) for a, b in zip(k1, k2))
    m3, k3 = cutmix(hs, seed=seed ^ 1)
    assert not all(torch.equal(a, b) for a, b in zip(k1, k3))
    _, ka = cutmix(hs)
    _, kb = cutmix(hs)  # seeds from the OS
    assert not all(torch.equal(a, b) for a, b in zip(ka, kb))
    cutmix(hs, seed=2**63 - 1)
    cutmix(hs, seed=np.int64(5))


# ----------------------------------------------------------------- the mix and its gradient

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_mixed_is_masked_sum(dtype, k):
    fresh_seed()
    B, P, d = 6, 13, 5
    hs = [torch.randn(d, P, B, dtype=dtype).permute(2, 1, 0) for _ in range(k)]  # non-contiguous
    before = [h.clone() for h in hs]
    mixed, masks = cutmix(hs)
    assert mixed.dtype == dtype and mixed.shape == (B, P, d) and mixed.device == hs[0].device
    expected = sum(h.double() * m.double()[:, :, None] for h, m in zip(hs, masks))
    assert torch.equal(mixed.double(), expected)
    assert all(torch.equal(h, b) for h, b in zip(hs, before))
    if k == 1:
        assert mixed.data_ptr() != hs[0].data_ptr()  # a copy, not the input


def test_gradient_reaches_each_client_on_its_patches_only():
    fresh_seed()
    hs = smashed(3, (4, 7, 5), dtype=torch.float64, requires_grad=True)
    mixed, masks = cutmix(hs)
    g = torch.randn_like(mixed)
    grads = torch.autograd.grad(mixed, hs, g)
    for grad, m in zip(grads, masks):
        assert torch.equal(grad, g * m.double()[:, :, None])
    torch.autograd.gradcheck(lambda *xs: cutmix(list(xs), seed=3)[0], hs)


def test_non_finite_values_stay_on_their_own_patches():
    hs = smashed(2, (3, 7, 2))
    hs[1] = torch.full_like(hs[1], float("inf"))
    mixed, masks = cutmix(hs, [0.5, 0.5])
    assert torch.isfinite(mixed[masks[0]]).all() and torch.isinf(mixed[masks[1]]).all()


def test_patch_dim_layouts():
    seed = fresh_seed()
    B, P, d = 5, 13, 3
    hs = smashed(3, (B, P, d))
    ref, ref_masks = cutmix(hs, seed=seed)
    # (B, d, P): the same patches along dim 2 (or -1)
    for dim in (2, -1):
        mixed, masks = cutmix([h.transpose(1, 2) for h in hs], patch_dim=dim, seed=seed)
        assert torch.equal(mixed, ref.transpose(1, 2))
        assert all(torch.equal(a, b) for a, b in zip(masks, ref_masks))
    # 4-D, patches along dim 1 and along dim 2 (= -2)
    h4 = smashed(3, (B, P, 2, 4))
    mixed, masks = cutmix(h4, seed=seed)
    assert torch.equal(mixed, sum(h * m.to(h.dtype)[:, :, None, None] for h, m in zip(h4, masks)))
    h4t = [h.transpose(1, 2) for h in h4]
    for dim in (2, -2):
        mixed_t, masks_t = cutmix(h4t, patch_dim=dim, seed=seed)
        assert torch.equal(mixed_t, mixed.transpose(1, 2))
        assert all(torch.equal(a, b) for a, b in zip(masks_t, masks))
    # 2-D (B, P): one number per patch
    mixed2, masks2 = cutmix([h[:, :, 0] for h in hs], seed=seed)
    assert torch.equal(mixed2, ref[:, :, 0])


# ----------------------------------------------------------------- labels

@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_mix_labels_soft(k):
    fresh_seed()
    B, P, C = 9, 13, 4
    _, masks = cutmix(smashed(k, (B, P, 2)))
    ys = [torch.softmax(torch.randn(B, C, dtype=torch.float64), 1) for _ in range(k)]
    mixed = mix_labels(ys, masks)
    expected = sum(m.double().sum(1, keepdim=True) / P * y for y, m in zip(ys, masks))
    assert mixed.dtype == torch.float64 and mixed.shape == (B, C)
    torch.testing.assert_close(mixed, expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(mixed.sum(1), torch.ones(B, dtype=torch.float64))
    assert torch.equal(mix_labels(ys, masks, num_classes=C), mixed)


def test_mix_labels_class_ids():
    fresh_seed()
    B, P, C = 7, 13, 5
    _, masks = cutmix(smashed(3, (B, P)), [0.2, 0.3, 0.5])
    ids = [torch.randint(0, C, (B,)) for _ in range(3)]
    mixed = mix_labels(ids, masks, num_classes=C)
    assert mixed.dtype == torch.float32
    n = counts_of(masks)
    expected = torch.zeros(B, C)
    for i, y in enumerate(ids):
        expected[torch.arange(B), y] += n[i] / P
    torch.testing.assert_close(mixed, expected)
    # per-sample fractions: hand-made masks that differ between samples
    m0 = torch.tensor([[True, True, False, False], [True, False, False, False]])
    out = mix_labels([torch.tensor([0, 0]), torch.tensor([1, 1])], [m0, ~m0], num_classes=2)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5], [0.25, 0.75]]))


# ----------------------------------------------------------------- bad input

@pytest.mark.parametrize("make, kwargs, match", [
    (lambda: [], {}, "smashed_list"),
    (lambda: torch.randn(2, 3, 4), {}, "smashed_list"),
    (lambda: [torch.randn(2, 3), "x"], {}, r"smashed_list\[1\]"),
    (lambda: [torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 4, 4)], {}, r"smashed_list\[2\].*shape"),
    (lambda: [torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)], {}, r"smashed_list\[1\].*dtype"),
    (lambda: [torch.randn(2, 3), torch.empty(2, 3, device="meta")], {}, r"smashed_list\[1\].*device"),
    (lambda: [torch.randn(5)], {}, "smashed_list"),
    (lambda: [torch.randn(2, 0, 3)], {}, "smashed_list"),
    (lambda: [torch.randn(2, 3, 4)], {"patch_dim": 0}, "patch_dim"),
    (lambda: [torch.randn(2, 3, 4)], {"patch_dim": 3}, "patch_dim"),
    (lambda: [torch.randn(2, 3, 4)], {"patch_dim": -3}, "patch_dim"),
    (lambda: [torch.randn(2, 3, 4)], {"patch_dim": 1.0}, "patch_dim"),
    (lambda: [torch.randn(2, 3, 4)], {"patch_dim": True}, "patch_dim"),
    (lambda: [torch.randn(2, 3)] * 2, {"ratios": [1.0]}, "ratios"),
    (lambda: [torch.randn(2, 3)] * 2, {"ratios": [0.5, 0.25, 0.25]}, "ratios"),
    (lambda: [torch.randn(2, 3)] * 2, {"ratios": [1.5, -0.5]}, "ratios"),
    (lambda: [torch.randn(2, 3)] * 2, {"ratios": [0.5, 0.4]}, "ratios"),
    (lambda: [torch.randn(2, 3)] * 2, {"ratios": [float("nan"), 1.0]}, "ratios"),
    (lambda: [torch.randn(2, 3)] * 2, {"ratios": ["a", "b"]}, "ratios"),
    (lambda: [torch.randn(2, 3)] * 2, {"ratios": "ab"}, "ratios"),
    (lambda: [torch.randn(2, 3)] * 2, {"ratios": 0.5}, "ratios"),
    (lambda: [torch.randn(2, 3)] * 2, {"ratios": torch.full((1, 2), 0.5)}, "ratios"),
    (lambda: [torch.randn(2, 3)] * 2, {"ratios": np.full((2, 1), 0.5)}, "ratios"),
    (lambda: [torch.randn(2, 3)] * 2, {"ratios": []}, "ratios"),
    (lambda: [torch.randn(2, 3)], {"seed": -1}, "seed"),
    (lambda: [torch.randn(2, 3)], {"seed": 2**63}, "seed"),
    (lambda: [torch.randn(2, 3)], {"seed": 1.0}, "seed"),
    (lambda: [torch.randn(2, 3)], {"seed": "1"}, "seed"),
    (lambda: [torch.randn(2, 3)], {"seed": True}, "seed"),
])
def test_cutmix_rejects_bad_input(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cutmix(make(), **kwargs)


def test_mix_labels_rejects_bad_input():
    _, masks = cutmix(smashed(2, (3, 5)), [0.4, 0.6])
    soft = [torch.rand(3, 4) for _ in range(2)]
    ids = [torch.tensor([0, 1, 2])] * 2
    bad = [
        (lambda: mix_labels(soft, []), "masks"),
        (lambda: mix_labels(soft, masks[0]), "masks"),
        (lambda: mix_labels(soft, [masks[0].long(), masks[1]]), r"masks\[0\]"),
        (lambda: mix_labels(soft, [masks[0], masks[1][:2]]), r"masks\[1\]"),
        (lambda: mix_labels(soft, [masks[0], masks[0]]), "masks"),       # overlapping, not covering
        (lambda: mix_labels(soft[:1], masks), "labels_list"),
        (lambda: mix_labels(torch.stack(soft), masks), "labels_list"),
        (lambda: mix_labels([soft[0], "y"], masks), r"labels_list\[1\]"),
        (lambda: mix_labels([soft[0], soft[1].double()], masks), r"labels_list\[1\]"),
        (lambda: mix_labels([s[:2] for s in soft], masks), "labels_list"),
        (lambda: mix_labels(soft, masks, num_classes=5), "num_classes"),
        (lambda: mix_labels(ids, masks), "num_classes"),
        (lambda: mix_labels(ids, masks, num_classes=2), r"labels_list\[0\]"),
        (lambda: mix_labels(ids, masks, num_classes=0), "num_classes"),
        (lambda: mix_labels(ids, masks, num_classes=2.5), "num_classes"),
        (lambda: mix_labels([torch.ones(3, dtype=torch.bool)] * 2, masks, num_classes=2), "labels_list"),
        (lambda: mix_labels([i[:, None] for i in ids], masks, num_classes=3), "labels_list"),
    ]
    for call, match in bad:
        with pytest.raises(ValueError, match=match):
            call()
