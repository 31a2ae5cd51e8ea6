"""`python -m ichiban_comm.parallel --tp 2 --dp 2 [--pp 1] [--topology FILE]`: which rank goes
where, with hosts, as ``init_parallel`` would place them (no processes are started)."""

from __future__ import annotations

import argparse
import json
import sys

from .. import topology as _topology
from .dims import ParallelDimsError, plan_layout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ichiban_comm.parallel", description=__doc__)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--dp", type=int, default=-1, help="data-parallel size (-1: the rest)")
    p.add_argument("--topology", default=None,
                   help=f"declared topology file (default: ${_topology.ENV_TOPOLOGY}, else one "
                        "host with --world-size ranks)")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks on one host when no topology is given (default: tp x pp x dp)")
    p.add_argument("--json", action="store_true", help="print the grid as JSON")
    args = p.parse_args(argv)
    world = args.world_size
    if world is None and args.topology is None:
        world = args.tp * args.pp * max(args.dp, 1)
    try:
        layout = plan_layout(args.tp, args.pp, args.dp, args.topology, world_size=world)
    except (ParallelDimsError, _topology.TopologyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        ranks = []
        for r in range(layout.world_size):
            d, pp, t = layout.coords(r)
            ranks.append({"rank": r, "host": layout.topology.host_of(r), "dp": d, "pp": pp,
                          "tp": t})
        print(json.dumps({"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "ranks": ranks,
                          "tp_groups": layout.tp_groups(), "pp_groups": layout.pp_groups(),
                          "dp_groups": layout.dp_groups()}, indent=2))
    else:
        print(layout.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
