"""Where the time of a run went: step-time split, restarts, lost work, goodput.

    ichiban-train report runs/train                 # table on stdout, runs/train/report.png
    ichiban-train report runs/train --json          # the same numbers as JSON
    ichiban-train report runs/train --png out.png   # the figure elsewhere
    ichiban-train report runs/train --no-png        # table only (no matplotlib needed)
    python -m ichiban_comm.report runs/train

Reads ``RUN_DIR/metrics.jsonl``, which every attempt of a run appends to (a
torchrun restart is a new attempt): a ``start`` record per attempt, one record
per step with its wall time split into compute, communication wait, checkpoint
stall and data wait (timers around the real waits on rank 0's training thread),
``fail`` records for injected failures and an ``end`` record when the run
finished. :func:`analyse` turns those records into the numbers; the table and
the PNG are both drawn from its result. docs/report.md defines every number.
"""

from .analysis import analyse
from .cli import main, parse_args
from .records import PARTS, read_metrics
from .table import format_table

__all__ = ["analyse", "format_table", "main", "parse_args", "read_metrics", "PARTS"]
