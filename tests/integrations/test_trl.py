"""TRL's SFTTrainer with lorafast: DPSFTTrainer (private) and fuse() (not), on a tiny Llama
with an in-memory tokenizer; TRL tokenizes the text datasets itself."""
import copy
import math
import warnings

import pytest
import torch

from support.hf_models import peft, peft_lora, random_texts, tiny_llama, tiny_tokenizer
from support.trainer_replay import GradientRecorder, assert_same_gradients, engine_gradients, recording

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import lorafast  # noqa: E402
from lorafast.dp import compute_epsilon  # noqa: E402
from lorafast.integrations.transformers import DPArguments, DPSFTTrainer, fuse  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
N = 24


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=3, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, max_length=12,
                dataloader_pin_memory=False, dataset_num_proc=None)
    base.update(kw)
    return trl.SFTConfig(**base)


def _texts(seed=0):
    return datasets.Dataset.from_dict({"text": random_texts(N, seed=seed)})


def _prompt_completions(seed=0):
    return datasets.Dataset.from_dict({"prompt": random_texts(N, seed=seed, max_words=5),
                                       "completion": random_texts(N, seed=seed + 1, max_words=4)})


def _dp(**kw):
    base = dict(noise_multiplier=0.9, target_delta=1e-3, max_grad_norm=0.4, noise_seed=3, sampling_seed=8)
    base.update(kw)
    return DPArguments(**base)


def _train(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


def _sft(cls, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(processing_class=tiny_tokenizer(), **kw)


def test_dp_sft_trainer_wraps_the_model_in_peft_fuses_and_logs_epsilon(tmp_path):
    cfg = peft.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8)
    trainer = _sft(DPSFTTrainer, model=tiny_llama(), args=_config(tmp_path), train_dataset=_texts(),
                   peft_config=cfg, dp_args=_dp(noise_multiplier=None, target_epsilon=3.0))
    assert len(trainer.fusion_report.fused) == 2 * len(TARGETS)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in trainer.model.modules())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    _train(trainer)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 3 and all(math.isfinite(e["loss"]) for e in logged)
    for k, e in enumerate(logged, start=1):
        assert e["epsilon"] == pytest.approx(compute_epsilon(trainer.noise_multiplier, 8 / N, k, 1e-3), rel=1e-6)
    assert 0.9 * 3.0 < logged[-1]["epsilon"] <= 3.0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)


def test_dp_sft_gradients_equal_the_dp_engines_on_the_same_batches(tmp_path):
    ga, steps = 2, 2
    model = peft_lora(tiny_llama(seed=5), TARGETS)
    engine_model = lorafast.from_peft(copy.deepcopy(model))
    recorder = GradientRecorder()
    # TRL's default activation checkpointing stays on; fp32 (bf16=False) for an exact comparison
    trainer = _sft(recording(DPSFTTrainer), model=model, args=_config(tmp_path, max_steps=steps, bf16=False),
                   train_dataset=_texts(seed=1), dp_args=_dp(), callbacks=[recorder])
    assert getattr(trainer.args, "activation_checkpointing", None) or trainer.args.gradient_checkpointing
    _train(trainer)
    rows = [c["input_ids"].shape[0] for c in trainer.seen]
    assert len(rows) == steps * ga and 0 < sum(rows) < steps * N
    padded = [c for c in trainer.seen if (c["labels"] == -100).any()]
    assert padded     # records of different lengths: each one's loss must ignore the others' padding
    expected = engine_gradients(engine_model, trainer.seen, steps, ga, expected_batch_size=8, noise_multiplier=0.9,
                                max_grad_norm=0.4, clipping="flat", noise_seed=3)
    assert_same_gradients(recorder.grads, expected)


def test_completion_only_loss_is_each_records_mean_over_its_completion(tmp_path):
    trainer = _sft(recording(DPSFTTrainer), model=peft_lora(tiny_llama(seed=2), TARGETS),
                   args=_config(tmp_path, max_steps=1, completion_only_loss=True),
                   train_dataset=_prompt_completions(), dp_args=_dp())
    _train(trainer)
    batch = next(c for c in trainer.seen if c["input_ids"].shape[0] > 1)
    prompt_tokens = (batch["labels"] == -100) & (batch["attention_mask"] == 1)
    assert prompt_tokens.any()     # the prompts are masked out of the loss
    model = trainer.model.eval()
    losses = trainer.per_sample_losses(model, batch)
    alone = torch.stack([model(**{k: v[i:i + 1] for k, v in batch.items()}).loss
                         for i in range(batch["input_ids"].shape[0])])
    torch.testing.assert_close(losses, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(packing=True), dict(padding_free=True)])
def test_packing_and_padding_free_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError, match="packing"):
        _sft(DPSFTTrainer, model=peft_lora(tiny_llama(), TARGETS), args=_config(tmp_path, **kwargs),
             train_dataset=_texts(), dp_args=_dp())


def test_fused_sft_trainer_trains_like_peft(tmp_path):
    """Non-private: the same SFT run with PEFT's layers and with fuse()'s gives the same adapters."""
    runs = []
    for fused in (False, True):
        model = peft_lora(tiny_llama(seed=6), TARGETS)
        trainer = _sft(trl.SFTTrainer, model=model, args=_config(tmp_path / str(fused), max_steps=3, bf16=False),
                       train_dataset=_texts(seed=2))
        if fused:
            report = fuse(trainer)
            assert len(report.fused) == 2 * len(TARGETS) and type(trainer) is trl.SFTTrainer
        _train(trainer)
        assert not any("epsilon" in e for e in trainer.state.log_history)
        runs.append({n.replace(".default.weight", ""): p.detach() for n, p in model.named_parameters()
                     if p.requires_grad})
    peft_run, fused_run = runs
    assert peft_run.keys() == fused_run.keys() and peft_run
    for n in peft_run:
        torch.testing.assert_close(fused_run[n], peft_run[n], rtol=1e-4, atol=1e-5)
