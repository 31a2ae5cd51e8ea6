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

from __future__ import annotations

import argparse
import json
import math
import os
import sys

PARTS = ("compute", "comm", "ckpt", "data")
PART_LABELS = {"compute": "compute", "comm": "comm wait", "ckpt": "ckpt stall", "data": "data wait"}
METRICS = "metrics.jsonl"


# ---------------------------------------------------------------------------
# Reading metrics.jsonl
# ---------------------------------------------------------------------------


def read_metrics(path: str) -> tuple[list[dict], list[str]]:
    """The records of a metrics file, and notes on lines that could not be read.

    A writer killed mid-line leaves a torn record; the next attempt then appends
    its first record to that same line. Such a line keeps the record appended
    after the tear (the first ``{`` from which the rest parses), and the torn part
    is skipped with a note. Never raises on content, only on I/O.
    """
    records, notes = [], []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    for i, raw in enumerate(lines):
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            continue
        rec = _parse(text)
        if rec is not None:
            records.append(rec)
            continue
        where = "last line" if i == last else f"line {i + 1}"
        tail, torn = _recover_tail(text)
        if tail is not None:
            records.append(tail)
            notes.append(f"{where}: a torn record ({torn} bytes, "
                         "a writer killed mid-line) skipped; the record appended after it kept")
        else:
            notes.append(f"{where}: unreadable record ({len(raw)} bytes"
                         + (", a writer killed mid-line" if i == last else "") + ") skipped")
    return records, notes


def _parse(text: str) -> dict | None:
    try:
        rec = json.loads(text)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _recover_tail(text: str) -> tuple[dict | None, int]:
    """The record that begins after a torn one on the same line, and the torn length."""
    start = text.find("{", 1)
    while start != -1:
        rec = _parse(text[start:])
        if rec is not None:
            return rec, start
        start = text.find("{", start + 1)
    return None, len(text)


# ---------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int(x) -> int | None:
    return x if _is_int(x) else None


def _str(x) -> str | None:
    return x if isinstance(x, str) else None


def _group_attempts(records: list[dict], notes: list[str]) -> list[dict]:
    """Records by attempt, in file order, numbered 1, 2, ... as they appear.

    Every ``start`` record begins an attempt; other records join the attempt of
    their ``attempt`` number (the one whose start came last, should a later launch
    with ``--resume`` number its attempts from 1 again). Records without an
    ``attempt`` key (old runs) join the current attempt, unless their step number
    does not increase: then a restart began the next one.
    """
    attempts: list[dict] = []
    by_label: dict[int, dict] = {}
    cur = None
    inferred = renumbered = False

    def new(label):
        att = {"label": label, "start": None, "steps": [], "fail": None, "end": None}
        attempts.append(att)
        if label is not None:
            by_label[label] = att
        return att

    for rec in records:
        event = rec.get("event")
        label = rec.get("attempt") if _is_int(rec.get("attempt")) else None
        is_step = event is None and _is_int(rec.get("step"))
        if event == "start":
            renumbered = renumbered or (label is not None and label in by_label)
            cur = new(label)
            cur["start"] = rec
            continue
        if event not in ("fail", "end") and not is_step:
            continue  # unknown events and records without a step: not ours to read
        if label is not None:
            att = by_label.get(label) or new(label)
        elif cur is None:
            att = new(None)
        elif is_step and cur["steps"] and rec["step"] <= cur["steps"][-1]["step"] and cur["label"] is None:
            inferred = True
            att = new(None)
        else:
            att = cur
        cur = att
        if is_step:
            att["steps"].append(rec)
        else:
            att[event] = rec
    for n, att in enumerate(attempts, 1):
        att["attempt"] = n
        renumbered = renumbered or (att["label"] is not None and att["label"] != n)
    if inferred:
        notes.append("records carry no attempt number: attempts inferred from step numbers "
                     "that go back (a restart)")
    if renumbered:
        notes.append("the attempt numbers in the file start over or skip (a new launch with "
                     "--resume, or a lost start record): attempts numbered here in file order")
    return attempts


