"""The fixed-width text report of an :func:`~ichiban_comm.report.analyse` result."""

from __future__ import annotations

from .records import PART_LABELS, PARTS


def _f(x, fmt="{:.2f}", none="-") -> str:
    return none if x is None else fmt.format(x)


def _mul(a, b):
    return None if a is None or b is None else a * b


def _rel(t, t0) -> str:
    return "-" if t is None or t0 is None else f"+{t - t0:.1f} s"


def _source(r: dict) -> str:
    """Where a restore came from: memory@S, peer@S, disk@S, or none."""
    src = r["restore_source"] or "none"
    return f"{src}@{r['restore_step']}" if r["restore_step"] is not None else src


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
    failed = [r for r in res["attempts"] if r["ended"] == "failure" and r["resumed"]]
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
              f"{'attempt':>7} {'launched':>10} {'start step':>10} {'restored':<13} {'steps run':>9} "
              f"{'last step':>9} {'lost steps':>10} {'lost s':>8}  ended",
              _rule(W)]
    for r in res["attempts"]:
        if r["ended"] == "failure":
            if r["fail_source"] == "fail record":
                where = f"step {r['fail_step']}" if r["fail_step"] is not None else "?"
                rank = f", rank {r['fail_rank']}" if r["fail_rank"] is not None else ""
                ended = f"failure at {where}{rank}" + ("" if r["resumed"] else " (not resumed)")
            elif r["last_step"] is None:
                ended = "failure before its first step"
            else:
                ended = f"failure after step {r['last_step']} (no fail record)"
        else:
            ended = {"end": "finished", "unfinished": "no end record"}[r["ended"]]
            if res["finished"] is None:
                ended = "-"
        lines.append(f"{r['attempt']:>7} {_rel(r['launch_time'], t0):>10} {_f(r['start_step'], '{}'):>10} "
                     f"{_source(r):<13} {r['steps_run']:>9} {_f(r['last_step'], '{}'):>9} {r['lost_steps']:>10} "
                     f"{_f(r['lost_s']):>8}  {ended}")

    # restarts
    if res["restarts"]:
        lines += ["", "Restarts (seconds from the failure until the first step after it is done)", _rule(W),
                  f"{'attempt':>7} {'failure':>10} {'proc start':>10} {'rdzv/init':>9} {'restore':>8} "
                  f"{'from':<13} {'first step':>10} {'other':>7} {'total':>8}",
                  _rule(W)]
        for r in res["restarts"]:
            src = _source(r)
            lines.append(f"{r['attempt']:>7} {_rel(r['failure_time'], t0):>10} {_f(r['process_start_s']):>10} "
                         f"{_f(r['init_s']):>9} {_f(r['restore_s']):>8} {src:<13} "
                         f"{_f(r['first_step_s']):>10} {_f(r['other_s']):>7} {_f(r['total_s']):>8}")

    # productive split
    if res["split"] is not None:
        lines += ["", f"Step time over the {res['steps']} steps that count "
                      "(each step once, from the last attempt that ran it and kept it)", _rule(W),
                  f"{'part':<12} {'seconds':>10} {'%':>7} {'mean ms':>10} {'p50 ms':>10} {'p90 ms':>10} "
                  f"{'max ms':>10}", _rule(W)]
        for p in PARTS + ("step",):
            s = res["split"][p]
            ms = [_f(_mul(1e3, s[k]), "{:.1f}") for k in ("per_step_s", "p50_s", "p90_s", "max_s")]
            lines.append(f"{PART_LABELS.get(p, p):<12} {_f(s['s']):>10} {_f(s['pct'], '{:.1f}'):>7} "
                         + " ".join(f"{m:>10}" for m in ms))

    # wall time
    w = res.get("wall")
    if w is not None:
        lines += ["", "Wall time, first launch to end", _rule(W), f"{'':<48} {'seconds':>10} {'%':>7}", _rule(W)]
        rows = [("productive steps (compute + comm wait)", w["productive_s"]),
                ("checkpoint stalls in those steps", w.get("ckpt_s")),
                ("data waits in those steps", w.get("data_s")),
                ("lost steps (done again after a restart)", w["lost_s"]),
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
