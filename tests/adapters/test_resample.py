"""Flora resampling (lorafast.resample): resample_ keeps the effective weight W + s·B A and
restarts from a new A of the new seed with B = 0, in place; resample_every beats frozen-A FFA
on an update of rank > r; under DP ε is unchanged and the per-sample path exact; federated
FFA stays exact across resamples with the shared seed schedule; every refusal writes nothing."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lorafast
from lorafast import LoRALinear, MultiLoRALinear, resample_every
from lorafast.federated import aggregate, simulate
from lorafast.layers import draw_adapters
from lorafast.resample import resample_adapters, resample_seed
from support.common import fresh_seed, rel_err
from support.dp_models import TinyNet, clipped_mean, make_batch, per_sample_grads

IN, OUT, R = 33, 47, 3


def _layer(variant="ffa", dtype=torch.float32, **kw) -> LoRALinear:
    layer = LoRALinear(IN, OUT, r=R, lora_alpha=6, variant=variant, dtype=dtype, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()        # B starts at zero: give the fold something to fold
    return layer


def _effective(layer, compensation=None) -> torch.Tensor:
    """W + s·B(R)A in float64, (out, in); with the compensation that carries W's rounding."""
    U, V = layer.delta_factors()
    w = layer.base_weight.double() + (0 if compensation is None else compensation.double())
    return w + U.double() @ V.double()


def _state(layer, *extra) -> list:
    return [t.detach().clone() for t in (layer.weight, layer.lora_A, layer.lora_B, *extra)] + [layer.seed]


def _assert_unchanged(layer, before, *extra) -> None:
    now = _state(layer, *extra)
    assert now[-1] == before[-1]
    assert all(torch.equal(a, b) for a, b in zip(now[:-1], before[:-1]))


# ------------------------------------------------------------------ the layer


@pytest.mark.parametrize("case, tol", [("fp64", 1e-12), ("fp32", 1e-6), ("bf16+compensation", 1e-6),
                                       ("fan_in_fan_out", 1e-6)])
@pytest.mark.parametrize("variant", ["lora", "ffa"])
def test_resample_keeps_the_effective_weight(case, tol, variant):
    fresh_seed()
    dtype = {"fp64": torch.float64, "bf16+compensation": torch.bfloat16}.get(case, torch.float32)
    layer = _layer(variant, dtype, fan_in_fan_out=case == "fan_in_fan_out")
    comp = torch.zeros(OUT, IN) if case == "bf16+compensation" else None
    truth = _effective(layer)
    layer.resample_(fresh_seed() >> 1, compensation=comp)
    assert not layer.lora_B.any()
    assert rel_err(_effective(layer, comp), truth) < tol
    if comp is not None:   # the compensation is what bf16 alone would have lost
        assert rel_err(layer.base_weight, truth) > 100 * tol


def test_new_A_is_drawn_from_the_new_seed_in_place():
    fresh_seed()
    layer = _layer("lora")
    ids = [id(p) for p in (layer.lora_A, layer.lora_B)]
    layer.resample_(123)
    assert layer.seed == 123
    assert torch.equal(layer.lora_A, draw_adapters(IN, OUT, R, False, 123)[0])
    assert torch.equal(layer.lora_A, LoRALinear(IN, OUT, r=R, variant="lora", seed=123).lora_A)
    assert [id(p) for p in (layer.lora_A, layer.lora_B)] == ids
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    As, seeds = [], []
    for _ in range(2):     # seed=None: fresh seeds from the OS
        layer.resample_()
        As.append(layer.lora_A.detach().clone())
        seeds.append(layer.seed)
    assert seeds[0] != seeds[1] and all(0 <= s < 2**63 for s in seeds)
    assert not torch.equal(As[0], As[1])


