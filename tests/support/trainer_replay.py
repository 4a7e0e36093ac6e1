"""A DPTrainer run's private gradients, and the DP engine's on the same records.

``recording(cls)`` makes a DPTrainer class (DPTrainer, DPSFTTrainer, ...) that keeps every
micro-batch it trains on and the private gradient of every optimizer step. ``engine_gradients``
feeds those micro-batches, one record at a time with the model's own mean loss, to
lorafast.dp.PrivacyEngine on a copy of the model, and returns its gradient at each step.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from lorafast.dp import PrivacyEngine  # noqa: E402


class GradientRecorder(transformers.TrainerCallback):
    """The private gradient of every step, read after the optimizer step (before zero_grad)."""

    def __init__(self):
        self.grads = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def recording(cls):
    """A subclass of the DPTrainer class ``cls`` whose ``seen`` lists every micro-batch it trained on."""

    class Recording(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.seen.append({k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
            return super().training_step(model, inputs, num_items_in_batch)

    return Recording


def engine_gradients(model, seen, steps: int, micro_batches: int, *, expected_batch_size: int, noise_multiplier,
                     max_grad_norm, clipping: str, noise_seed: int):
    """[{name: gradient}] of ``steps`` private steps of lorafast's PrivacyEngine on ``model``
    (lorafast layers), each over ``micro_batches`` consecutive entries of ``seen``."""
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loader = torch.utils.data.DataLoader(range(expected_batch_size), batch_size=expected_batch_size)
    model, opt, _ = PrivacyEngine().make_private(
        module=model, optimizer=sgd, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, clipping=clipping, poisson_sampling=False, loss_reduction="sum",
        noise_seed=noise_seed)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = []
    for step in range(steps):
        for chunk in seen[step * micro_batches:(step + 1) * micro_batches]:
            for i in range(chunk["input_ids"].shape[0]):
                model(**{k: v[i:i + 1] for k, v in chunk.items()}).loss.backward()
        opt.step()
        out.append({n: p.grad.clone() for n, p in named})
        opt.zero_grad()
    return out


def assert_same_gradients(got, expected, rtol=2e-5, atol=1e-6):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for n in e:
            torch.testing.assert_close(g[n], e[n], rtol=rtol, atol=atol)
