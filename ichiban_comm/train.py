"""The main job: train a small GPT on BPE tokens of the Python standard library.

    ichiban-train                       # defaults: a ~1M-parameter model, 200 steps on CPU
    ichiban-train --steps 1000 --d-model 256 --n-layer 6 --out-dir runs/big
    ichiban-train --ckpt-every 50 --ckpt-dir runs/ckpt      # async checkpoints while training
    ichiban-train --ckpt-dir runs/ckpt --resume             # continue from the newest checkpoint
    ichiban-train --data data/shards                        # your shards (ichiban-data prepare)
    torchrun --nproc-per-node 2 -m ichiban_comm.train       # data parallel over the "ichiban" backend
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
        --max-restarts 3 -m ichiban_comm.train --tp 2 --dp 2 --ckpt-every 10 --memory-ckpt
                                                            # restarts resume from the newest snapshot
    ichiban-train report runs/train                         # step-time split, goodput, restarts
    ichiban-train --demo-failure                            # a rank killed mid-run, resumed, reported
    ichiban-train --nproc 4 --tp 2 --dp 2                   # 4 local ranks: tensor x data parallel
    ichiban-train --nproc 4 --tp 2 --zero                   # ... the optimizer state sharded over dp
    ichiban-train --nproc 2 --pp 2                          # two pipeline stages
    python -m ichiban_comm.train --help

The norms, SwiGLU, rotary embeddings and the (fused linear) cross-entropy run
through ``ichiban_comm.triton_kernels`` (``--ops fused``, the default): Triton
kernels on CUDA, their plain-torch references on the CPU.

Prints a progress line every ``--log-every`` steps (step, loss, learning rate,
tokens/s) and a summary at the end; writes ``metrics.jsonl`` (one line per
step with its time split into compute, communication wait, checkpoint stall
and data wait: steptime.py; one line per start, injected failure and end) and
``summary.json`` to ``--out-dir``. Deterministic for a given ``--seed``; a
torchrun restart resumes bit-identically (docs/resilience.md).
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
    g.add_argument("--memory-ckpt", action="store_true",
                   help="also keep each checkpoint in a keeper process per host (and a replica on "
                        "the next host): a restart reads memory before disk")
    g.add_argument("--ckpt-mode", choices=("async", "torch", "dcp"), default="async",
                   help="async: AsyncCheckpointer (default); torch / dcp: synchronous torch.save "
                        "on rank 0 / torch.distributed.checkpoint.save, the baselines of "
                        "benchmarks/goodput.py (replicated layouts only)")
    g = p.add_argument_group("distributed (under torchrun, or --nproc)")
    g.add_argument("--backend", default="ichiban",
                   help="torch.distributed backend when WORLD_SIZE > 1 (ichiban, gloo, nccl)")
    g.add_argument("--nproc", type=int, default=0,
                   help="start this many ranks on this machine (no torchrun needed)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (stages)")
    g.add_argument("--dp", type=int, default=-1, help="data-parallel size (-1: the rest)")
    g.add_argument("--zero", action="store_true",
                   help="shard the optimizer state over dp (ZeRO-1, ShardedOptimizer)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="with --tp: norms and the residual stream hold 1/tp of the sequence")
    g.add_argument("--microbatches", type=int, default=0,
                   help="with --pp: micro-batches per step (0: --pp)")
    g.add_argument("--comm-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="a collective that waits longer fails, naming the ranks it waited for")
    g = p.add_argument_group("fault injection (demos, tests, benchmarks/goodput.py)")
    g.add_argument("--demo-failure", action="store_true",
                   help="a 4-rank run on two declared hosts under torchrun, a rank killed and "
                        "resumed, then the report (ichiban_comm/demo.py)")
    g.add_argument("--fail-at", action="append", default=[], metavar="STEP:RANK",
                   help="rank RANK ends itself at the start of step STEP (repeatable: the k-th "
                        "failure, in step order, fires in attempt k of a torchrun restart)")
    g.add_argument("--fail-signal", choices=("kill", "stop"), default="kill",
                   help="kill: SIGKILL (a dead rank); stop: SIGSTOP (a hung rank)")
    args = p.parse_args(argv)
    for name in ("tp", "pp"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.dp == 0 or args.dp < -1:
        p.error(f"--dp must be >= 1 or -1 (the rest), got {args.dp}")
    if args.nproc < 0:
        p.error(f"--nproc must be >= 0, got {args.nproc}")
    if args.microbatches < 0:
        p.error(f"--microbatches must be >= 0, got {args.microbatches}")
    if args.sequence_parallel and args.pp > 1:
        p.error("--sequence-parallel with --pp > 1 is not supported: only the first stage's "
                "first block slices the sequence")
    fails = []
    for spec in args.fail_at:
        try:
            st, rk = (int(v) for v in spec.split(":"))
        except ValueError:
            p.error(f"--fail-at takes STEP:RANK (two integers), got {spec!r}")
        if st < 0 or rk < 0:
            p.error(f"--fail-at STEP:RANK needs STEP >= 0 and RANK >= 0, got {spec!r}")
        fails.append((st, rk))
    args.fail_at = sorted(fails)
    if args.comm_timeout <= 0:
        p.error(f"--comm-timeout must be > 0 seconds, got {args.comm_timeout}")
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


def build(args, dims=None, vocab_size: int = 256):
    """(model, optimizer, pipeline): the full model made with one seed (so every split starts
    from the same numbers), split by --tp, cut by --pp, its optimizer sharded by --zero."""
    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                    d_model=args.d_model, vocab_size=vocab_size)
    torch.manual_seed(args.seed)
    model = GPT(cfg, ops=select_ops(args.ops))
    model.tp_report, model.full_params = None, model.num_params()
    if dims is not None and (dims.tp > 1 or args.zero):
        # at tp=1 too with --zero: the layers then carry the split layout a checkpoint saved at
        # another tp is resharded into
        from .parallel import parallelize

        parallelize(model, dims, plan="auto", sequence_parallel=args.sequence_parallel)
    pipe = None
    stage = model
    if dims is not None and dims.pp > 1:
        from .parallel.pipeline import pipeline_gpt

        pipe = pipeline_gpt(model, dims, n_microbatches=args.microbatches or dims.pp)
        stage = pipe.module
    named = list(stage.named_parameters())
    groups = [{"params": [p for n, p in named if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0}]
    if args.zero:
        from .parallel import ShardedOptimizer

        opt = ShardedOptimizer(torch.optim.AdamW, groups, dims, lr=args.lr, betas=(0.9, 0.95))
    else:
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    if pipe is not None:
        pipe.optimizer = opt  # micro-batches accumulate under no_sync() with --zero
    return model, opt, pipe


@torch.no_grad()
def evaluate(model, data: JobData, n: int) -> float:
    model.eval()
    losses = [model(*data.val_batch(i)).item() for i in range(n)]
    model.train()
    return sum(losses) / max(1, len(losses))


def _init_distributed(args):
    """(rank, world_size, dims, start info); under torchrun or --nproc, a process group on
    --backend (one fresh store per torchrun attempt: elastic.py) and the tp x pp x dp groups
    placed by the topology (dims is None in one process)."""
    from . import elastic

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if args.tp * args.pp > 1 or args.zero or args.dp > 1:
            raise SystemExit(f"error: --tp {args.tp} --pp {args.pp} --dp {args.dp}"
                             f"{' --zero' if args.zero else ''} needs several ranks: add --nproc "
                             f"{args.tp * args.pp * max(args.dp, 1 if not args.zero else 2)} "
                             f"(or run under torchrun)")
        launch = elastic.process_start_time()
        now = time.time()
        return 0, 1, None, {"attempt": 1, "init_s": now - launch, "launch_time": launch, "time": now}
    import torch.distributed as dist

    if args.backend == "ichiban":
        from . import distributed  # noqa: F401  (registers the backend)
    info = elastic.init_process_group(args.backend, args.comm_timeout)
    from .parallel import init_parallel

    import datetime

    dims = init_parallel(tp=args.tp, pp=args.pp, dp=args.dp,
                         timeout=datetime.timedelta(seconds=args.comm_timeout))
    return dist.get_rank(), dist.get_world_size(), dims, info


def _strip_nproc(argv):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_local(nproc: int, argv) -> int:
    """Start nproc ranks of this job on this machine (what torchrun --nproc-per-node does for
    one host): each gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT.
    A rank that fails ends the others; the exit code is the first failure's."""
    import signal
    import subprocess

    from .elastic import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "ichiban_comm.train"] + _strip_nproc(argv)
    procs = []
    for r in range(nproc):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, env=env))
    rc = 0
    try:
        while any(p.poll() is None for p in procs):
            bad = [p for p in procs if p.returncode not in (None, 0)]
            if bad:
                rc = bad[0].returncode
                print(f"ichiban-train: rank {procs.index(bad[0])} exited with {rc}; stopping the "
                      "other ranks", file=sys.stderr)
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        rc = 130
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if rc == 0:
        rc = next((p.returncode for p in procs if p.returncode != 0), 0)
    return rc