def test_a_merged_layer_xs_sb_bad_seeds_and_compensation_are_refused_unchanged():
    fresh_seed()
    layer = _layer()
    before = _state(layer)
    for seed in (-1, 2**63, 1.5, True, "3"):
        with pytest.raises(ValueError, match="seed"):
            layer.resample_(seed)
    for comp in (torch.zeros(OUT, IN, dtype=torch.float16), torch.zeros(IN, OUT), torch.zeros(OUT), "zeros"):
        with pytest.raises(ValueError, match="compensation must be an fp32 tensor"):
            layer.resample_(1, compensation=comp)
    _assert_unchanged(layer, before)
    conv = _layer(fan_in_fan_out=True)    # its compensation is of base_weight's (out, in) shape, not weight's
    with pytest.raises(ValueError, match=r"fp32 tensor of layer.base_weight's shape \(47, 33\)"):
        conv.resample_(1, compensation=torch.zeros(IN, OUT))
    layer.merge()
    merged = _state(layer)
    with pytest.raises(ValueError, match="merged"):
        layer.resample_(1)
    _assert_unchanged(layer, merged)
    for variant in ("xs", "sb"):
        rlayer = LoRALinear(IN, OUT, r=R, variant=variant)
        before = _state(rlayer, rlayer.lora_R)
        with pytest.raises(ValueError, match=f"variant '{variant}'.*only R"):
            rlayer.resample_(1)
        _assert_unchanged(rlayer, before, rlayer.lora_R)
    bad = _layer()
    with torch.no_grad():
        bad.lora_B[0, 0] = float("nan")
    before = _state(bad)
    with pytest.raises(ValueError, match="non-finite"):
        bad.resample_(1)
    assert torch.equal(bad.weight, before[0]) and bad.seed == before[-1]


def test_qlora_resample_goes_into_the_correction():
    """A quantised base keeps s·B A beside it, in the low-rank correction: exact within
    correction_rank, then truncated."""
    fresh_seed()
    from lorafast.qlora import QLoRALinear
    from support.qlora_models import quantised_linear
    layer = QLoRALinear.from_linear(quantised_linear(128, 64), r=R, lora_alpha=6, variant="ffa", correction_rank=4)
    packed = layer.weight.detach().clone()
    for round_, rank in ((1, 3), (2, 4)):
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.2)
        truth = _effective(layer)
        report = layer.resample_(round_)
        assert torch.equal(layer.weight, packed) and not layer.lora_B.any() and layer.seed == round_
        assert report.rank == rank == layer.correction_U.shape[1]
        if round_ == 1:
            assert report.discarded == 0.0 and rel_err(_effective(layer), truth) < 1e-6
        else:          # rank 6 truncated to 4: what is lost is what the report says
            lost = (_effective(layer) - truth).norm().item() ** 2
            assert report.discarded > 0 and lost == pytest.approx(report.discarded, rel=1e-3)
    before = _state(layer, layer.correction_U)
    with pytest.raises(ValueError, match="compensation does not apply to a QLoRALinear"):
        layer.resample_(5, compensation=torch.zeros(64, 128))
    _assert_unchanged(layer, before, layer.correction_U)


def test_multi_lora_resamples_identical_clients_and_refuses_different_ones():
    fresh_seed()
    layer = MultiLoRALinear(IN, OUT, 3, r=R, lora_alpha=6, variant="ffa")
    with torch.no_grad():
        layer.lora_B.normal_()
    before = [t.clone() for t in (layer.weight, layer.lora_A, layer.lora_B)]
    with pytest.raises(ValueError, match="lora_B differ: aggregate the layer first"):
        layer.resample_(7)
    assert all(torch.equal(a, b) for a, b in zip((layer.weight, layer.lora_A, layer.lora_B), before))
    aggregate(layer, method="ffa")           # writes the global B̄ into every slot
    truth = _effective(layer.client_layer(0))
    layer.resample_(7)
    assert layer.seed == 7 and not layer.lora_B.any()
    assert torch.equal(layer.lora_A, draw_adapters(IN, OUT, R, False, 7)[0].expand(3, R, IN))
    assert rel_err(_effective(layer.client_layer(1)), truth) < 1e-6
    mixed = MultiLoRALinear(IN, OUT, 2, r=[2, 3])
    with pytest.raises(ValueError, match="different ranks"):
        mixed.resample_(1)


# ------------------------------------------------------------------ training


