"""python -m ichiban_comm.checkpoint inspect|verify|export PATH

PATH is a checkpoint root (the directory given to AsyncCheckpointer) or one
step directory inside it.

    inspect PATH [--step N] [--json]     list steps, tensors, shards and plain values
    verify  PATH [--step N | --all]      read every chunk and check its crc32c (exit 1 on failure)
    export  PATH OUT [--step N] [--format torch|safetensors]
                                         write the state as one torch.save file or a safetensors file
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

from . import _layout as layout
from ._loader import load_step
from ._tree import flatten, leaf_paths, unflatten
from .errors import CheckpointError


def _resolve(path: str, step: int | None) -> tuple[str, list[int]]:
    path = os.path.abspath(path)
    m = re.match(r"^step_(\d+)$", os.path.basename(path))
    if m and os.path.isfile(os.path.join(path, layout.MANIFEST)):
        root, steps = os.path.dirname(path), [int(m.group(1))]
    else:
        root, steps = path, layout.committed_steps(path)
    if not os.path.isdir(root):
        raise CheckpointError(f"{path} is not a directory")
    if step is not None:
        if step not in layout.committed_steps(root):
            raise CheckpointError(f"no committed step {step} in {root}")
        steps = [step]
    if not steps:
        raise CheckpointError(f"no committed checkpoint in {path}")
    return root, steps


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _describe(root: str, step: int) -> dict:
    m = layout.read_manifest(root, step)
    tensors = []
    for e in m["tensors"]:
        shards = e.get("shards", [])
        chunks = [c for s in shards for c in s.get("chunks", [])]
        row = {"name": e["name"], "dtype": e["dtype"], "shape": e["shape"],
               "shards": len(shards), "stored_bytes": sum(c[2] for c in chunks),
               "raw_bytes": sum(c[3] for c in chunks)}
        if "view" in e:
            row["view_of_storage"] = e["view"]["storage"]
        tensors.append(row)
    storages = [{"nbytes": s["nbytes"], "stored_bytes": sum(c[2] for c in s["chunks"])} for s in m["storages"]]
    plain = unflatten(m["tree"], [f"<tensor {p}>" for _, p in sorted(leaf_paths(m["tree"]).items())])
    return {"step": step, "world_size": m["world_size"], "compression": m["compression"],
            "created_unix": m["created_unix"], "tensors": tensors, "storages": storages,
            "state": _jsonable(plain)}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return repr(x)


def cmd_inspect(args) -> int:
    root, steps = _resolve(args.path, args.step)
    if args.step is None and len(steps) > 1:
        steps = steps[-1:]
        others = layout.committed_steps(root)[:-1]
    else:
        others = []
    info = _describe(root, steps[0])
    if args.json:
        print(json.dumps(dict(info, other_steps=others), indent=2))
        return 0
    print(f"{root}: step {info['step']} (world size {info['world_size']}, compression "
          f"{info['compression'] or 'none'}); older committed steps: {others or 'none'}")
    raw = sum(t["raw_bytes"] for t in info["tensors"]) + sum(s["nbytes"] for s in info["storages"])
    stored = sum(t["stored_bytes"] for t in info["tensors"]) + sum(s["stored_bytes"] for s in info["storages"])
    print(f"{len(info['tensors'])} tensors, {_fmt_bytes(raw)} of data, {_fmt_bytes(stored)} on disk")
    w = max([len(t["name"]) for t in info["tensors"]] + [4])
    print(f"  {'name':<{w}}  {'dtype':<9} {'shape':<18} shards  stored")
    for t in info["tensors"]:
        shards = f"view of storage {t['view_of_storage']}" if "view_of_storage" in t else str(t["shards"])
        print(f"  {t['name']:<{w}}  {t['dtype']:<9} {str(tuple(t['shape'])):<18} {shards:<6}  "
              f"{_fmt_bytes(t['stored_bytes'])}")
    print("state:", json.dumps(info["state"])[:2000])
    return 0


def cmd_verify(args) -> int:
    root, steps = _resolve(args.path, args.step)
    if not args.all and args.step is None:
        steps = steps[-1:]
    bad = 0
    for s in steps:
        try:
            load_step(root, s)
            print(f"step {s}: OK")
        except (CheckpointError, OSError, ValueError) as e:
            bad += 1
            print(f"step {s}: FAILED: {e}")
    return 1 if bad else 0


def cmd_export(args) -> int:
    root, steps = _resolve(args.path, args.step)
    step = steps[-1]
    state = load_step(root, step)
    fmt = args.format or ("safetensors" if args.out.endswith(".safetensors") else "torch")
    if fmt == "torch":
        import torch

        torch.save(state, args.out)
    else:
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise CheckpointError("--format safetensors needs the safetensors package "
                                  "(pip install safetensors)") from None
        tree, leaves = flatten(state)
        tensors = {path: t.contiguous().clone() for path, t in leaves}  # safetensors refuses shared storage
        save_file(tensors, args.out, metadata={"ichiban_step": str(step), "ichiban_tree": json.dumps(tree)})
    print(f"exported step {step} of {root} to {args.out} ({fmt})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ichiban_comm.checkpoint",
                                description="Inspect, verify and export ichiban_comm checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("inspect", help="list a checkpoint's contents")
    pi.add_argument("path")
    pi.add_argument("--step", type=int)
    pi.add_argument("--json", action="store_true")
    pv = sub.add_parser("verify", help="check every chunk's checksum")
    pv.add_argument("path")
    pv.add_argument("--step", type=int)
    pv.add_argument("--all", action="store_true", help="every committed step, not just the newest")
    pe = sub.add_parser("export", help="write one torch.save / safetensors file")
    pe.add_argument("path")
    pe.add_argument("out")
    pe.add_argument("--step", type=int)
    pe.add_argument("--format", choices=("torch", "safetensors"))
    args = p.parse_args(argv)
    try:
        return {"inspect": cmd_inspect, "verify": cmd_verify, "export": cmd_export}[args.cmd](args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