def _step_parts(rec: dict) -> dict | None:
    """compute/comm/ckpt/data/step seconds of one step record; None without step_s.
    A record without the split (old runs) is all compute."""
    step_s = _num(rec.get("step_s"))
    if step_s is None:
        return None
    parts = {p: _num(rec.get(f"{p}_s")) for p in PARTS}
    if all(parts[p] is None for p in PARTS):
        out = {"compute": step_s, "comm": 0.0, "ckpt": 0.0, "data": 0.0, "split": False}
    else:
        out = {p: parts[p] or 0.0 for p in PARTS}
        if parts["compute"] is None:
            out["compute"] = step_s - out["comm"] - out["ckpt"] - out["data"]
        out["split"] = True
    out["step"] = step_s
    if not all(math.isfinite(out[p]) for p in PARTS):
        return None  # values that overflow: as good as none
    return out


def analyse(records: list[dict]) -> dict:
    """Every number of the report, from the records of one run's metrics.jsonl.

    Per attempt: steps run, steps lost (steps at or beyond the step a later
    attempt resumed at, the next one's as a rule: work done again) and their
    time. Per restart: failure time (the ``fail`` record, else the failed
    attempt's last step), process start (launch − failure), rendezvous/init,
    restore (seconds, tier, step), first step, and the rest. The productive split
    counts each step number once, from the last attempt that ran it and kept it.
    Goodput = productive step time / wall time from the first attempt's launch to
    the ``end`` record (else the last record). Pure: reads nothing, prints nothing.
    """
    notes: list[str] = []
    attempts = _group_attempts(records, notes)
    out: dict = {"finished": False, "attempts": [], "restarts": [], "steps": 0,
                 "restart_count": max(0, len(attempts) - 1), "notes": notes}
    if not attempts:
        notes.append("no step, start or end records")
        out.update(split=None, wall=None, goodput=None, tokens_per_s=None, tokens_per_step_s=None,
                   lost_steps_per_failure=[], lost_steps=0, lost_s=None, productive_s=None,
                   tokens=None, series=[], t0=None, t_end=None)
        return out

    first_start = attempts[0]["start"] or {}
    for key in ("world_size", "tp", "pp", "dp", "backend"):
        out[key] = _str(first_start.get(key)) if key == "backend" else _int(first_start.get(key))

    # ---- where each attempt resumed; a step record is lost (work done again) when a
    # later attempt resumed at or before its step; the others count, each step number
    # once, from the last attempt that ran it
    resume = []
    for att in attempts:
        s0 = (att["start"] or {}).get("start_step")
        resume.append(s0 if _is_int(s0) else (att["steps"][0]["step"] if att["steps"] else None))
    lost_from = []
    for k in range(len(attempts)):
        later = [r for r in resume[k + 1:] if r is not None]
        lost_from.append(min(later) if later else None)

    def is_lost(k, rec):
        return lost_from[k] is not None and rec["step"] >= lost_from[k]

    counted: dict[int, dict] = {}
    for k, att in enumerate(attempts):
        for rec in att["steps"]:
            if not is_lost(k, rec):
                counted[rec["step"]] = rec
    out["steps"] = len(counted)
    out["last_step"] = max(counted) if counted else None

    all_steps = [rec for att in attempts for rec in att["steps"]]
    timed = bool(all_steps) and all(_step_parts(r) is not None for r in all_steps)
    if all_steps and not timed:
        notes.append("step records carry no step_s: no time split, goodput or tokens/s "
                     "(a run written before step timing was recorded)")
    elif all_steps and any(not _step_parts(r)["split"] for r in all_steps):
        notes.append("step records without compute/comm/ckpt/data seconds (an older run): "
                     "their whole step time is counted as compute")

    # ---- per attempt
    def step_begin(rec):
        t, s = _num(rec.get("time")), _num(rec.get("step_s"))
        return None if t is None or s is None else t - s

    for k, att in enumerate(attempts):
        steps = att["steps"]
        start = att["start"] or {}
        lost = [r for r in steps if is_lost(k, r)]
        row = {"attempt": att["attempt"], "start_step": resume[k], "steps_run": len(steps),
               "first_step": steps[0]["step"] if steps else None,
               "last_step": steps[-1]["step"] if steps else None,
               "launch_time": _num(start.get("launch_time")), "ready_time": _num(start.get("time")),
               "init_s": _num(start.get("init_s")),
               "lost_steps": len(lost), "lost_from": lost_from[k],
               "lost_s": sum(_step_parts(r)["step"] for r in lost) if timed else None}
        if row["launch_time"] is None and row["ready_time"] is not None and row["init_s"] is not None:
            row["launch_time"] = row["ready_time"] - row["init_s"]  # the same instant, by definition
        if att["end"] is not None:
            row["ended"], row["end_time"] = "end", _num(att["end"].get("time"))
        elif k + 1 < len(attempts):
            row["ended"] = "failure"
            fail = att["fail"]
            if fail is not None and _num(fail.get("time")) is not None:
                row["fail_time"], row["fail_source"] = _num(fail["time"]), "fail record"
                row["fail_step"], row["fail_rank"] = _int(fail.get("step")), _int(fail.get("rank"))
            else:
                last_t = _num(steps[-1].get("time")) if steps else None
                source = "last step record"
                if last_t is None:  # died before its first step: its last sign of life
                    last_t = row["ready_time"] if row["ready_time"] is not None else row["launch_time"]
                    source = "start record"
                row["fail_time"], row["fail_source"] = last_t, source
                row["fail_step"], row["fail_rank"] = None, None
        else:
            row["ended"] = "unfinished"
        out["attempts"].append(row)
    out["lost_steps_per_failure"] = [r["lost_steps"] for r in out["attempts"] if r["ended"] == "failure"]
    out["lost_steps"] = sum(out["lost_steps_per_failure"])
    out["lost_s"] = sum(r["lost_s"] for r in out["attempts"]) if timed else None
    last = attempts[-1]
    out["finished"] = last["end"] is not None
    if not any(att["start"] or att["fail"] or att["end"] for att in attempts):
        out["finished"] = None
        notes.append("no start or end records (a run written before they were): "
                     "whether it finished is not recorded")
    elif not out["finished"]:
        notes.append("no end record: the run did not finish (still running, or killed)")

    # ---- restarts
    for k in range(1, len(attempts)):
        prev_row, att = out["attempts"][k - 1], attempts[k]
        if prev_row["ended"] != "failure":
            continue  # a new launch (--resume) after a finished one: not a restart
        start = att["start"] or {}
        restore = start.get("restore") if isinstance(start.get("restore"), dict) else {}
        fail_t, launch = prev_row["fail_time"], out["attempts"][k]["launch_time"]
        first = att["steps"][0] if att["steps"] else None
        rs = {"attempt": att["attempt"], "failure_time": fail_t,
              "failure_source": prev_row["fail_source"], "fail_step": prev_row["fail_step"],
              "fail_rank": prev_row["fail_rank"],
              "process_start_s": launch - fail_t if launch is not None and fail_t is not None else None,
              "init_s": out["attempts"][k]["init_s"],
              "restore_s": _num(restore.get("seconds")), "restore_source": _str(restore.get("source")),
              "restore_step": _int(restore.get("step")), "resume_step": out["attempts"][k]["start_step"],
              "first_step_s": _num(first.get("step_s")) if first else None}
        first_end = _num(first.get("time")) if first else None
        rs["total_s"] = first_end - fail_t if first_end is not None and fail_t is not None else None
        known = [rs[f] for f in ("process_start_s", "init_s", "restore_s", "first_step_s")]
        rs["other_s"] = (rs["total_s"] - sum(known)
                         if rs["total_s"] is not None and None not in known else None)
        out["restarts"].append(rs)
    out["restart_count"] = len(out["restarts"])

    # ---- productive split, over the steps that count
    if timed:
        tot = {p: 0.0 for p in PARTS + ("step",)}
        for rec in counted.values():
            parts = _step_parts(rec)
            for p in PARTS + ("step",):
                tot[p] += parts[p]
        out["split"] = {p: {"s": tot[p], "pct": 100.0 * tot[p] / tot["step"] if tot["step"] else 0.0,
                            "per_step_s": tot[p] / max(len(counted), 1)} for p in PARTS}
        out["productive_s"] = tot["step"]
    else:
        out["split"], out["productive_s"] = None, None
    tokens = [rec.get("tokens") for rec in counted.values()]
    out["tokens"] = (sum(tokens) if tokens and all(isinstance(t, int) for t in tokens) else None)

    # ---- one row per step record, every attempt: what the figure draws
    series = []
    for k, att in enumerate(attempts):
        for rec in att["steps"]:
            parts = _step_parts(rec) if timed else None
            series.append({"attempt": att["attempt"], "step": rec["step"], "time": _num(rec.get("time")),
                           "loss": _num(rec.get("loss")), "parts": parts,
                           "counted": counted.get(rec["step"]) is rec, "lost": is_lost(k, rec)})
    out["series"] = series

    # ---- wall time and goodput
    times = [_num(r.get("time")) for r in records]
    times = [t for t in times if t is not None]
    t0 = out["attempts"][0]["launch_time"]
    if t0 is None:
        t0 = out["attempts"][0]["ready_time"]
        if t0 is None and all_steps:
            t0 = step_begin(all_steps[0])
        if t0 is not None:
            notes.append("no launch time for the first attempt: wall time starts later "
                         "(goodput is an upper bound)")
    t_end = _num(last["end"].get("time")) if last["end"] is not None else None
    if t_end is None and times:
        t_end = max(times)
    out["t0"], out["t_end"] = t0, t_end
    wall = None
    if t0 is not None and t_end is not None and t_end > t0 and timed:
        # time between a finished launch and the next one (--resume) is no part of the run
        idle_s = 0.0
        for prev, row in zip(out["attempts"], out["attempts"][1:]):
            if prev["ended"] == "end" and prev.get("end_time") is not None and row["launch_time"] is not None:
                idle_s += max(0.0, row["launch_time"] - prev["end_time"])
        if idle_s:
            notes.append(f"{idle_s:.1f} s between a finished launch and the next one (--resume) "
                         "left out of the wall time")
        wall = t_end - t0 - idle_s
    if wall is not None and wall > 0:
        # startup: first launch -> the run's first step begins; a restart: the failure of an
        # attempt that ran steps -> the next attempt's first step begins (attempts that died
        # before their first step fall inside it)
        startup_s, restart_s, up_since, down_since = 0.0, 0.0, t0, None
        for k, att in enumerate(attempts):
            row = out["attempts"][k]
            if k and out["attempts"][k - 1]["ended"] == "end":  # a new launch
                up_since, down_since = row["launch_time"], None
            b = step_begin(att["steps"][0]) if att["steps"] else None
            if b is not None and down_since is not None:
                restart_s += b - down_since
                down_since = None
            elif b is not None and up_since is not None:
                startup_s += b - up_since
                up_since = None
            if row["ended"] == "failure" and up_since is None and down_since is None:
                down_since = row["fail_time"]  # a step had run since the last launch
        other = wall - out["productive_s"] - out["lost_s"] - restart_s - startup_s
        out["wall"] = {"wall_s": wall, "productive_s": out["productive_s"], "lost_s": out["lost_s"],
                       "restart_s": restart_s, "startup_s": startup_s, "other_s": other}
        out["goodput"] = out["productive_s"] / wall
        out["tokens_per_s"] = out["tokens"] / wall if out["tokens"] is not None else None
        out["tokens_per_step_s"] = (out["tokens"] / out["productive_s"]
                                    if out["tokens"] is not None and out["productive_s"] else None)
    else:
        out["wall"], out["goodput"], out["tokens_per_s"], out["tokens_per_step_s"] = None, None, None, None
        if timed:
            notes.append("no span of wall-clock time in the records: no goodput")
    return _finite(out)


