"""Federated LoRA fine-tuning in Flower's simulation engine: FedAvg vs FedEx-LoRA.

A tiny Llama (random init from a ``transformers.LlamaConfig``, nothing downloaded)
gets ``lorafast.LoRALinear`` adapters on its attention and MLP projections. Each
client holds its own synthetic, non-IID corpus (sequences from a Markov chain that
mixes a shared transition table with a client-specific one, and a different amount
of data per client), trains the adapters for a few local SGD steps per round, and
the ``FedExLoRA`` strategy aggregates them. The federation runs once with
method="fedavg" (average A and B separately: inexact) and once with method="fedex"
(exact: the residual goes into the frozen base weights), then prints the per-round
mean training loss (before aggregation) and the loss of the aggregated global model
on the clients' held-out data, side by side. At the end every client returns its
base weights, which must equal the server's master copy.

    python examples/flower_fedex.py [--clients 4] [--rounds 3] [--tiny] [--verbose]

Ray runs the clients: here one CPU each on this machine; see the README for a
cluster.
"""
from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import lorafast  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from lorafast.integrations.flower import (  # noqa: E402
    BASE_VERSION_KEY, FedExLoRA, adapter_arrays, apply_global_adapters, base_arrays, base_weights)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
STATE_BASE, STATE_SYNC = "lorafast.base", "lorafast.sync"


# ----------------------------------------------------------------------------- model and data

def settings(tiny: bool) -> dict:
    """Everything a client needs, sent to it in the messages' ConfigRecord."""
    if tiny:
        return dict(vocab=64, hidden=32, intermediate=64, layers=1, heads=2, seq_len=16, r=4, alpha=8,
                    examples=16, batch=8, local_steps=3, lr=0.3, seed=0)
    return dict(vocab=128, hidden=64, intermediate=128, layers=2, heads=2, seq_len=32, r=8, alpha=16,
                examples=64, batch=16, local_steps=10, lr=0.5, seed=0)


