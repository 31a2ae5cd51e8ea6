"""The main job: train a small GPT on BPE tokens of the Python standard library.

    ichiban-train                       # defaults: a ~1M-parameter model, 200 steps on CPU
    ichiban-train --steps 1000 --d-model 256 --n-layer 6 --out-dir runs/big
    ichiban-train --ckpt-every 50 --ckpt-dir runs/ckpt      # async checkpoints while training
    ichiban-train --ckpt-dir runs/ckpt --resume             # continue from the newest checkpoint
    ichiban-train --data data/shards                        # your shards (ichiban-data prepare)
    torchrun --nproc-per-node 2 -m ichiban_comm.train       # data parallel over the "ichiban" backend
    python -m ichiban_comm.train --help

The norms, SwiGLU, rotary embeddings and the (fused linear) cross-entropy run
through ``ichiban_comm.triton_kernels`` (``--ops fused``, the default): Triton
kernels on CUDA, their plain-torch references on the CPU.

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

from .data.job import JobData, job_data
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
    g.add_argument("--data", default=None, metavar="DIR",
                   help="token shards (ichiban-data prepare); default: the built-in corpus, "
                        "prepared on first use and cached")
    g.add_argument("--data-bytes", type=int, default=8 << 20,
                   help="built-in corpus: bytes of standard-library source to tokenize (0: all)")
    g.add_argument("--out-dir", default="runs/train")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--eval-batches", type=int, default=8,
                   help="held-out batches for the validation loss at the end")
    g.add_argument("--ops", choices=("fused", "plain"), default="fused",
                   help="fused: ichiban_comm.triton_kernels; plain: plain torch")
    g = p.add_argument_group("checkpointing")
    g.add_argument("--ckpt-dir", default=None, help="checkpoint directory (default: OUT_DIR/ckpt)")
    g.add_argument("--ckpt-every", type=int, default=0, help="save every N steps (0: never)")
    g.add_argument("--keep-last", type=int, default=3, help="committed checkpoints to keep")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --ckpt-dir")
    g.add_argument("--stop-at", type=int, default=None,
                   help="end this run after step N of the --steps schedule (a job split across "
                        "allocations; continue later with --resume)")
    g = p.add_argument_group("distributed (under torchrun)")
    g.add_argument("--backend", default="ichiban",
                   help="torch.distributed backend when WORLD_SIZE > 1 (ichiban, gloo, nccl)")
    args = p.parse_args(argv)
    if args.ckpt_every < 0:
        p.error(f"--ckpt-every must be >= 0, got {args.ckpt_every}")
    if args.keep_last < 1:
        p.error(f"--keep-last must be >= 1, got {args.keep_last}")
    if args.ckpt_dir is None:
        args.ckpt_dir = os.path.join(args.out_dir, "ckpt")
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


def select_ops(name: str):
    if name == "plain":
        return PlainOps
    from .triton_kernels import FusedOps

    return FusedOps


def build(args, vocab_size: int = 256):
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                    d_model=args.d_model, vocab_size=vocab_size)
    torch.manual_seed(args.seed)
    model = GPT(cfg, ops=select_ops(args.ops))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    return model, opt


@torch.no_grad()
def evaluate(model, data: JobData, n: int) -> float:
    model.eval()
    losses = [model(*data.val_batch(i)).item() for i in range(n)]
    model.train()
    return sum(losses) / max(1, len(losses))


def _init_distributed(args):
    """(rank, world_size); under torchrun, a process group on --backend."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if args.backend == "ichiban":
        from . import distributed  # noqa: F401  (registers the backend)
    dist.init_process_group(args.backend)
    return dist.get_rank(), dist.get_world_size()


