"""Goodput of the main job under failures: one run per checkpointing mode, a rank killed every K steps.

Each mode runs the same job under plain `torchrun --max-restarts` with `--fail-at` injecting a
SIGKILL every --fail-every steps (the k-th failure fires in attempt k), and is read back with
`ichiban_comm.report.analyse` (the numbers `ichiban-train report` prints):

    async-memory   AsyncCheckpointer + the memory tier (restores from the keepers)
    async-disk     AsyncCheckpointer, disk only
    torch          torch.save of the whole state on rank 0, synchronous (what most scripts do)
    dcp            torch.distributed.checkpoint.save, synchronous

Reported per mode: goodput (productive step time / wall time from the first launch to the end,
restarts included), steps lost per failure, the restart split (process start, rendezvous and
initialisation, restore, first step), the median checkpoint stall per save and the time split.

    python benchmarks/goodput.py                      # defaults: 120 steps, failures at 40 and 80
    python benchmarks/goodput.py --json out.json --md out.md
    python benchmarks/goodput.py --steps 30 --fail-every 12 --d-model 64 --n-layer 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from ichiban_comm.elastic import free_port  # noqa: E402
from ichiban_comm.report import analyse, read_metrics  # noqa: E402

MODES = {
    "async-memory": ["--ckpt-mode", "async", "--memory-ckpt"],
    "async-disk": ["--ckpt-mode", "async"],
    "torch": ["--ckpt-mode", "torch"],
    "dcp": ["--ckpt-mode", "dcp"],
}


def run_mode(mode, args, workdir) -> dict:
    out = os.path.join(workdir, mode)
    # failures half-way between two checkpoints: a failure right at a checkpoint step would
    # flatter synchronous saves (committed before the step) and penalise async ones (committing)
    fails = []
    for k in range(1, args.steps // args.fail_every + 1):
        step = k * args.fail_every + args.ckpt_every // 2
        if step < args.steps:
            fails += ["--fail-at", f"{step}:{(k % args.nproc)}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
           str(args.nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           "--max-restarts", str(len(fails) // 2 + 1), "--monitor-interval", "0.5",
           "-m", "ichiban_comm.train", "--out-dir", out, "--steps", str(args.steps),
           "--ckpt-every", str(args.ckpt_every), "--keep-last", "2", "--dp", str(args.nproc),
           "--d-model", str(args.d_model), "--n-layer", str(args.n_layer), "--n-head", str(args.n_head),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--log-every", "1000", "--eval-batches", "1", "--threads", "1", "--comm-timeout", "60",
           ] + MODES[mode] + fails
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{mode}: torchrun exited with {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    records, _notes = read_metrics(os.path.join(out, "metrics.jsonl"))
    a = analyse(records)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    restarts = a["restarts"]

    def med(key):
        vals = [x[key] for x in restarts if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    ckpt_steps = [s["parts"]["ckpt"] for s in a["series"] if s["parts"]["ckpt"] > 0 and s["counted"]]
    return {
        "mode": mode, "torchrun_wall_s": wall, "goodput": a["goodput"], "failures": len(restarts),
        "lost_steps_per_failure": a["lost_steps_per_failure"],
        "restart_s": {"process_start": med("process_start_s"), "rendezvous_init": med("init_s"),
                      "restore": med("restore_s"), "first_step": med("first_step_s")},
        "restore_sources": [x.get("restore_source") for x in restarts],
        "ckpt_stall_median_s": statistics.median(ckpt_steps) if ckpt_steps else 0.0,
        "step_median_s": a["split"]["step"]["p50_s"],
        "split_pct": {k: a["split"][k]["pct"] for k in ("compute", "comm", "ckpt", "data")},
        "wall": a["wall"], "final_loss": summary["last_loss"], "param_digests": summary["param_digests"],
    }


def markdown(results, args) -> str:
    lines = [f"# Goodput under failures ({platform.node()}, {os.cpu_count()} cores)", "",
             f"`python benchmarks/goodput.py --steps {args.steps} --fail-every {args.fail_every} "
             f"--ckpt-every {args.ckpt_every} --nproc {args.nproc} --d-model {args.d_model} "
             f"--n-layer {args.n_layer}`: {args.nproc} ranks (dp), a rank SIGKILLed every "
             f"{args.fail_every} steps (half-way between two checkpoints), checkpoints every {args.ckpt_every} steps, plain torchrun "
             f"restarts. Medians over the failures of one run per mode.", "",
             "| mode | goodput | lost steps / failure | restart: process start | rendezvous + init | "
             "restore (from) | first step | ckpt stall / save | step | ckpt share |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        rs = r["restart_s"]

        def f(v, unit="s"):
            return "n/a" if v is None else f"{v:.2f} {unit}"

        src = ",".join(sorted({s or "none" for s in r["restore_sources"]}))
        lines.append(f"| {r['mode']} | {100 * r['goodput']:.1f} % | {r['lost_steps_per_failure']} | "
                     f"{f(rs['process_start'])} | {f(rs['rendezvous_init'])} | "
                     f"{f(rs['restore'])} ({src}) | {f(rs['first_step'])} | "
                     f"{1e3 * r['ckpt_stall_median_s']:.1f} ms | {1e3 * r['step_median_s']:.1f} ms | "
                     f"{r['split_pct']['ckpt']:.1f} % |")
    same = len({json.dumps(r["param_digests"]) for r in results}) == 1
    lines += ["", f"Final parameters identical across modes (sha256 per rank): {'yes' if same else 'NO'}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--fail-every", type=int, default=40)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--md", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"--modes: unknown {unknown}; known: {list(MODES)}")
    if args.fail_every < 1 or args.fail_every >= args.steps:
        p.error(f"--fail-every must be in [1, --steps), got {args.fail_every}")
    results = []
    with tempfile.TemporaryDirectory(prefix="goodput-") as work:
        for m in modes:
            print(f"goodput: {m} ...", file=sys.stderr, flush=True)
            results.append(run_mode(m, args, work))
            r = results[-1]
            print(f"  goodput {100 * r['goodput']:.1f} %, lost steps {r['lost_steps_per_failure']}, "
                  f"restore {r['restart_s']['restore']} s from {r['restore_sources']}", file=sys.stderr)
    md = markdown(results, args)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "load_avg": os.getloadavg()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
