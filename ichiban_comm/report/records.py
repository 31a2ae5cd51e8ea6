"""Reading ``metrics.jsonl``: records, torn lines, attempts, one step's time split."""

from __future__ import annotations

import json
import math

PARTS = ("compute", "comm", "ckpt", "data")
PART_LABELS = {"compute": "compute", "comm": "comm wait", "ckpt": "ckpt stall", "data": "data wait"}
METRICS = "metrics.jsonl"


def read_metrics(path: str) -> tuple[list[dict], list[str]]:
    """The records of a metrics file, and notes on lines that could not be read.

    A writer killed mid-line leaves a torn record; the next attempt then appends
    its first record to that same line. Such a line keeps the record appended
    after the tear (the first ``{`` from which the rest parses), and the torn part
    is skipped with a note. Never raises on content, only on I/O.
    """
    records, notes = [], []
    bad = []  # (line number, record kept after the tear or None, bytes skipped)
    last = 0
    with open(path, "rb") as f:  # streamed: a long run's file need not fit in memory twice
        for n, raw in enumerate(f, 1):
            text = raw.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            last = n
            rec = _parse(text)
            if rec is None:
                rec, torn = _recover_tail(text)
                bad.append((n, rec, torn))
            if rec is not None:
                records.append(rec)
    for n, rec, torn in bad:
        where = "last line" if n == last else f"line {n}"
        if rec is not None:
            notes.append(f"{where}: a torn record ({torn} characters, a writer killed mid-line) skipped; "
                         "the record appended after it kept")
        else:
            notes.append(f"{where}: unreadable record ({torn} characters"
                         + (", a writer killed mid-line" if n == last else "") + ") skipped")
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


def as_float(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def as_int(x) -> int | None:
    return x if is_int(x) else None


def as_str(x) -> str | None:
    return x if isinstance(x, str) else None


def group_attempts(records: list[dict], notes: list[str]) -> list[dict]:
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
        label = rec.get("attempt") if is_int(rec.get("attempt")) else None
        is_step = event is None and is_int(rec.get("step"))
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


def step_parts(rec: dict) -> dict | None:
    """compute/comm/ckpt/data/step seconds of one step record; None without step_s.
    A record without the split (old runs) is all compute."""
    step_s = as_float(rec.get("step_s"))
    if step_s is None:
        return None
    parts = {p: as_float(rec.get(f"{p}_s")) for p in PARTS}
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
