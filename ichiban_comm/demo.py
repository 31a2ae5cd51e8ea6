"""``ichiban-train --demo-failure``: a short run on two declared hosts survives a killed rank.

What it does, in the commands a user would type (printed as it goes):

1. writes a two-host topology (ranks 0-1 on h0, 2-3 on h1) to OUT_DIR/topology.json;
2. starts two torchrun agents (one per "host") with the c10d rendezvous and ``--max-restarts 3``,
   running the main job at tp=2 x dp=2 with checkpoints every 10 steps on disk and in memory;
   rank 3 SIGKILLs itself at step 35 (``--fail-at 35:3``);
3. torchrun restarts the group; the ranks agree a fresh store, reload the newest snapshot from the
   keepers' memory with the loader's state, and finish;
4. ``ichiban-train report OUT_DIR``: the step-time split, goodput, the restart and what it cost.

Other main-job arguments given with --demo-failure are passed on (e.g. --steps, --out-dir).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

from .elastic import free_port


def _value(argv, flag, default):
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


def main(argv) -> int:
    argv = [a for a in argv if a != "--demo-failure"]
    out = _value(argv, "--out-dir", "runs/demo-failure")
    argv = [a for i, a in enumerate(argv) if a != "--out-dir" and (i == 0 or argv[i - 1] != "--out-dir")
            and not a.startswith("--out-dir=")]
    os.makedirs(out, exist_ok=True)
    topo = os.path.join(out, "topology.json")
    with open(topo, "w") as f:
        json.dump({"hosts": [{"name": "h0"}, {"name": "h1"}],
                   "ranks": [{"rank": r, "host": f"h{r // 2}", "local_rank": r % 2} for r in range(4)]},
                  f, indent=1)
    job = ["--tp", "2", "--dp", "2", "--steps", "60", "--ckpt-every", "10", "--memory-ckpt",
           "--fail-at", "35:3", "--comm-timeout", "60", "--log-every", "10", "--threads", "1"]
    job += argv   # the caller's arguments come last and win
    port = free_port()
    env = dict(os.environ, ICHIBAN_TOPOLOGY=topo, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    agents = []
    print(f"ichiban-train --demo-failure: two hosts declared in {topo}; one torchrun agent per host:",
          flush=True)
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "3",
               "--monitor-interval", "0.5", "-m", "ichiban_comm.train", "--out-dir", out] + job
        print("  ICHIBAN_TOPOLOGY=" + topo + " " + shlex.join(["torchrun"] + cmd[3:]), flush=True)
        # the second agent's output is kept in a file: one readable stream on the terminal
        log = None if node == 0 else open(os.path.join(out, "agent1.log"), "w")
        agents.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None),
                       log))
    rc = 0
    try:
        for p, log in agents:
            rc = rc or p.wait()
            if log is not None:
                log.close()
    except KeyboardInterrupt:
        for p, _ in agents:
            p.terminate()
        return 130
    if rc != 0:
        print(f"ichiban-train --demo-failure: torchrun exited with {rc} (second agent's log: "
              f"{out}/agent1.log)", file=sys.stderr)
        return rc
    print(f"\nichiban-train report {out}", flush=True)
    from .report import main as report_main

    return report_main([out])