def build_model(cfg) -> torch.nn.Module:
    """The same frozen base on the server and every client (seeded init), with LoRALinear
    adapters on the target projections; only the adapters train."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"],
                         intermediate_size=cfg["intermediate"], num_hidden_layers=cfg["layers"],
                         num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
                         max_position_embeddings=cfg["seq_len"], tie_word_embeddings=False,
                         initializer_range=cfg.get("init", 0.02))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]
    for i, (name, linear) in enumerate(targets):
        parent_name, _, attr = name.rpartition(".")
        lora = lorafast.LoRALinear.from_linear(linear, r=cfg["r"], lora_alpha=cfg["alpha"], seed=cfg["seed"] + i)
        setattr(model.get_submodule(parent_name), attr, lora)
    return model


def client_data(cfg, partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token sequences of one client: a Markov chain whose transitions
    mix a table shared by all clients with this client's own; clients hold 1×, 2× or 3×
    ``examples`` training sequences."""
    vocab, seq_len = cfg["vocab"], cfg["seq_len"]

    def table(seed):
        g = torch.Generator().manual_seed(seed)
        logits = torch.full((vocab, vocab), -1e9)
        successors = torch.randint(vocab, (vocab, 4), generator=g)
        logits.scatter_(1, successors, 3 * torch.rand(vocab, 4, generator=g))
        return logits.softmax(-1)

    trans = 0.5 * table(cfg["seed"]) + 0.5 * table(cfg["seed"] + 1000 + partition)
    g = torch.Generator().manual_seed(cfg["seed"] + 2000 + partition)
    n_train = cfg["examples"] * (1 + partition % 3)
    n = n_train + cfg["examples"] // 2
    x = torch.empty(n, seq_len, dtype=torch.long)
    x[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(1, seq_len):
        x[:, t] = torch.multinomial(trans[x[:, t - 1]], 1, generator=g).squeeze(1)
    return x[:n_train], x[n_train:]


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


# ----------------------------------------------------------------------------- ClientApp

client_app = ClientApp()


def _load(msg: Message, context: Context):
    """Rebuild the model, restore this node's base (kept in context.state between
    rounds), and apply what the server sent; returns (model, cfg, base version)."""
    torch.set_num_threads(1)
    cfg = msg.content["config"]
    model = build_model(cfg)
    version = 0
    if STATE_BASE in context.state:
        apply_global_adapters(model, context.state[STATE_BASE])
        version = int(context.state[STATE_SYNC]["base-version"])
    arrays = msg.content["arrays"] if "arrays" in msg.content else ArrayRecord()
    new_version = apply_global_adapters(model, arrays, base_version=version)
    if new_version != version:
        context.state[STATE_BASE] = base_arrays(model)
        context.state[STATE_SYNC] = ConfigRecord({"base-version": new_version})
    return model, cfg, new_version


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    model, cfg, version = _load(msg, context)
    x, _ = client_data(cfg, int(context.node_config["partition-id"]))
    g = torch.Generator().manual_seed(cfg["seed"] + 97 * int(msg.content["config"]["server-round"]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"])
    losses = []
    model.train()
    for _ in range(cfg["local_steps"]):
        batch = x[torch.randint(len(x), (cfg["batch"],), generator=g)]
        loss = lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    metrics = MetricRecord({"train_loss": sum(losses) / len(losses), "num-examples": len(x),
                            BASE_VERSION_KEY: version})
    return Message(RecordDict({"arrays": adapter_arrays(model), "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model, cfg, version = _load(msg, context)
    _, x = client_data(cfg, int(context.node_config["partition-id"]))
    model.eval()
    with torch.no_grad():
        loss = lm_loss(model, x).item()
    metrics = MetricRecord({"eval_loss": loss, "num-examples": len(x), BASE_VERSION_KEY: version})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Return this node's frozen base weights (after applying any pending update)."""
    model, _, version = _load(msg, context)
    return Message(RecordDict({"arrays": base_arrays(model),
                               "metrics": MetricRecord({BASE_VERSION_KEY: version})}), reply_to=msg)


# ----------------------------------------------------------------------------- ServerApp

def make_server_app(method: str, cfg: dict, num_clients: int, num_rounds: int, results: dict) -> ServerApp:
    app = ServerApp()

    def report(kind):
        """The clients' mean loss weighted by their example counts, printed as it comes."""
        rounds = []

        def aggregate(records, weighting_key):
            metrics = [next(iter(r.metric_records.values())) for r in records]
            total = sum(m[weighting_key] for m in metrics)
            rounds.append(sum(m[f"{kind}_loss"] * m[weighting_key] for m in metrics) / total)
            print(f"  [{method}] round {len(rounds)}/{num_rounds}: {kind} loss {rounds[-1]:.4f} "
                  f"({len(records)} clients)", flush=True)
            return MetricRecord({f"{kind}_loss": rounds[-1]})
        return aggregate

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        model = build_model(cfg)
        scaling = cfg["alpha"] / cfg["r"]
        strategy = FedExLoRA(method, scaling=scaling, base_weights=base_weights(model),
                             min_train_nodes=num_clients, min_evaluate_nodes=num_clients,
                             min_available_nodes=num_clients,
                             train_metrics_aggr_fn=report("train"), evaluate_metrics_aggr_fn=report("eval"))
        config = ConfigRecord(cfg)
        result = strategy.start(grid=grid, initial_arrays=adapter_arrays(model), num_rounds=num_rounds,
                                train_config=config, evaluate_config=config, timeout=300)

        # Every node returns its frozen base weights (catching up first if it must).
        queries = [Message(RecordDict({"config": config}), dst_node_id=node, message_type=MessageType.QUERY)
                   for node in grid.get_node_ids()]
        replies = [m for m in grid.send_and_receive(strategy.with_base_sync(queries), timeout=300)]
        strategy.note_replies(replies)
        diff = 0.0
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed: {reply.error.reason}")
            client = reply.content["arrays"].to_torch_state_dict()
            for name, master in strategy.base_weights.items():
                diff = max(diff, (client[f"{name}.weight"] - master).abs().max().item())
        initial = base_weights(build_model(cfg))
        moved = max((strategy.base_weights[k] - w).abs().max().item() for k, w in initial.items())
        results[method] = dict(
            train={r: m["train_loss"] for r, m in result.train_metrics_clientapp.items()},
            eval={r: m["eval_loss"] for r, m in result.evaluate_metrics_clientapp.items()},
            base_diff=diff, base_moved=moved, nodes=len(replies), layers=len(strategy.base_weights))

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="smallest model and data (for tests)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.add_argument("--ray-address", default=None,
                        help="join a running Ray cluster ('auto' or HOST:PORT) instead of starting Ray here")
    args = parser.parse_args()
    if args.clients < 2 or args.rounds < 1:
        parser.error("--clients must be >= 2 and --rounds >= 1")
    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)

    cfg = settings(args.tiny)
    # Each client takes one CPU. Here Ray starts on this machine with at most one CPU per
    # client and a small object store; on a cluster the cluster's resources decide.
    init_args = {"logging_level": "INFO" if args.verbose else "ERROR"}
    if args.ray_address:
        init_args["address"] = args.ray_address
        where = f"Ray cluster at {args.ray_address}"
    else:
        cpus = max(1, min(os.cpu_count() or 1, args.clients))
        init_args.update(num_cpus=cpus, num_gpus=0, include_dashboard=False, object_store_memory=128 * 1024 ** 2)
        where = f"{cpus} local Ray CPUs"
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}
    print(f"{args.clients} clients, {args.rounds} rounds, model {cfg['layers']}×{cfg['hidden']} "
          f"(LoRA r={cfg['r']} on {', '.join(TARGETS)}), {where}", flush=True)
    results: dict = {}
    times = {}
    for method in ("fedavg", "fedex"):
        print(f"[{method}] simulation starts", flush=True)
        t0 = time.perf_counter()
        run_simulation(server_app=make_server_app(method, cfg, args.clients, args.rounds, results),
                       client_app=client_app, num_supernodes=args.clients, backend_config=backend_config,
                       verbose_logging=args.verbose)
        times[method] = time.perf_counter() - t0
        if method not in results:
            raise SystemExit(f"[{method}] the simulation did not finish")
        print(f"[{method}] done in {times[method]:.1f} s", flush=True)

    print()
    print("mean loss per round (train: clients' local steps, before aggregation; "
          "eval: global model, clients' held-out data)")
    print(f"{'round':>5} | {'fedavg train':>12} {'fedex train':>12} | {'fedavg eval':>12} {'fedex eval':>12}")
    for r in range(1, args.rounds + 1):
        row = [results[m][k].get(r, float("nan")) for k in ("train", "eval") for m in ("fedavg", "fedex")]
        print(f"{r:>5} | {row[0]:>12.4f} {row[1]:>12.4f} | {row[2]:>12.4f} {row[3]:>12.4f}")
    print()
    for method in ("fedavg", "fedex"):
        res = results[method]
        print(f"{method}: clients' base weights vs the server's master copy: max |diff| = {res['base_diff']:.3e} "
              f"({res['nodes']} nodes × {res['layers']} layers; master moved {res['base_moved']:.3e} "
              "from the pretrained base)")
        assert res["nodes"] == args.clients, f"{method}: {res['nodes']} of {args.clients} nodes answered"
        assert res["base_diff"] <= 1e-6, f"{method}: client bases differ from the master by {res['base_diff']}"
    assert results["fedavg"]["base_moved"] == 0.0 and results["fedex"]["base_moved"] > 0.0
    print("OK: every client's base equals the server's master copy")


if __name__ == "__main__":
    main()
