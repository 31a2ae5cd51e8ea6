"""``ichiban-train report RUN_DIR``: the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __doc__ as _DOC
from .analysis import analyse
from .records import METRICS, read_metrics
from .table import format_table


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ichiban-train report", description=_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's --out-dir, holding metrics.jsonl")
    fig = p.add_mutually_exclusive_group()
    fig.add_argument("--png", metavar="PATH", default=None, help="where to write the figure "
                     "(default RUN_DIR/report.png; needs matplotlib)")
    fig.add_argument("--no-png", action="store_true", help="write no figure")
    p.add_argument("--json", action="store_true", help="print the computed numbers as JSON instead of the table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Exit codes: 0 the table (and the figure) written; 2 no RUN_DIR, or no readable
    metrics.jsonl in it; 1 the figure could not be written (a missing matplotlib is
    only a warning, exit 0, unless --png asked for the figure explicitly)."""
    args = parse_args(argv)
    path = os.path.join(args.run_dir, METRICS)
    if not os.path.isdir(args.run_dir):
        print(f"ichiban-train report: RUN_DIR {args.run_dir!r} is not a directory "
              f"(expected a run's --out-dir holding {METRICS})", file=sys.stderr)
        return 2
    if not os.path.isfile(path):
        print(f"ichiban-train report: no {METRICS} in {args.run_dir!r} (looked for {path}); "
              "is it the --out-dir of an ichiban-train run?", file=sys.stderr)
        return 2
    try:
        records, read_notes = read_metrics(path)
    except OSError as e:
        print(f"ichiban-train report: cannot read {path}: {e.strerror or e}", file=sys.stderr)
        return 2
    res = analyse(records)
    res["notes"][:0] = read_notes
    res["run_dir"], res["records"] = args.run_dir, len(records)
    if args.json:  # the per-step series is metrics.jsonl again: left out
        _say(json.dumps({k: v for k, v in res.items() if k != "series"}, indent=2))
    else:
        _say(format_table(res, args.run_dir))
    if args.no_png:
        return 0
    png = args.png or os.path.join(args.run_dir, "report.png")
    try:
        from .plot import write_png
    except ImportError as e:  # matplotlib missing
        package = (e.name or "matplotlib").split(".")[0]
        print(f"ichiban-train report: figure not written: {package} is not installed "
              "(pip install matplotlib, or pip install 'ichiban_comm[report]')", file=sys.stderr)
        return 1 if args.png else 0
    try:
        write_png(res, png)
    except Exception as e:  # the table is out already; a figure that fails says why, no traceback
        print(f"ichiban-train report: figure not written to {png!r}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    if args.json:
        print(f"figure: {png}", file=sys.stderr)
    else:
        _say(f"figure: {png}")
    return 0


def _say(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `... | head`: the reader left, which is no error of the report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
