"""analyse(): every number of the report from the records of one run."""

from __future__ import annotations

import math

from .records import PARTS, as_float, as_int, as_str, group_attempts, is_int, step_parts


def analyse(records: list[dict]) -> dict:
    """Every number of the report, from the records of one run's metrics.jsonl.

    Per attempt: steps run, steps lost (steps at or beyond the step a later
    attempt resumed at, the next one's as a rule: work done again) and their
    time. Per restart: failure time (the ``fail`` record, else the failed
    attempt's last step), process start (launch − failure), rendezvous/init,
    restore (seconds, tier, step), first step, and the rest. The productive split
    counts each step number once, from the last attempt that ran it and kept it.
    Goodput = productive step time (compute and communication of the steps that count, not
    their checkpoint stalls or data waits) / wall time from the first attempt's launch to
    the ``end`` record (else the last record). Pure: reads nothing, prints nothing.
    """
    notes: list[str] = []
    attempts = group_attempts(records, notes)
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
        out[key] = as_str(first_start.get(key)) if key == "backend" else as_int(first_start.get(key))

    # ---- where each attempt resumed; a step record is lost (work done again) when a
    # later attempt resumed at or before its step; the others count, each step number
    # once, from the last attempt that ran it
    resume = []
    for att in attempts:
        s0 = (att["start"] or {}).get("start_step")
        resume.append(s0 if is_int(s0) else (att["steps"][0]["step"] if att["steps"] else None))
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
    parts_of = {id(rec): step_parts(rec) for rec in all_steps}  # one pass: long runs have 1e5+ steps
    timed = bool(all_steps) and all(p is not None for p in parts_of.values())
    if all_steps and not timed:
        notes.append("step records carry no step_s: no time split, goodput or tokens/s "
                     "(a run written before step timing was recorded)")
    elif all_steps and any(not p["split"] for p in parts_of.values()):
        notes.append("step records without compute/comm/ckpt/data seconds (an older run): "
                     "their whole step time is counted as compute")

    # ---- per attempt
    def step_begin(rec):
        t, s = as_float(rec.get("time")), as_float(rec.get("step_s"))
        return None if t is None or s is None else t - s

    for k, att in enumerate(attempts):
        steps = att["steps"]
        start = att["start"] or {}
        lost = [r for r in steps if is_lost(k, r)]
        row = {"attempt": att["attempt"], "start_step": resume[k], "steps_run": len(steps),
               "first_step": steps[0]["step"] if steps else None,
               "last_step": steps[-1]["step"] if steps else None,
               "launch_time": as_float(start.get("launch_time")), "ready_time": as_float(start.get("time")),
               "init_s": as_float(start.get("init_s")),
               "lost_steps": len(lost), "lost_from": lost_from[k],
               "lost_s": sum(parts_of[id(r)]["step"] for r in lost) if timed else None}
        restore = start.get("restore") if isinstance(start.get("restore"), dict) else {}
        row["restore_source"] = as_str(restore.get("source"))
        row["restore_step"] = as_int(restore.get("step"))
        row["restore_s"] = as_float(restore.get("seconds"))
        if row["launch_time"] is None and row["ready_time"] is not None and row["init_s"] is not None:
            row["launch_time"] = row["ready_time"] - row["init_s"]  # the same instant, by definition
        row["resumed"] = k + 1 < len(attempts)
        if att["end"] is not None:
            row["ended"], row["end_time"] = "end", as_float(att["end"].get("time"))
        elif row["resumed"] or att["fail"] is not None:
            row["ended"] = "failure"
            fail = att["fail"]
            if fail is not None and as_float(fail.get("time")) is not None:
                row["fail_time"], row["fail_source"] = as_float(fail["time"]), "fail record"
                row["fail_step"], row["fail_rank"] = as_int(fail.get("step")), as_int(fail.get("rank"))
            else:
                last_t = as_float(steps[-1].get("time")) if steps else None
                source = "last step record"
                if last_t is None:  # died before its first step: its last sign of life
                    last_t = row["ready_time"] if row["ready_time"] is not None else row["launch_time"]
                    source = "start record"
                row["fail_time"], row["fail_source"] = last_t, source
                row["fail_step"], row["fail_rank"] = None, None
        else:
            row["ended"] = "unfinished"
        out["attempts"].append(row)
    out["lost_steps_per_failure"] = [r["lost_steps"] for r in out["attempts"]
                                     if r["ended"] == "failure" and r["resumed"]]
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
        row = out["attempts"][k]
        fail_t, launch = prev_row["fail_time"], row["launch_time"]
        first = att["steps"][0] if att["steps"] else None
        rs = {"attempt": att["attempt"], "failure_time": fail_t,
              "failure_source": prev_row["fail_source"], "fail_step": prev_row["fail_step"],
              "fail_rank": prev_row["fail_rank"],
              "process_start_s": launch - fail_t if launch is not None and fail_t is not None else None,
              "init_s": row["init_s"], "restore_s": row["restore_s"], "restore_source": row["restore_source"],
              "restore_step": row["restore_step"], "resume_step": row["start_step"],
              "first_step_s": as_float(first.get("step_s")) if first else None}
        first_end = as_float(first.get("time")) if first else None
        rs["total_s"] = first_end - fail_t if first_end is not None and fail_t is not None else None
        known = [rs[f] for f in ("process_start_s", "init_s", "restore_s", "first_step_s")]
        rs["other_s"] = (rs["total_s"] - sum(known)
                         if rs["total_s"] is not None and None not in known else None)
        out["restarts"].append(rs)
    out["restart_count"] = len(out["restarts"])

    # ---- productive split, over the steps that count
    if timed:
        values = {p: sorted(parts_of[id(rec)][p] for rec in counted.values()) for p in PARTS + ("step",)}
        tot = {p: sum(v) for p, v in values.items()}
        out["split"] = {p: {"s": tot[p], "pct": 100.0 * tot[p] / tot["step"] if tot["step"] else 0.0,
                            "per_step_s": tot[p] / max(len(counted), 1),
                            "p50_s": _rank(values[p], 0.5), "p90_s": _rank(values[p], 0.9),
                            "max_s": values[p][-1] if values[p] else None}
                        for p in PARTS + ("step",)}
        # productive: the steps' compute and communication; their checkpoint stalls and data
        # waits are time the model did not train (a synchronous save is not productive work)
        out["productive_s"] = tot["compute"] + tot["comm"]
        out["stepping_s"] = tot["step"]
    else:
        out["stepping_s"] = None
        out["split"], out["productive_s"] = None, None
    tokens = [rec.get("tokens") for rec in counted.values()]
    out["tokens"] = (sum(tokens) if tokens and all(isinstance(t, int) for t in tokens) else None)

    # ---- one row per step record, every attempt: what the figure draws
    series = []
    for k, att in enumerate(attempts):
        for rec in att["steps"]:
            parts = parts_of[id(rec)] if timed else None
            series.append({"attempt": att["attempt"], "step": rec["step"], "time": as_float(rec.get("time")),
                           "loss": as_float(rec.get("loss")), "parts": parts,
                           "counted": counted.get(rec["step"]) is rec, "lost": is_lost(k, rec)})
    # (every number in it is finite already: as_float and step_parts saw to that)

    # ---- wall time and goodput
    times = [as_float(r.get("time")) for r in records]
    times = [t for t in times if t is not None]
    t0 = out["attempts"][0]["launch_time"]
    if t0 is None:
        t0 = out["attempts"][0]["ready_time"]
        if t0 is None and all_steps:
            t0 = step_begin(all_steps[0])
        if t0 is not None:
            notes.append("no launch time for the first attempt: wall time starts later "
                         "(goodput is an upper bound)")
    t_end = as_float(last["end"].get("time")) if last["end"] is not None else None
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
        stalls = out["split"]["ckpt"]["s"] + out["split"]["data"]["s"]
        other = wall - out["productive_s"] - stalls - out["lost_s"] - restart_s - startup_s
        out["wall"] = {"wall_s": wall, "productive_s": out["productive_s"],
                       "ckpt_s": out["split"]["ckpt"]["s"], "data_s": out["split"]["data"]["s"],
                       "lost_s": out["lost_s"], "restart_s": restart_s, "startup_s": startup_s,
                       "other_s": other}
        out["goodput"] = out["productive_s"] / wall
        out["tokens_per_s"] = out["tokens"] / wall if out["tokens"] is not None else None
        out["tokens_per_step_s"] = (out["tokens"] / out["stepping_s"]
                                    if out["tokens"] is not None and out["stepping_s"] else None)
    else:
        out["wall"], out["goodput"], out["tokens_per_s"], out["tokens_per_step_s"] = None, None, None, None
        if timed:
            notes.append("no span of wall-clock time in the records: no goodput")
    out = _finite(out)
    out["series"] = series
    return out


def _rank(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile: the smallest value with at least q of them at or below it."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _finite(x):
    """Sums of absurd inputs can overflow: any non-finite number becomes None (null)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