def _finite(x):
    """Sums of absurd inputs can overflow: any non-finite number becomes None (null)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


# ---------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------


def _f(x, fmt="{:.2f}", none="-") -> str:
    return none if x is None else fmt.format(x)


def _mul(a, b):
    return None if a is None or b is None else a * b


def _rel(t, t0) -> str:
    return "-" if t is None or t0 is None else f"+{t - t0:.1f} s"


def _rule(width: int) -> str:
    return "-" * width


def format_table(res: dict, run_dir: str = "") -> str:
    """The fixed-width text report of :func:`analyse`'s result."""
    W = 96
    lines = []
    head = f"ichiban-train report  {run_dir}".rstrip()
    lines += ["=" * W, head, "=" * W]
    job = []
    if res.get("world_size") is not None:
        dims = " x ".join(f"{k} {res[k]}" for k in ("tp", "pp", "dp") if res.get(k) is not None)
        job.append(f"world {res['world_size']}" + (f" ({dims})" if dims else ""))
    if res.get("backend"):
        job.append(f"backend {res['backend']}")
    n_att = len(res["attempts"])
    state = {True: "finished", False: "UNFINISHED", None: "end not recorded"}[res["finished"]]
    job.append(f"{n_att} attempt{'s' * (n_att != 1)}, {res['restart_count']} restart"
               f"{'s' * (res['restart_count'] != 1)}")
    job.append(f"{res['steps']} steps counted, {state}")
    lines.append("  ".join(job))
    if res.get("goodput") is not None:
        tps = ""
        if res.get("tokens_per_s") is not None:
            tps = f"   tokens/s {res['tokens_per_s']:,.0f} over wall time"
            if res.get("tokens_per_step_s") is not None:
                tps += f", {res['tokens_per_step_s']:,.0f} while stepping"
        lines.append(f"goodput {100 * res['goodput']:.1f} %{tps}")
    failed = [r for r in res["attempts"] if r["ended"] == "failure"]
    if failed:
        lost = ", ".join(f"{r['lost_steps']}" + (f" ({r['lost_s']:.2f} s)" if r["lost_s"] is not None else "")
                         for r in failed)
        down = ", ".join(_f(r["total_s"], "{:.2f} s") for r in res["restarts"])
        lines.append(f"{len(failed)} failure{'s' * (len(failed) != 1)}: steps lost {lost}; "
                     f"failure -> first step done {down}")

    if not res["attempts"]:
        lines += ["", "no records to report"]
        return "\n".join(lines + _notes(res))

    # attempts
    t0 = res.get("t0")
    lines += ["", "Attempts", _rule(W),
              f"{'attempt':>7} {'launched':>10} {'start step':>10} {'steps run':>9} {'last step':>9} "
              f"{'lost steps':>10} {'lost s':>8}  ended",
              _rule(W)]
    for r in res["attempts"]:
        if r["ended"] == "failure":
            if r["fail_source"] == "fail record":
                where = f"step {r['fail_step']}" if r["fail_step"] is not None else "?"
                rank = f", rank {r['fail_rank']}" if r["fail_rank"] is not None else ""
                ended = f"failure at {where}{rank}"
            elif r["last_step"] is None:
                ended = "failure before its first step"
            else:
                ended = f"failure after step {r['last_step']} (no fail record)"
        else:
            ended = {"end": "finished", "unfinished": "no end record"}[r["ended"]]
            if res["finished"] is None:
                ended = "-"
        lines.append(f"{r['attempt']:>7} {_rel(r['launch_time'], t0):>10} {_f(r['start_step'], '{}'):>10} "
                     f"{r['steps_run']:>9} {_f(r['last_step'], '{}'):>9} {r['lost_steps']:>10} "
                     f"{_f(r['lost_s']):>8}  {ended}")

    # restarts
    if res["restarts"]:
        lines += ["", "Restarts (seconds from the failure until the first step after it is done)", _rule(W),
                  f"{'attempt':>7} {'failure':>10} {'proc start':>10} {'rdzv/init':>9} {'restore':>8} "
                  f"{'from':<13} {'first step':>10} {'other':>7} {'total':>8}",
                  _rule(W)]
        for r in res["restarts"]:
            src = r["restore_source"] or "none"
            if r["restore_step"] is not None:
                src = f"{src}@{r['restore_step']}"
            lines.append(f"{r['attempt']:>7} {_rel(r['failure_time'], t0):>10} {_f(r['process_start_s']):>10} "
                         f"{_f(r['init_s']):>9} {_f(r['restore_s']):>8} {src:<13} "
                         f"{_f(r['first_step_s']):>10} {_f(r['other_s']):>7} {_f(r['total_s']):>8}")

    # productive split
    if res["split"] is not None:
        lines += ["", f"Step time over the {res['steps']} steps that count "
                      "(each step once, from the last attempt that ran it)", _rule(W),
                  f"{'part':<12} {'seconds':>10} {'%':>7} {'ms/step':>10}", _rule(W)]
        for p in PARTS:
            s = res["split"][p]
            lines.append(f"{PART_LABELS[p]:<12} {_f(s['s']):>10} {_f(s['pct'], '{:.1f}'):>7} "
                         f"{_f(_mul(1e3, s['per_step_s']), '{:.1f}'):>10}")
        per_step = _mul(1e3 / max(res["steps"], 1), res["productive_s"])
        lines.append(f"{'step':<12} {_f(res['productive_s']):>10} {100.0:>7.1f} {_f(per_step, '{:.1f}'):>10}")

    # wall time
    w = res.get("wall")
    if w is not None:
        lines += ["", "Wall time, first launch to end", _rule(W), f"{'':<48} {'seconds':>10} {'%':>7}", _rule(W)]
        rows = [("productive steps", w["productive_s"]), ("lost steps (done again after a restart)", w["lost_s"]),
                ("restarts (failure -> next first step begins)", w["restart_s"]),
                ("startup (first launch -> first step begins)", w["startup_s"]),
                ("other (between steps, partial steps, shutdown)", w["other_s"]),
                ("wall", w["wall_s"])]
        for name, s in rows:
            pct = _mul(100 / w["wall_s"], s) if w["wall_s"] else None
            lines.append(f"{name:<48} {_f(s):>10} {_f(pct, '{:.1f}'):>7}")
    lines.append(_rule(W))
    return "\n".join(lines + _notes(res))


def _notes(res: dict) -> list[str]:
    return ["note: " + n for n in res["notes"]]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ichiban-train report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's --out-dir, holding metrics.jsonl")
    p.add_argument("--png", metavar="PATH", default=None, help="where to write the figure "
                   "(default RUN_DIR/report.png; needs matplotlib)")
    p.add_argument("--no-png", action="store_true", help="write no figure")
    p.add_argument("--json", action="store_true", help="print the computed numbers as JSON instead of the table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Exit codes: 0 table (and figure) written; 2 no RUN_DIR or no metrics.jsonl in it;
    1 the figure was asked for with --png but could not be written (without --png,
    a missing matplotlib is a warning: the table is the report)."""
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
    records, read_notes = read_metrics(path)
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
        from ._report_plot import write_png
    except ImportError as e:  # matplotlib missing
        print(f"ichiban-train report: figure not written: {e.name or 'matplotlib'} is not installed "
              "(pip install matplotlib, or pip install 'ichiban_comm[report]')", file=sys.stderr)
        return 1 if args.png else 0
    try:
        write_png(res, png)
    except OSError as e:
        print(f"ichiban-train report: figure not written to {png!r}: {e}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
