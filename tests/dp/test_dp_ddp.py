"""Data-parallel private training with 2 processes on gloo: the clipped sums are all-reduced
and the noise enters once, so every rank applies exactly the single-process step."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(model, x, y, batch_size, noise_seed, wrap=None):
    from lorafast.dp import PrivacyEngine
    module = wrap(model) if wrap else model
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    module, opt, _ = PrivacyEngine().make_private(module=module, optimizer=opt, data_loader=loader,
                                                  noise_multiplier=0.8, max_grad_norm=0.3, poisson_sampling=False,
                                                  noise_seed=noise_seed)
    grads = []
    for xb, yb in loader:
        F.cross_entropy(module(xb), yb).backward()
        opt.step()
        grads.append(torch.cat([p.grad.flatten() for p in opt.store.params]).clone())
        opt.zero_grad()
    return grads, {k: v.clone() for k, v in model.state_dict().items()}


def _worker(rank, port, x, y, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from support.dp_models import TinyNet
        from lorafast.dp import DPDDP
        model = TinyNet(seed=100 + rank)          # different on each rank: DPDDP broadcasts rank 0's
        shard = slice(rank, None, WORLD)
        grads, state = _train(model, x[shard], y[shard], 3, noise_seed=77, wrap=DPDDP)
        torch.save({"grads": grads, "state": state}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_process_gloo_equals_single_process(tmp_path):
    from support.dp_models import TinyNet, make_batch
    torch.manual_seed(0)
    x, y = make_batch(12)
    mp.spawn(_worker, args=(_free_port(), x, y, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # one process, the whole batch of each step (the two shards' rows), the same noise key
    order = torch.cat([torch.arange(r, 12, WORLD).view(-1, 3) for r in range(WORLD)], 1).flatten()
    grads, state = _train(TinyNet(seed=100), x[order], y[order], 3 * WORLD, noise_seed=77)

    for r in ranks:
        assert len(r["grads"]) == len(grads) == 2
        for got, want in zip(r["grads"], grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        for k, v in state.items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-5, atol=1e-7)