def _sharded(dims, args) -> bool:
    """The model or the optimizer state is split across ranks: checkpoints go through
    ichiban_comm.parallel.checkpoint (global shapes and offsets, reloadable at any tp x dp)."""
    return dims is not None and (dims.tp > 1 or args.zero)


def _open_checkpointer(args, dims=None, resume: bool = False):
    if not (args.ckpt_every or resume):
        return None
    if dims is not None and dims.pp > 1:
        raise SystemExit("error: --ckpt-every/--resume with --pp > 1 is not supported: "
                         "ichiban_comm.parallel.checkpoint saves and reshards tp x dp layouts")
    if args.ckpt_mode != "async":
        if _sharded(dims, args):
            raise SystemExit(f"error: --ckpt-mode {args.ckpt_mode} saves replicated layouts only "
                             f"(no --tp > 1 or --zero); use --ckpt-mode async")
        return _SyncCheckpointer(args.ckpt_dir, args.ckpt_mode, args.keep_last)
    from .checkpoint import AsyncCheckpointer

    kwargs = {}
    if args.memory_ckpt:
        from .topology import job_topology

        kwargs = {"memory": True, "topology": job_topology() if dims is not None else None}
    # A commit waits for every rank; bounded by the job's collective timeout (at least a minute,
    # so a slow but healthy save is not failed), a stuck peer cannot hold the exit of the others.
    return AsyncCheckpointer(args.ckpt_dir, keep_last=args.keep_last,
                             commit_timeout_s=max(60.0, args.comm_timeout), **kwargs)