def _regression(resample: bool, steps=300, tau=10):
    """Fit a rank-8 update of a 16×16 layer with an r=2 FFA adapter (Adam, full batch);
    the final loss. Fixed seeds: deterministic."""
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(16, 8, generator=gen) @ torch.randn(8, 16, generator=gen) / 4
    x = torch.randn(256, 16, generator=gen)
    torch.manual_seed(0)
    layer = LoRALinear(16, 16, r=2, lora_alpha=2, variant="ffa", bias=False, seed=3)
    y = x @ (layer.weight.detach() + target).T
    opt = torch.optim.Adam([layer.lora_B], lr=0.05)
    handle = resample_every(layer, tau, optimizer=opt, seed=11) if resample else None
    for _ in range(steps):
        loss = (layer(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (layer(x) - y).pow(2).mean().item(), handle, layer


def test_resampling_fits_an_update_of_rank_above_r():
    frozen, _, _ = _regression(False)
    flora, handle, layer = _regression(True)
    assert handle.count == 30 and handle.steps_seen == 300
    assert layer.seed == resample_seed(11, "", 30)
    assert flora < frozen / 2, (flora, frozen)


def test_hook_resets_the_optimizer_state_counts_and_removes():
    fresh_seed()
    model = nn.Sequential(_layer("ffa"), nn.Linear(OUT, 5))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle = resample_every(model, 2, optimizer=opt, seed=4)
    x = torch.randn(8, IN)
    for step in range(1, 6):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert handle.count == step // 2
        assert (model[0].lora_B in opt.state) == (step % 2 == 1)      # cleared at each resample
        assert model[1].weight in opt.state                            # the head's state is kept
    assert model[0].seed == resample_seed(4, "0", 2)
    handle.remove()
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
    assert handle.count == 2 and model[0].seed == resample_seed(4, "0", 2)
    manual = resample_every(model, 1)      # no optimizer: the loop calls step()
    assert manual.step() and manual.count == 1 and model[0].seed != resample_seed(4, "0", 2)


def test_resample_every_refuses_bad_arguments():
    model = nn.Sequential(_layer("ffa"), LoRALinear(OUT, 5, r=2, variant="xs"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for steps in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="steps"):
            resample_every(model, steps, optimizer=opt)
    with pytest.raises(ValueError, match="optimizer must be a torch.optim.Optimizer"):
        resample_every(model, 2, optimizer="adam")
    with pytest.raises(ValueError, match="seed"):
        resample_every(model, 2, seed=-1)
    with pytest.raises(ValueError, match="reset_state"):
        resample_every(model, 2, reset_state=1)
    with pytest.raises(ValueError, match=r"compensation names \['1'\]"):
        resample_every(model, 2, compensation={"1": torch.zeros(5, OUT)})
    with pytest.raises(ValueError, match="no LoRALinear of variant 'lora' or 'ffa'"):
        resample_every(nn.Sequential(model[1]), 2)
    with pytest.raises(ValueError, match="MultiLoRALinear"):
        resample_every(nn.Sequential(MultiLoRALinear(IN, OUT, 2, r=R, variant="ffa")), 2)
    with pytest.raises(ValueError, match="seed must be an int"):
        resample_seed(None, "0", 1)
    with pytest.raises(ValueError, match="layer_name"):
        resample_seed(1, 0, 1)
    with pytest.raises(ValueError, match="count"):
        resample_seed(1, "0", -1)


def test_resample_adapters_checks_every_layer_before_writing_any():
    fresh_seed()
    model = nn.Sequential(_layer("ffa"), _layer("lora"))
    model[1].merge()
    before = _state(model[0])
    with pytest.raises(ValueError, match="merged"):
        resample_adapters(model, 3)
    _assert_unchanged(model[0], before)


# ------------------------------------------------------------------ differential privacy


def _private(model, noise, C=0.3):
    from lorafast.dp import PrivacyEngine
    x, y = make_batch(60)
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise,
                                             max_grad_norm=C, poisson_sampling=False)
    return engine, model, opt, loader


def test_dp_epsilon_is_unchanged_by_resampling():
    from lorafast.dp import compute_epsilon
    eps = []
    for resample in (False, True):
        fresh_seed()
        engine, model, opt, loader = _private(TinyNet(), noise=1.0)
        handle = resample_every(model, 2, optimizer=opt) if resample else None
        for _, (x, y) in zip(range(6), loader):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
            opt.zero_grad()
        if resample:
            assert handle.count == 3 and not model.ffa.lora_B.any()
        eps.append(engine.get_epsilon(1e-5))
    assert eps[0] == eps[1] == pytest.approx(compute_epsilon(1.0, 0.1, 6, 1e-5), rel=1e-12)


def test_dp_step_after_a_resample_is_the_exact_private_gradient():
    """The hook on a DPOptimizer (its wrapped optimizer's post-step hook) resamples in place,
    and the next private step is torch.func's clipped mean on the resampled model."""
    fresh_seed()
    model = TinyNet()
    twin = copy.deepcopy(model)        # a private model does not deepcopy: the truth's model, kept in step
    _, model, opt, _ = _private(model, noise=0.0)
    handle = resample_every(model, 1, optimizer=opt, seed=9)
    x, y = make_batch(6)
    F.cross_entropy(model(x), y).backward()
    opt.step()                         # lr = 0: only the resample changes the model
    assert handle.count == 1 and model.ffa.seed == resample_seed(9, "ffa", 1)
    resample_adapters(twin, 9, count=1)
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), model.state_dict().values()))
    x, y = make_batch(6)
    want = clipped_mean(per_sample_grads(twin, x, y), 0.3, 6)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    got = {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(want)
    for n in want:
        assert rel_err(got[n], want[n]) < 5e-5, n


# ------------------------------------------------------------------ federated


def _train(model, seed, steps=3):
    """A few Adam steps of B towards a client's own random targets."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, IN, generator=gen, dtype=torch.float64), torch.randn(16, IN, generator=gen,
                                                                               dtype=torch.float64)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_federated_ffa_stays_exact_across_resamples():
    fresh_seed()
    kw = dict(r=R, lora_alpha=6, variant="ffa", dtype=torch.float64)
    server = nn.Sequential(LoRALinear(IN, OUT, seed=1, **kw), nn.Tanh(), LoRALinear(OUT, IN, seed=2, **kw))
    clients = [copy.deepcopy(server) for _ in range(2)]
    parties, names, base_seed = [server, *clients], ["0", "2"], fresh_seed()
    for round_ in (1, 2):
        for i, c in enumerate(clients):
            _train(c, 10 * round_ + i)
        for name in names:
            layers = [p.get_submodule(name) for p in parties]
            res = aggregate(layers[0], [c.lora_A for c in layers[1:]], [c.lora_B for c in layers[1:]], method="ffa")
            client_mean = sum(_effective(c) for c in layers[1:]) / 2
            with torch.no_grad():
                for layer in layers:
                    layer.lora_B.copy_(res.lora_B)
            assert rel_err(_effective(layers[0]), client_mean) < 1e-6      # exact in round 2 too
        for p in parties:
            resample_adapters(p, base_seed, count=round_)
        for name in names:
            layers = [p.get_submodule(name) for p in parties]
            seed = resample_seed(base_seed, name, round_)
            assert all(layer.seed == seed and torch.equal(layer.lora_A, layers[0].lora_A) for layer in layers)
            assert all(torch.equal(layer.weight, layers[0].weight) for layer in layers)
    assert not torch.equal(server[0].lora_A, LoRALinear(IN, OUT, seed=1, **kw).lora_A)
    assert server[0].seed != server[2].seed


def test_simulate_resample_rounds_keeps_the_global_model():
    """Resampling after aggregation changes the global adapter's form, not the model: the
    evaluation after each round equals that of the same run without resampling."""
    fresh_seed()
    base = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3))
    gen = torch.Generator().manual_seed(0)
    data = [TensorDataset(torch.randn(12, 8, generator=gen), torch.randint(0, 3, (12,), generator=gen))
            for _ in range(2)]
    probe = torch.randn(5, 8, generator=gen)

    def run(resample_rounds):
        torch.manual_seed(0)           # the adapters' seed
        model = lorafast.inject_adapters(copy.deepcopy(base), ["0"], r=2, variant="ffa", clients=2)
        evals = []

        def eval_fn(m):
            with lorafast.clients(m, torch.zeros(5, dtype=torch.int64)):
                evals.append(m(probe))
            return {}
        simulate(model, data, rounds=2, local_steps=2, method="ffa", lr=1e-2, eval_fn=eval_fn, seed=5,
                 progress=False, resample_rounds=resample_rounds)
        return model, evals

    plain, plain_evals = run(None)
    flora, flora_evals = run(1)
    assert flora[0].seed == resample_seed(5, "0", 2) and not flora[0].lora_B.any()
    assert rel_err(flora_evals[0], plain_evals[0]) < 1e-6
    assert not torch.equal(flora_evals[1], plain_evals[1])     # round 2 trained in a new subspace
    with pytest.raises(ValueError, match="resample_rounds"):
        simulate(plain, data, rounds=1, local_steps=1, progress=False, resample_rounds=0)