def _open_checkpointer(args):
    if not (args.ckpt_every or args.resume):
        return None
    from .checkpoint import AsyncCheckpointer

    return AsyncCheckpointer(args.ckpt_dir, keep_last=args.keep_last)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = _init_distributed(args)
    lead = rank == 0
    say = print if lead else (lambda *a, **k: None)
    os.makedirs(args.out_dir, exist_ok=True)

    data = job_data(args.data, args.data_bytes, args.seq_len, args.batch_size, args.seed, rank, world)
    model, opt = build(args, data.vocab_size)
    core = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(core)
    say(f"ichiban-train: {core.num_params() / 1e6:.2f}M parameters "
        f"({args.n_layer} layers, d_model {args.d_model}, {args.n_head} heads), "
        f"ops: {core.ops.name}; data: {data.describe()}; {args.steps} steps of "
        f"{world}x{args.batch_size}x{args.seq_len} tokens; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads" + (f", {world} ranks on {args.backend}" if world > 1 else ""),
        flush=True)

    ckpt = _open_checkpointer(args)
    start = 0
    if args.resume:
        latest = ckpt.latest_step()
        if latest is None:
            say(f"--resume: no complete checkpoint in {args.ckpt_dir}; starting from step 0")
        else:
            state = ckpt.load(step=latest)
            core.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            torch.set_rng_state(ckpt.load_rank_state()["rng"])
            data.loader.load_state_dict(state["data"])
            start = int(state["step"])
            say(f"resumed from {args.ckpt_dir} at step {start}")
    if start >= args.steps:
        say(f"nothing to do: the checkpoint is at step {start} and --steps is {args.steps}")
        if ckpt is not None:
            ckpt.close()
        return 0

    metrics = open(os.path.join(args.out_dir, "metrics.jsonl"), "a" if start else "w") if lead else None
    tokens_per_step = world * args.batch_size * args.seq_len
    losses: list[float] = []
    saves: list = []
    window_t, window_tokens = time.perf_counter(), 0
    train_t0 = time.perf_counter()
    end = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    for step in range(start, end):
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = next(data.loader)  # this rank's slice of the global batch
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        window_tokens += tokens_per_step

        loss_f = loss.item()  # one sync per step: the loss is logged every step
        if not math.isfinite(loss_f):
            print(f"error: loss became {loss_f} at step {step} on rank {rank}; lower --lr "
                  f"(now {args.lr})", file=sys.stderr)
            return 1
        losses.append(loss_f)
        if ckpt is not None and args.ckpt_every and (step + 1) % args.ckpt_every == 0:
            saves.append(ckpt.save(step + 1, {"model": core.state_dict(), "optim": opt.state_dict(),
                                              "step": step + 1, "data": data.loader.state_dict()},
                                   rank_state={"rng": torch.get_rng_state()}))
        if metrics is not None:
            metrics.write(json.dumps({"step": step, "loss": loss_f, "lr": lr,
                                      "grad_norm": float(grad_norm)}) + "\n")
        if (step + 1) % args.log_every == 0 or step == start or step + 1 == end:
            dt = time.perf_counter() - window_t
            say(f"step {step + 1:>6}/{args.steps}  loss {loss_f:.4f}  lr {lr:.2e}  "
                f"grad {float(grad_norm):.2f}  {window_tokens / dt:,.0f} tok/s", flush=True)
            window_t, window_tokens = time.perf_counter(), 0
            if metrics is not None:
                metrics.flush()
    if ckpt is not None:
        ckpt.close()  # waits for the last save to commit; raises if any failed
    if metrics is not None:
        metrics.close()

    elapsed = time.perf_counter() - train_t0
    k = min(10, len(losses))
    summary = {
        "steps": args.steps,
        "start_step": start,
        "first_loss": losses[0],
        "last_loss": sum(losses[-k:]) / k,
        "val_loss": evaluate(core, data, args.eval_batches),
        "tokens_per_s": len(losses) * tokens_per_step / elapsed,
        "train_seconds": elapsed,
        "params": core.num_params(),
        "ops": core.ops.name,
        "world_size": world,
    }
    if saves:
        summary["checkpoints"] = len(saves)
        summary["ckpt_blocking_ms_median"] = 1e3 * sorted(h.blocking_s for h in saves)[len(saves) // 2]
    if lead:
        with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    ckpt_note = (f"; {len(saves)} checkpoint(s) in {args.ckpt_dir}, median pause "
                 f"{summary['ckpt_blocking_ms_median']:.1f} ms" if saves else "")
    say(f"done: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
        f"(mean of last {k} steps), validation {summary['val_loss']:.3f}; "
        f"{summary['tokens_per_s']:,.0f} tok/s over {elapsed:.1f} s{ckpt_note}; "
        f"metrics in {args.out_dir}/", flush=True)
    if lead and summary["last_loss"] >= summary["first_loss"]:
        print("warning: the loss did not fall; try more --steps or a different --lr",
              file=sys.stderr)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