class _SyncCheckpointer:
    """The baselines of benchmarks/goodput.py: the whole state written synchronously, as most
    training scripts do — torch.save by rank 0, or torch.distributed.checkpoint.save — in the
    AsyncCheckpointer calls the main job makes. A step directory is complete once its marker
    file exists (written last, renamed into place)."""

    def __init__(self, root, mode, keep_last):
        self.root, self.mode, self.keep_last = root, mode, keep_last
        self.last_load = None
        os.makedirs(root, exist_ok=True)

    def _rank(self):
        import torch.distributed as dist

        return dist.get_rank() if dist.is_initialized() else 0

    def steps(self):
        out = []
        for n in os.listdir(self.root):
            if n.startswith("step_") and os.path.exists(os.path.join(self.root, n, "complete")):
                out.append(int(n[5:]))
        return sorted(out)

    def reserve(self, *a, **k):
        return 0

    def save(self, step, state, rank_state=None):
        import torch.distributed as dist

        t0 = time.perf_counter()
        d = os.path.join(self.root, f"step_{step:09d}")
        os.makedirs(d, exist_ok=True)
        if self.mode == "torch":
            if self._rank() == 0:
                torch.save(state, os.path.join(d, "state.pt"))
        else:
            import torch.distributed.checkpoint as dcp

            dcp.save(state, checkpoint_id=os.path.join(d, "dcp"))
        torch.save(rank_state, os.path.join(d, f"rank{self._rank()}.pt"))
        if dist.is_initialized():
            dist.barrier()
        if self._rank() == 0:
            with open(os.path.join(d, "complete.tmp"), "w") as f:
                f.write(str(step))
            os.replace(os.path.join(d, "complete.tmp"), os.path.join(d, "complete"))
            import shutil

            for old in self.steps()[:-self.keep_last]:
                shutil.rmtree(os.path.join(self.root, f"step_{old:09d}"), ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        return _Done(step, time.perf_counter() - t0)

    def load(self, into):
        steps = self.steps()
        if not steps:
            from .checkpoint import CheckpointError

            raise CheckpointError(f"no committed checkpoint in {self.root}")
        step = steps[-1]
        d = os.path.join(self.root, f"step_{step:09d}")
        if self.mode == "torch":
            state = torch.load(os.path.join(d, "state.pt"), weights_only=False)
        else:
            import torch.distributed.checkpoint as dcp

            dcp.load(into, checkpoint_id=os.path.join(d, "dcp"))
            state = into
        self.last_load = {"step": step, "tiers": ["disk"]}
        self.loaded_step = step
        return state

    def load_rank_state(self):
        d = os.path.join(self.root, f"step_{self.loaded_step:09d}")
        return torch.load(os.path.join(d, f"rank{self._rank()}.pt"), weights_only=False)

    def close(self):
        pass


class _Done:
    def __init__(self, step, blocking_s):
        self.step, self.blocking_s = step, blocking_s

    def wait(self):
        return None


def _pipeline_step(pipe, dims, x, y, opt, zero):
    """One pipelined forward/backward; the loss (known on the last stage) reaches every stage
    and, without ZeRO, the stage's gradients are averaged over dp."""
    import torch.distributed as dist

    loss = pipe.step(x if dims.is_first_stage else None, y if dims.is_last_stage else None)
    t = loss.detach().reshape(1).clone() if loss is not None else torch.zeros(1)
    dist.all_reduce(t, group=dims.pp_group)  # only the last stage adds a non-zero loss
    if dims.dp > 1 and not zero:
        for p in pipe.module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=dims.dp_group)
                p.grad.div_(dims.dp)
    return t[0]


