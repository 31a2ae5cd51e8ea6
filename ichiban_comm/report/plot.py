"""The figure of ``ichiban-train report``, drawn from an :func:`~ichiban_comm.report.analyse` result.

Top: each step's time stacked as compute / comm wait / ckpt stall / data wait
over wall-clock time, steps that were done again after a restart shaded, each
failure and each resume marked. Bottom: the loss over the step number, one
line per attempt. Imported only when a figure is asked for, so the table
needs no matplotlib.
"""

from __future__ import annotations

import os

# A Figure of its own, not pyplot: no global backend switched, no figure left
# registered in a caller's session (a notebook keeps its backend).
from matplotlib.figure import Figure

from .records import PART_LABELS, PARTS

COLORS = {"compute": "#4c72b0", "comm": "#dd8452", "ckpt": "#c44e52", "data": "#8172b3"}
SIZE_IN, DPI = (12.0, 7.0), 100  # 1200 x 700 pixels


def write_png(res: dict, path: str) -> None:
    series = res.get("series") or []
    t0 = res.get("t0")
    by_time = t0 is not None and bool(series) and all(r["time"] is not None for r in series)
    timed = bool(series) and all(r["parts"] is not None for r in series)

    fig = Figure(figsize=SIZE_IN, dpi=DPI)
    ax, ax_loss = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 2]})
    _split_panel(ax, res, series, t0, by_time, timed)
    _loss_panel(ax_loss, res, series)
    fig.suptitle(_title(res), fontsize=11)
    fig.tight_layout()
    tmp = f"{path}.tmp"
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)  # a reader never sees a half-written figure
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _title(res: dict) -> str:
    bits = [f"{res['steps']} steps", f"{res['restart_count']} restart{'s' * (res['restart_count'] != 1)}"]
    if res.get("goodput") is not None:
        bits.append(f"goodput {100 * res['goodput']:.1f} %")
    if res.get("lost_steps"):
        bits.append(f"{res['lost_steps']} steps done again")
    if res.get("finished") is False:
        bits.append("unfinished")
    return "ichiban-train: " + ", ".join(bits)


def _split_panel(ax, res, series, t0, by_time, timed):
    ax.set_ylabel("step time split (ms)")
    if not timed:
        ax.text(0.5, 0.5, "no step timing in metrics.jsonl", ha="center", va="center",
                transform=ax.transAxes, color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ax.set_xlabel("wall-clock time since first launch (s)" if by_time else "step")
    labelled = set()
    for att in res["attempts"]:
        rows = [r for r in series if r["attempt"] == att["attempt"]]
        if not rows:
            continue
        if by_time:
            ends = [r["time"] - t0 for r in rows]
            xs = [ends[0] - rows[0]["parts"]["step"]] + ends
        else:
            xs = [rows[0]["step"]] + [r["step"] + 1 for r in rows]
        bottom = [0.0] * len(rows)
        for p in PARTS:
            top = [b + 1e3 * r["parts"][p] for b, r in zip(bottom, rows)]
            ax.fill_between(xs, [bottom[0]] + bottom, [top[0]] + top, step="pre", color=COLORS[p],
                            linewidth=0, label=None if p in labelled else PART_LABELS[p])
            labelled.add(p)
            bottom = top
        lost = [x for x, r in zip(xs, rows) if r["lost"]]
        if lost:
            end = (att["fail_time"] - t0) if by_time and att.get("fail_time") is not None else xs[-1]
            ax.axvspan(lost[0], end, color="red", alpha=0.12, linewidth=0,
                       label=None if "lost" in labelled else "done again after restart")
            labelled.add("lost")
    # headroom above the bars for the restart labels
    ymax = ax.get_ylim()[1] * 1.6
    label_box = {"facecolor": "white", "alpha": 0.8, "linewidth": 0, "pad": 1.0}
    if by_time:
        for rs in res["restarts"]:
            prev, att = res["attempts"][rs["attempt"] - 2], res["attempts"][rs["attempt"] - 1]
            rows = [r for r in series if r["attempt"] == att["attempt"]]
            fail = rs["failure_time"] - t0 if rs["failure_time"] is not None else None
            resume = rows[0]["time"] - t0 - rows[0]["parts"]["step"] if rows else None
            if fail is not None:
                what = "failure"
                if rs["failure_source"] != "fail record" and prev["last_step"] is not None:
                    what += f" after step {prev['last_step']}"
                elif rs["fail_step"] is not None:
                    what += f" at step {rs['fail_step']}"
                if rs["fail_rank"] is not None:
                    what += f", rank {rs['fail_rank']}"
                ax.axvline(fail, color="red", linestyle="--", linewidth=1)
                ax.text(fail, ymax, what + " ", rotation=90, ha="right", va="top", fontsize=8, color="red",
                        bbox=label_box)
            if resume is not None:
                src = rs["restore_source"] or "scratch"
                ax.axvline(resume, color="green", linestyle="--", linewidth=1)
                ax.text(resume, ymax, f" resumed at step {rs['resume_step']} from {src}", rotation=90,
                        ha="left", va="top", fontsize=8, color="green", bbox=label_box)
            if fail is not None and resume is not None:
                ax.axvspan(fail, resume, color="gray", alpha=0.15, linewidth=0,
                           label=None if "down" in labelled else "restart (no step running)")
                labelled.add("down")
    ax.set_ylim(0, ymax)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=8, ncol=6, frameon=False)


def _loss_panel(ax, res, series):
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    drew = False
    for k, att in enumerate(res["attempts"]):
        rows = [r for r in series if r["attempt"] == att["attempt"] and r["loss"] is not None]
        kept = [r for r in rows if not r["lost"]]
        lost = [r for r in rows if r["lost"]]
        color = f"C{k % 10}"
        if kept:
            ax.plot([r["step"] for r in kept], [r["loss"] for r in kept], linewidth=1.2, color=color,
                    label=f"attempt {att['attempt']}")
        if lost:  # done again by the next attempt: dashed, joined to the kept part
            lost = kept[-1:] + lost
            ax.plot([r["step"] for r in lost], [r["loss"] for r in lost], linewidth=1, linestyle="--",
                    color=color, alpha=0.6, label=None if kept else f"attempt {att['attempt']} (lost)")
        drew = drew or bool(rows)
    if drew:
        ax.legend(loc="upper right", fontsize=8, title="dashed: steps done again", title_fontsize=8)
    else:
        ax.text(0.5, 0.5, "no losses in metrics.jsonl", ha="center", va="center",
                transform=ax.transAxes, color="gray")
