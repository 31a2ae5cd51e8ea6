"""The main job: train a small GPT on byte-level tokens of the Python standard library.

    ichiban-train                       # defaults: a ~1M-parameter model, 200 steps on CPU
    ichiban-train --steps 1000 --d-model 256 --n-layer 6 --out-dir runs/big
    python -m ichiban_comm.train --help

Prints a progress line every ``--log-every`` steps (step, loss, learning rate,
tokens/s) and a summary at the end; writes ``metrics.jsonl`` and
``summary.json`` to ``--out-dir``. Deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from .data import ByteBatches, stdlib_corpus
from .models import GPT, GPTConfig, PlainOps


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ichiban-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=128)
    g.add_argument("--n-layer", type=int, default=4)
    g.add_argument("--n-head", type=int, default=4)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=200)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    g.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g = p.add_argument_group("data and output")
    g.add_argument("--data-bytes", type=int, default=8 << 20,
                   help="bytes of the standard-library corpus to use (0: all)")
    g.add_argument("--out-dir", default="runs/train")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--eval-batches", type=int, default=8,
                   help="held-out batches for the validation loss at the end")
    args = p.parse_args(argv)
    for name in ("d_model", "n_layer", "n_head", "steps", "batch_size", "seq_len", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.d_model % args.n_head or (args.d_model // args.n_head) % 2:
        p.error(f"--d-model ({args.d_model}) must be a multiple of 2 x --n-head ({args.n_head})")
    return args


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def build(args):
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                    d_model=args.d_model)
    torch.manual_seed(args.seed)
    model = GPT(cfg, ops=PlainOps)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    return model, opt


@torch.no_grad()
def evaluate(model, data: ByteBatches, n: int) -> float:
    model.eval()
    losses = [model(*data.val_batch(i)).item() for i in range(n)]
    model.train()
    return sum(losses) / max(1, len(losses))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)

    t0 = time.perf_counter()
    corpus = stdlib_corpus(args.data_bytes or None)
    data = ByteBatches(corpus, args.seq_len, args.batch_size, seed=args.seed)
    model, opt = build(args)
    print(f"ichiban-train: {model.num_params() / 1e6:.2f}M parameters "
          f"({args.n_layer} layers, d_model {args.d_model}, {args.n_head} heads), "
          f"ops: {model.ops.name}; data: {len(corpus) / 2**20:.1f} MiB of standard-library source "
          f"({time.perf_counter() - t0:.1f} s to load); {args.steps} steps of "
          f"{args.batch_size}x{args.seq_len} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)

    metrics = open(os.path.join(args.out_dir, "metrics.jsonl"), "w")
    tokens_per_step = args.batch_size * args.seq_len
    losses: list[float] = []
    window_t, window_tokens = time.perf_counter(), 0
    train_t0 = time.perf_counter()
    for step in range(args.steps):
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = data.batch(step)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        window_tokens += tokens_per_step

        loss_f = loss.item()  # one sync per step: the loss is logged every step
        if not math.isfinite(loss_f):
            print(f"error: loss became {loss_f} at step {step}; lower --lr (now {args.lr})",
                  file=sys.stderr)
            return 1
        losses.append(loss_f)
        metrics.write(json.dumps({"step": step, "loss": loss_f, "lr": lr,
                                  "grad_norm": float(grad_norm)}) + "\n")
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            dt = time.perf_counter() - window_t
            print(f"step {step + 1:>6}/{args.steps}  loss {loss_f:.4f}  lr {lr:.2e}  "
                  f"grad {float(grad_norm):.2f}  {window_tokens / dt:,.0f} tok/s", flush=True)
            window_t, window_tokens = time.perf_counter(), 0
            metrics.flush()
    metrics.close()

    elapsed = time.perf_counter() - train_t0
    k = min(10, len(losses))
    summary = {
        "steps": args.steps,
        "first_loss": losses[0],
        "last_loss": sum(losses[-k:]) / k,
        "val_loss": evaluate(model, data, args.eval_batches),
        "tokens_per_s": args.steps * tokens_per_step / elapsed,
        "train_seconds": elapsed,
        "params": model.num_params(),
        "ops": model.ops.name,
    }
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"done: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
          f"(mean of last {k} steps), validation {summary['val_loss']:.3f}; "
          f"{summary['tokens_per_s']:,.0f} tok/s over {elapsed:.1f} s; "
          f"metrics in {args.out_dir}/", flush=True)
    if summary["last_loss"] >= summary["first_loss"]:
        print("warning: the loss did not fall; try more --steps or a different --lr",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