def _clip(module, opt, dims, args):
    if args.zero:
        return opt.clip_grad_norm_(args.grad_clip)
    if dims is not None and (dims.tp > 1 or dims.pp > 1):
        from .parallel.plans import clip_grad_norm_

        return clip_grad_norm_(module.parameters(), args.grad_clip, dims)
    return torch.nn.utils.clip_grad_norm_(module.parameters(), args.grad_clip)


def _sync_state(ckpt, core, opt):
    if ckpt.mode == "dcp":
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(core, opt)
        return {"model": msd, "optim": osd}
    return {"model": core.state_dict(), "optim": opt.state_dict()}


def _restore(ckpt, args, dims, core, opt, data):
    """Load the newest checkpoint every rank can read (memory tier first, then disk) into the
    model, optimizer, RNG and data loader. Returns (step to start at, where it came from);
    (0, None) when there is none."""
    from .checkpoint import CheckpointError

    try:
        if isinstance(ckpt, _SyncCheckpointer):
            if ckpt.mode == "dcp":
                from torch.distributed.checkpoint.state_dict import set_state_dict

                into = _sync_state(ckpt, core, opt)
                state = ckpt.load(into)
                set_state_dict(core, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            else:
                state = ckpt.load(None)
                core.load_state_dict(state["model"])
                opt.load_state_dict(state["optim"])
            extra = ckpt.load_rank_state()
        elif _sharded(dims, args):
            from .parallel import checkpoint as pckpt

            extra = pckpt.load(ckpt, core, opt, dims, step=None)
            extra["rng"] = ckpt.load_rank_state()["rng"]
        else:
            state = ckpt.load()
            core.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            extra = {"step": state["step"], "data": state["data"], "rng": ckpt.load_rank_state()["rng"]}
    except CheckpointError:
        if ckpt.steps():
            raise
        return 0, None
    torch.set_rng_state(extra["rng"])
    data.loader.load_state_dict(extra["data"])
    tiers = (ckpt.last_load or {}).get("tiers") or ["disk"]
    source = "disk" if "disk" in tiers else ("peer" if "peer" in tiers else "memory")
    return int(extra["step"]), source


def _inject_failure(args, rank: int, step: int, attempt: int) -> None:
    """--fail-at: record the failure in metrics.jsonl (one appended line), then SIGKILL or
    SIGSTOP this process."""
    import signal

    line = json.dumps({"event": "fail", "attempt": attempt, "step": step, "rank": rank,
                       "signal": args.fail_signal, "time": time.time()}) + "\n"
    try:
        fd = os.open(os.path.join(args.out_dir, "metrics.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, line.encode())
        os.close(fd)
    except OSError:
        pass
    print(f"ichiban-train: --fail-at {step}:{rank}: rank {rank} sends itself SIG"
          f"{args.fail_signal.upper()} at step {step} (attempt {attempt})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL if args.fail_signal == "kill" else signal.SIGSTOP)


def _param_digest(module) -> str:
    """sha256 of this rank's parameters (names, shapes and bytes), to compare runs bit for bit."""
    import hashlib

    h = hashlib.sha256()
    for name, p in module.named_parameters():
        t = p.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _comm_bytes(backend: str, world: int) -> dict:
    """Bytes every rank moved through this host's shared memory and between hosts (summed over
    the job's ranks): the "ichiban" backend's counters."""
    if world <= 1 or backend != "ichiban":
        return {}
    import torch.distributed as dist

    from ._native import _C

    t = torch.tensor([_C.backend.global_intra_host_bytes(), _C.backend.global_inter_host_bytes()],
                     dtype=torch.int64)
    dist.all_reduce(t)
    return {"intra_host_bytes": int(t[0]), "inter_host_bytes": int(t[1])}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from .report import main as report_main

        return report_main(argv[1:])
    if "--demo-failure" in argv:
        from .demo import main as demo_main

        return demo_main(argv)
    args = parse_args(argv)
    if args.nproc:
        return launch_local(args.nproc, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, dims, start_info = _init_distributed(args)
    attempt = start_info["attempt"]
    bad = [f"{s}:{r}" for s, r in args.fail_at if r >= world]
    if bad:
        raise SystemExit(f"error: --fail-at {', '.join(bad)}: there are {world} rank(s)")
    resume = args.resume or attempt > 1   # a torchrun restart resumes the run it restarts
    dp, dp_rank = (dims.dp, dims.dp_rank) if dims is not None else (1, 0)
    lead = rank == 0
    say = print if lead else (lambda *a, **k: None)
    os.makedirs(args.out_dir, exist_ok=True)
    if attempt > 1:
        say(f"ichiban-train: attempt {attempt} (a torchrun restart): resuming", flush=True)

    # each data-parallel replica reads its own slice of the global batch; tp and pp ranks of one
    # replica read the same one
    data = job_data(args.data, args.data_bytes, args.seq_len, args.batch_size, args.seed,
                    dp_rank, dp)
    model, opt, pipe = build(args, dims, data.vocab_size)
    core = model
    from .steptime import StepClock

    clock = StepClock(args.backend if world > 1 else "none")
    if dims is not None:
        say(dims.layout.describe(), flush=True)
        if core.tp_report is not None:
            say(core.tp_report, flush=True)
    if dp > 1 and not args.zero and pipe is None:
        model = torch.nn.parallel.DistributedDataParallel(core, process_group=dims.dp_group)
        model.register_comm_hook(None, clock.ddp_hook(dims.dp_group, dims.dp))
    say(f"ichiban-train: {core.full_params / 1e6:.2f}M parameters "
        f"({args.n_layer} layers, d_model {args.d_model}, {args.n_head} heads), "
        f"ops: {core.ops.name}; data: {data.describe()}; {args.steps} steps of "
        f"{dp}x{args.batch_size}x{args.seq_len} tokens; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads" + (f", {world} ranks on {args.backend}" if world > 1 else ""),
        flush=True)

    ckpt = _open_checkpointer(args, dims, resume)
    start, restore = 0, {"source": None, "step": None, "seconds": 0.0}
    if resume:
        t0 = time.perf_counter()
        start, source = _restore(ckpt, args, dims, core, opt, data)
        restore = {"source": source, "step": start if source else None,
                   "seconds": time.perf_counter() - t0}
        if source is None:
            say(f"resume: no complete checkpoint in {args.ckpt_dir}; starting from step 0")
        else:
            say(f"resumed from {source} ({args.ckpt_dir}) at step {start} in "
                f"{restore['seconds']:.2f} s" + (f", resharded to tp={dims.tp}, dp={dims.dp} as needed"
                                                 if _sharded(dims, args) else ""), flush=True)
    if start >= args.steps:
        say(f"nothing to do: the checkpoint is at step {start} and --steps is {args.steps}")
        if ckpt is not None:
            ckpt.close()
        return 0

    metrics = None
    if lead:
        path = os.path.join(args.out_dir, "metrics.jsonl")
        if not resume:
            open(path, "w").close()
        # O_APPEND: lines other ranks append (an injected failure) are never overwritten
        metrics = open(path, "a")
        metrics.write(json.dumps({"event": "start", "attempt": attempt, "time": start_info["time"],
                                  "launch_time": start_info["launch_time"], "init_s": start_info["init_s"],
                                  "start_step": start, "restore": restore, "world_size": world,
                                  "tp": args.tp, "pp": args.pp, "dp": dp, "backend": args.backend
                                  if world > 1 else None}) + "\n")
        metrics.flush()
    fail_step = None
    if len(args.fail_at) >= attempt and args.fail_at[attempt - 1][1] == rank:
        fail_step = args.fail_at[attempt - 1][0]
    tokens_per_step = dp * args.batch_size * args.seq_len
    losses: list[float] = []
    saves: list = []
    totals = dict.fromkeys(("step_s", "compute_s", "comm_s", "ckpt_s", "data_s"), 0.0)
    window_t, window_tokens = time.perf_counter(), 0
    train_t0 = time.perf_counter()
    end = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    clock.begin()
    for step in range(start, end):
        if step == fail_step:
            _inject_failure(args, rank, step, attempt)
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        with clock.data():
            x, y = next(data.loader)  # this replica's slice of the global batch
        opt.zero_grad(set_to_none=True)
        if pipe is not None:
            loss = _pipeline_step(pipe, dims, x, y, opt, args.zero)
        else:
            loss = model(x, y)
            loss.backward()
        grad_norm = _clip(core if pipe is None else pipe.module, opt, dims, args)
        opt.step()
        if ckpt is not None and args.ckpt_every and step == start:
            # The optimizer's moments exist now: pay for the checkpoint staging pool here, not
            # at the first save.
            with clock.checkpoint():
                ckpt.reserve({"model": core.state_dict(), "optim": opt.state_dict(), "step": step + 1},
                             rank_state={"rng": torch.get_rng_state()})
        window_tokens += tokens_per_step

        loss_f = loss.item()  # one sync per step: the loss is logged every step
        if not math.isfinite(loss_f):
            print(f"error: loss became {loss_f} at step {step} on rank {rank}; lower --lr "
                  f"(now {args.lr})", file=sys.stderr)
            return 1
        losses.append(loss_f)
        if ckpt is not None and args.ckpt_every and (step + 1) % args.ckpt_every == 0:
            with clock.checkpoint():
                rank_state = {"rng": torch.get_rng_state()}
                if isinstance(ckpt, _SyncCheckpointer):
                    state = _sync_state(ckpt, core, opt)
                    rank_state.update(step=step + 1, data=data.loader.state_dict())
                elif _sharded(dims, args):
                    from .parallel import checkpoint as pckpt

                    state = pckpt.sharded_state(core, opt, dims)
                    state["extra"] = {"step": step + 1, "data": data.loader.state_dict()}
                else:
                    state = {"model": core.state_dict(), "optim": opt.state_dict(), "step": step + 1,
                             "data": data.loader.state_dict()}
                saves.append(ckpt.save(step + 1, state, rank_state=rank_state))
        split = clock.end()
        for k in totals:
            totals[k] += split[k]
        if metrics is not None:
            metrics.write(json.dumps({"step": step, "attempt": attempt, "time": time.time(),
                                      "loss": loss_f, "lr": lr, "grad_norm": float(grad_norm),
                                      **split, "tokens": tokens_per_step}) + "\n")
            metrics.flush()   # a killed run keeps every finished step's line
        if (step + 1) % args.log_every == 0 or step == start or step + 1 == end:
            dt = time.perf_counter() - window_t
            say(f"step {step + 1:>6}/{args.steps}  loss {loss_f:.4f}  lr {lr:.2e}  "
                f"grad {float(grad_norm):.2f}  {window_tokens / dt:,.0f} tok/s", flush=True)
            window_t, window_tokens = time.perf_counter(), 0
    t_close = time.perf_counter()
    if ckpt is not None:
        ckpt.close()  # waits for the last save to commit; raises if any failed
    close_s = time.perf_counter() - t_close

    elapsed = time.perf_counter() - train_t0
    k = min(10, len(losses))
    module = core if pipe is None else pipe.module
    digests = [_param_digest(module)]
    if world > 1:
        import torch.distributed as dist

        digests = [None] * world
        dist.all_gather_object(digests, _param_digest(module))
    steps_run = max(1, len(losses))
    summary = {
        "steps": args.steps,
        "start_step": start,
        "attempt": attempt,
        "restored_from": restore,
        "first_loss": losses[0],
        "last_loss": sum(losses[-k:]) / k,
        "val_loss": evaluate(core, data, args.eval_batches) if pipe is None else None,
        "tokens_per_s": len(losses) * tokens_per_step / elapsed,
        "train_seconds": elapsed,
        "time_split_s": {k_.replace("_s", ""): v for k_, v in totals.items()},
        "time_split_pct": {k_.replace("_s", ""): 100 * v / max(totals["step_s"], 1e-9)
                           for k_, v in totals.items() if k_ != "step_s"},
        "final_checkpoint_wait_s": close_s,
        "params": core.full_params,
        "param_digests": digests,
        "ops": core.ops.name,
        "world_size": world,
        "backend": args.backend if world > 1 else None,
        "tp": args.tp, "pp": args.pp, "dp": dp, "zero": args.zero,
        **_comm_bytes(args.backend, world),
    }
    if saves:
        summary["checkpoints"] = len(saves)
        summary["ckpt_blocking_ms_median"] = 1e3 * sorted(h.blocking_s for h in saves)[len(saves) // 2]
    if lead:
        with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        metrics.write(json.dumps({"event": "end", "attempt": attempt, "time": time.time(),
                                  "steps": args.steps}) + "\n")
        metrics.close()
    split_pct = summary["time_split_pct"]
    ckpt_note = (f"; {len(saves)} checkpoint(s) in {args.ckpt_dir}, median pause "
                 f"{summary['ckpt_blocking_ms_median']:.1f} ms" if saves else "")
    say(f"step time ({steps_run} steps, {totals['step_s']:.1f} s): compute {split_pct['compute']:.1f} %, "
        f"communication {split_pct['comm']:.1f} %, checkpoint {split_pct['ckpt']:.1f} %, data "
        f"{split_pct['data']:.1f} %" + (f"; bytes through shared memory {summary['intra_host_bytes']:,}, "
                                        f"between hosts {summary['inter_host_bytes']:,}"
                                        if "intra_host_bytes" in summary else "")
        + (f"; attempt {attempt}, resumed at step {start} from {restore['source']}"
           if restore["source"] else ""), flush=True)
    say(f"done: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
        f"(mean of last {k} steps), validation "
        f"{'n/a (pipeline)' if summary['val_loss'] is None else format(summary['val_loss'], '.3f')}; "
        f"{summary['tokens_per_s']:,.0f} tok/s over {elapsed:.1f} s{ckpt_note}; "
        f"metrics in {args.out_dir}/", flush=True)
    if lead and summary["last_loss"] >= summary["first_loss"] and len(losses) > 1:
        print("warning: the loss did not fall; try more --steps or a different --lr",
              file=sys.stderr)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()   # rank 0 holds this attempt's store: nobody leaves while others use it
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
