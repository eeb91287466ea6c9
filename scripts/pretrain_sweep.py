"""Choose the pretraining recipe of ``pretrain-steps`` on public text alone, and show what it gives on the plays.

Usage: python scripts/pretrain_sweep.py --data-dir ../shared/data [STEPS,LR,SCHEDULE,WEIGHT_DECAY ...]

Each variant (default: the ones in docs/results.md) pretrains the default
``char-transformer`` (model seed 0) with :func:`dpsign_fl.initial_model.pretrain`
on the first 90 % of the poems' chunks and prints its next-character accuracy
on the poems' last 10 % (held out: the number the recipe's constants are
chosen by) and on the first 3,000 of the plays' 10,127 test chunks (for
information only; choosing by it would tune on the test set). One torch
thread, about a minute a variant. It prints, it never edits docs.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from dpsign_fl.data import load_dataset, public_text
from dpsign_fl.evaluation import evaluate
from dpsign_fl.initial_model import PRETRAIN_RECIPES, pretrain
from dpsign_fl.models import build_model

VARIANTS = (
    "600,0.003,constant,0",
    "900,0.012,cosine,0.1",
    "900,0.03,cosine,0.1",
    "900,0.05,cosine,0.1",
    "900,0.08,cosine,0.1",
    "1500,0.03,cosine,0.1",
    "1500,0.05,cosine,0.1",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder holding shakespeare/")
    parser.add_argument("variants", nargs="*", default=VARIANTS, help="STEPS,LR,SCHEDULE,WEIGHT_DECAY")
    args = parser.parse_args()
    torch.set_num_threads(1)
    chunks = public_text("shakespeare", args.data_dir)
    cut = int(0.9 * chunks.shape[0])
    train, held_out = chunks[:cut], chunks[cut:]
    dataset = load_dataset("shakespeare", data_dir=args.data_dir)
    plays = dataset.test_inputs[:3000], dataset.test_targets[:3000]
    print(f"public chunks: {cut} to train on, {held_out.shape[0]} held out")
    print("| steps | first step | schedule | weight decay | held-out poems | plays' first 3,000 test chunks | s |")
    print("|---|---|---|---|---|---|---|")
    for variant in args.variants:
        steps, learning_rate, schedule, weight_decay = variant.split(",")
        started = time.monotonic()
        model = build_model("char-transformer", input_shape=(80,), num_classes=97, seed=0)
        recipe = dataclasses.replace(
            PRETRAIN_RECIPES["shakespeare"], learning_rate=float(learning_rate), schedule=schedule, weight_decay=float(weight_decay)
        )
        pretrain(model, train[:, :-1], train[:, 1:], steps=int(steps), seed=0, recipe=recipe, log=lambda line: None)
        poems = 100 * evaluate(model, held_out[:, :-1], held_out[:, 1:])[1]
        tests = 100 * evaluate(model, *plays)[1]
        print(f"| {steps} | {learning_rate} | {schedule} | {weight_decay} | {poems:.2f} % | {tests:.2f} % | "
              f"{time.monotonic() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
