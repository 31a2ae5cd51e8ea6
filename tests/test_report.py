"""`ichiban-train report`: the numbers of analyse() against hand-computed values on
synthetic metrics.jsonl files, the table, the PNG and the errors. No processes.

    .venv/bin/python -m pytest tests/test_report.py -q
"""

import json
import sys

import pytest

from ichiban_comm import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKENS = 100


def _step(i, attempt, end, step_s=1.0, compute=0.5, comm=0.25, ckpt=0.125, data=0.125):
    # Binary fractions, so every sum below is exact.
    return {"step": i, "attempt": attempt, "time": end, "loss": 5.0 - 0.25 * i, "lr": 1e-3,
            "grad_norm": 1.0, "step_s": step_s, "compute_s": compute, "comm_s": comm,
            "ckpt_s": ckpt, "data_s": data, "tokens": TOKENS}


def _start(attempt, launch, init_s, start_step, source=None, restore_step=None, restore_s=0.0):
    return {"event": "start", "attempt": attempt, "time": launch + init_s, "launch_time": launch,
            "start_step": start_step, "init_s": init_s, "world_size": 4, "tp": 2, "pp": 1, "dp": 2,
            "backend": "ichiban",
            "restore": {"source": source, "step": restore_step, "seconds": restore_s}}


def clean_run():
    """Launch at 1000, group ready at 1002, steps 0..4 of 1 s each end at 1003..1007, end at 1007.5."""
    recs = [_start(1, 1000.0, 2.0, 0)]
    recs += [_step(i, 1, 1003.0 + i) for i in range(5)]
    recs.append({"event": "end", "attempt": 1, "time": 1007.5, "steps": 5})
    return recs


def restart_run():
    """Three attempts, two failures.

    attempt 1: launch 1000, ready 1002; steps 0..5 end at 1003..1008; a fail record
               at 1008.5 (step 6, rank 1). Newest snapshot: step 4 (memory).
    attempt 2: launch 1010 (process start 1.5 s after the failure), init 1.5 s, ready 1011.5,
               restore from memory at step 4 in 0.25 s; step 4 runs 1012.0 -> 1013.5 (1.5 s,
               compute 1.0), steps 5..7 end at 1014.5..1016.5. Killed without a fail record:
               failure time = last step's time 1016.5. Newest snapshot every rank has: step 6 (disk).
    attempt 3: launch 1018.5 (process start 2.0 s), init 1.0 s, ready 1019.5, restore from
               disk at step 6 in 2.0 s; steps 6..9 end at 1022.5..1025.5; end at 1026.
    """
    recs = [_start(1, 1000.0, 2.0, 0)]
    recs += [_step(i, 1, 1003.0 + i) for i in range(6)]
    recs.append({"event": "fail", "attempt": 1, "step": 6, "rank": 1, "time": 1008.5})
    recs.append(_start(2, 1010.0, 1.5, 4, "memory", 4, 0.25))
    recs.append(_step(4, 2, 1013.5, step_s=1.5, compute=1.0))
    recs += [_step(i, 2, 1009.5 + i) for i in (5, 6, 7)]
    recs.append(_start(3, 1018.5, 1.0, 6, "disk", 6, 2.0))
    recs += [_step(i, 3, 1016.5 + i) for i in (6, 7, 8, 9)]
    recs.append({"event": "end", "attempt": 3, "time": 1026.0, "steps": 10})
    return recs


def _write(tmp_path, recs, tail=""):
    d = tmp_path / "run"
    d.mkdir(exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return d


# ---------------------------------------------------------------------------
# analyse(): numbers
# ---------------------------------------------------------------------------


def test_clean_run_numbers():
    res = report.analyse(clean_run())
    assert res["finished"] and res["restart_count"] == 0 and res["restarts"] == []
    assert res["steps"] == 5 and res["lost_steps"] == 0 and res["lost_s"] == 0.0
    assert res["split"]["compute"] == {"s": 2.5, "pct": 50.0, "per_step_s": 0.5, "p50_s": 0.5,
                                       "p90_s": 0.5, "max_s": 0.5}
    assert res["split"]["comm"]["s"] == 1.25 and res["split"]["comm"]["pct"] == 25.0
    assert res["split"]["ckpt"]["s"] == 0.625 and res["split"]["data"]["pct"] == 12.5
    assert res["productive_s"] == 3.75   # compute + comm: the stalls are not productive
    assert res["goodput"] == 3.75 / 7.5
    assert res["tokens"] == 500 and res["tokens_per_s"] == 500 / 7.5 and res["tokens_per_step_s"] == 100.0
    assert res["wall"] == {"wall_s": 7.5, "productive_s": 3.75, "ckpt_s": 0.625, "data_s": 0.625,
                           "lost_s": 0.0, "restart_s": 0.0, "startup_s": 2.0, "other_s": 0.5}
    (att,) = res["attempts"]
    assert (att["steps_run"], att["ended"], att["start_step"], att["last_step"]) == (5, "end", 0, 4)
    assert res["world_size"] == 4 and res["backend"] == "ichiban"
    assert res["notes"] == []


def test_two_restarts_numbers():
    res = report.analyse(restart_run())
    assert res["finished"] and res["restart_count"] == 2
    a1, a2, a3 = res["attempts"]
    # steps run, and those done again: attempt 1 ran 4 and 5 which attempt 2 redid from its
    # step-4 snapshot; attempt 2 ran 6 and 7 which attempt 3 redid from step 6
    assert (a1["steps_run"], a1["lost_steps"], a1["lost_s"], a1["lost_from"]) == (6, 2, 2.0, 4)
    assert (a2["steps_run"], a2["lost_steps"], a2["lost_s"], a2["lost_from"]) == (4, 2, 2.0, 6)
    assert (a3["steps_run"], a3["lost_steps"], a3["ended"]) == (4, 0, "end")
    assert res["lost_steps_per_failure"] == [2, 2] and res["lost_steps"] == 4 and res["lost_s"] == 4.0
    assert a1["fail_source"] == "fail record" and a1["fail_time"] == 1008.5 and a1["fail_rank"] == 1
    assert a2["fail_source"] == "last step record" and a2["fail_time"] == 1016.5

    r2, r3 = res["restarts"]
    assert r2 == {"attempt": 2, "failure_time": 1008.5, "failure_source": "fail record", "fail_step": 6,
                  "fail_rank": 1, "process_start_s": 1.5, "init_s": 1.5, "restore_s": 0.25,
                  "restore_source": "memory", "restore_step": 4, "resume_step": 4,
                  "first_step_s": 1.5, "total_s": 5.0, "other_s": 0.25}
    assert r3 == {"attempt": 3, "failure_time": 1016.5, "failure_source": "last step record",
                  "fail_step": None, "fail_rank": None, "process_start_s": 2.0, "init_s": 1.0,
                  "restore_s": 2.0, "restore_source": "disk", "restore_step": 6, "resume_step": 6,
                  "first_step_s": 1.0, "total_s": 6.0, "other_s": 0.0}

    # productive: steps 0-3 from attempt 1, 4-5 from attempt 2 (step 4 took 1.5 s there),
    # 6-9 from attempt 3
    assert res["steps"] == 10 and res["productive_s"] == 8.0
    assert {p: res["split"][p]["s"] for p in report.PARTS} == {"compute": 5.5, "comm": 2.5,
                                                               "ckpt": 1.25, "data": 1.25}
    assert res["split"]["compute"]["pct"] == pytest.approx(100 * 5.5 / 10.5, rel=1e-12)
    assert [res["split"]["step"][k] for k in ("s", "p50_s", "p90_s", "max_s")] == [10.5, 1.0, 1.0, 1.5]
    assert res["wall"] == {"wall_s": 26.0, "productive_s": 8.0, "ckpt_s": 1.25, "data_s": 1.25,
                           "lost_s": 4.0,
                           "restart_s": 3.5 + 5.0, "startup_s": 2.0, "other_s": 1.0}
    assert res["goodput"] == 8.0 / 26.0
    assert res["tokens"] == 1000 and res["tokens_per_s"] == 1000 / 26.0
    counted = [(r["attempt"], r["step"]) for r in res["series"] if r["counted"]]
    assert counted == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (3, 6), (3, 7), (3, 8), (3, 9)]
    lost = [(r["attempt"], r["step"]) for r in res["series"] if r["lost"]]
    assert lost == [(1, 4), (1, 5), (2, 6), (2, 7)]


def test_attempt_dying_before_its_first_step_and_an_older_snapshot():
    """attempt 1: steps 0..5 end at 1003..1008, fail record at 1008.5.
    attempt 2: launch 1010, ready 1011, meant to resume at step 4 from memory, dies before
               restoring (no restore, no step, no fail record): failure time = its start, 1011.
    attempt 3: launch 1012, ready 1013, the memory tier gone: disk at step 2 in 1.0 s;
               steps 2..5 end at 1015..1018; end at 1018.
    Attempt 1's steps 2..5 are done again (attempt 3 resumed before attempt 2's step 4)."""
    recs = [_start(1, 1000.0, 2.0, 0)] + [_step(i, 1, 1003.0 + i) for i in range(6)]
    recs.append({"event": "fail", "attempt": 1, "step": 6, "rank": 3, "time": 1008.5})
    a2 = _start(2, 1010.0, 1.0, 4)
    del a2["restore"]
    recs.append(a2)
    recs.append(_start(3, 1012.0, 1.0, 2, "disk", 2, 1.0))
    recs += [_step(i, 3, 1013.0 + i) for i in range(2, 6)]
    recs.append({"event": "end", "attempt": 3, "time": 1018.0, "steps": 6})
    res = report.analyse(recs)
    a1, a2, a3 = res["attempts"]
    assert (a1["steps_run"], a1["lost_steps"], a1["lost_s"], a1["lost_from"]) == (6, 4, 4.0, 2)
    assert (a2["steps_run"], a2["lost_steps"], a2["ended"], a2["fail_source"], a2["fail_time"]) == \
        (0, 0, "failure", "start record", 1011.0)
    assert res["lost_steps_per_failure"] == [4, 0] and res["restart_count"] == 2
    r2, r3 = res["restarts"]
    assert (r2["failure_time"], r2["process_start_s"], r2["init_s"], r2["restore_s"], r2["first_step_s"],
            r2["total_s"], r2["other_s"]) == (1008.5, 1.5, 1.0, None, None, None, None)
    assert (r3["failure_time"], r3["process_start_s"], r3["init_s"], r3["restore_s"], r3["restore_source"],
            r3["first_step_s"], r3["total_s"], r3["other_s"]) == (1011.0, 1.0, 1.0, 1.0, "disk", 1.0, 4.0, 0.0)
    assert res["steps"] == 6 and res["productive_s"] == 4.5
    assert res["wall"] == {"wall_s": 18.0, "productive_s": 4.5, "ckpt_s": 0.75, "data_s": 0.75,
                           "lost_s": 4.0, "restart_s": 5.5,
                           "startup_s": 2.0, "other_s": 0.5}
    assert res["goodput"] == 4.5 / 18.0
    assert [(r["attempt"], r["step"]) for r in res["series"] if r["counted"]] == \
        [(1, 0), (1, 1), (3, 2), (3, 3), (3, 4), (3, 5)]
    table = report.format_table(res)
    assert "failure before its first step" in table and "failure at step 6, rank 3" in table


def test_new_launch_after_a_finished_run_is_not_a_restart():
    """The clean run (ends at 1007.5), then `--resume` launched by hand at 1100 for two more
    steps, numbering its attempts from 1 again: ready 1101, disk restore 0.5 s, steps 5, 6
    end at 1102.5, 1103.5, end at 1104. The 92.5 s between the launches are no part of the run."""
    recs = clean_run() + [_start(1, 1100.0, 1.0, 5, "disk", 5, 0.5),
                          _step(5, 1, 1102.5), _step(6, 1, 1103.5),
                          {"event": "end", "attempt": 1, "time": 1104.0, "steps": 7}]
    res = report.analyse(recs)
    assert [a["attempt"] for a in res["attempts"]] == [1, 2]
    assert [a["ended"] for a in res["attempts"]] == ["end", "end"]
    assert res["restart_count"] == 0 and res["restarts"] == [] and res["lost_steps_per_failure"] == []
    assert res["steps"] == 7 and res["lost_steps"] == 0 and res["finished"]
    assert res["wall"] == {"wall_s": 11.5, "productive_s": 5.25, "ckpt_s": 0.875, "data_s": 0.875,
                           "lost_s": 0.0, "restart_s": 0.0, "startup_s": 3.5, "other_s": 1.0}
    assert res["goodput"] == 5.25 / 11.5
    assert any("numbered here in file order" in n for n in res["notes"])
    assert any("92.5 s between a finished launch" in n for n in res["notes"])


def test_step_time_quantiles():
    # steps of 1/8 .. 10/8 s in shuffled order, all compute but 1/16 s of data wait each
    order = [7, 2, 10, 1, 5, 9, 3, 8, 4, 6]
    recs, t = [_start(1, 0.0, 1.0, 0)], 1.0
    for i, n in enumerate(order):
        t += n / 8
        recs.append(_step(i, 1, t, step_s=n / 8, compute=n / 8 - 1 / 16, comm=0.0, ckpt=0.0, data=1 / 16))
    res = report.analyse(recs)
    step = res["split"]["step"]
    assert (step["per_step_s"], step["p50_s"], step["p90_s"], step["max_s"]) == (55 / 80, 5 / 8, 9 / 8, 10 / 8)
    data = res["split"]["data"]
    assert (data["s"], data["p50_s"], data["max_s"]) == (10 / 16, 1 / 16, 1 / 16)
    row = next(line for line in report.format_table(res).splitlines() if line.startswith("step "))
    assert row.split() == ["step", "6.88", "100.0", "687.5", "625.0", "1125.0", "1250.0"]


def test_failure_not_resumed():
    recs = clean_run()[:-1] + [{"event": "fail", "attempt": 1, "step": 5, "rank": 2, "time": 1008.0}]
    res = report.analyse(recs)
    (att,) = res["attempts"]
    assert (att["ended"], att["resumed"], att["fail_time"], att["fail_rank"]) == ("failure", False, 1008.0, 2)
    assert res["restart_count"] == 0 and res["lost_steps_per_failure"] == [] and res["finished"] is False
    assert res["wall"]["wall_s"] == 8.0 and res["wall"]["other_s"] == 1.0
    assert "failure at step 5, rank 2 (not resumed)" in report.format_table(res)


def test_unfinished_run_ends_at_last_record():
    recs = restart_run()[:-1]  # no end record
    res = report.analyse(recs)
    assert not res["finished"] and res["attempts"][-1]["ended"] == "unfinished"
    assert res["wall"]["wall_s"] == 25.5 and res["goodput"] == 8.0 / 25.5
    assert any("did not finish" in n for n in res["notes"])


def test_old_format_steps_without_split_are_compute():
    recs = [{"step": i, "loss": 4.0, "lr": 1e-3, "grad_norm": 1.0, "step_s": 0.5, "time": 100.0 + 0.5 * i}
            for i in range(4)]
    res = report.analyse(recs)
    assert res["split"]["compute"]["s"] == 2.0 and res["split"]["compute"]["pct"] == 100.0
    assert res["split"]["comm"]["s"] == 0.0
    assert any("counted as compute" in n for n in res["notes"])
    assert any("no launch time" in n for n in res["notes"])
    assert res["wall"]["wall_s"] == 2.0 and res["goodput"] == 1.0  # from the first step's begin


def test_old_format_without_timing_or_attempts():
    # what the main job wrote before step timing: step, loss, lr, grad_norm, appended on --resume
    steps = [0, 1, 2, 3, 1, 2, 3, 4]
    recs = [{"step": i, "loss": 4.0 - 0.1 * i, "lr": 1e-3, "grad_norm": 1.0} for i in steps]
    res = report.analyse(recs)
    assert len(res["attempts"]) == 2 and res["restart_count"] == 1
    assert res["attempts"][0]["lost_steps"] == 3 and res["lost_steps_per_failure"] == [3]
    assert res["steps"] == 5 and res["split"] is None and res["goodput"] is None
    assert any("inferred" in n for n in res["notes"]) and any("no step_s" in n for n in res["notes"])
    assert res["finished"] is None and any("not recorded" in n for n in res["notes"])


def test_empty_records():
    res = report.analyse([])
    assert res["attempts"] == [] and res["goodput"] is None and res["steps"] == 0
    assert "no records to report" in report.format_table(res)


# ---------------------------------------------------------------------------
# reading the file: torn lines
# ---------------------------------------------------------------------------


def test_torn_last_line_is_skipped_with_a_note(tmp_path, capsys):
    d = _write(tmp_path, clean_run()[:-1], tail='{"step": 5, "attempt": 1, "time": 10')
    records, notes = report.read_metrics(str(d / "metrics.jsonl"))
    assert len(records) == 6 and len(notes) == 1 and notes[0].startswith("last line")
    assert report.main([str(d), "--no-png"]) == 0
    out = capsys.readouterr().out
    assert "note: last line" in out and "no end record" in out


def test_torn_line_followed_by_the_next_attempts_record(tmp_path):
    # a writer killed mid-line, then the restarted attempt appends to the same line
    recs = restart_run()
    k = recs.index(next(r for r in recs if r.get("event") == "start" and r["attempt"] == 2))
    body = "".join(json.dumps(r) + "\n" for r in recs[:k - 1])  # drop the fail record...
    body += '{"step": 6, "attempt": 1, "loss": 3.' + json.dumps(recs[k]) + "\n"  # ...and tear
    body += "".join(json.dumps(r) + "\n" for r in recs[k + 1:])
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text(body)
    records, notes = report.read_metrics(str(d / "metrics.jsonl"))
    assert len(records) == len(recs) - 1 and len(notes) == 1 and "kept" in notes[0]
    res = report.analyse(records)
    assert res["restarts"][0]["restore_source"] == "memory" and res["restarts"][0]["process_start_s"] == 2.0
    assert res["attempts"][0]["fail_source"] == "last step record"


# ---------------------------------------------------------------------------
# the table, --json, the PNG, errors
# ---------------------------------------------------------------------------


def test_table_shows_the_numbers(tmp_path, capsys):
    d = _write(tmp_path, restart_run())
    assert report.main([str(d), "--no-png"]) == 0
    out = capsys.readouterr().out
    assert f"goodput {100 * 8.0 / 26:.1f} %" in out
    assert "2 restarts" in out and "10 steps counted, finished" in out
    lines = out.splitlines()
    restarts = lines.index(next(line for line in lines if line.startswith("Restarts")))
    row = next(line for line in lines[restarts:] if "memory@4" in line)
    assert row.split() == ["2", "+8.5", "s", "1.50", "1.50", "0.25", "memory@4", "1.50", "0.25", "5.00"]
    row = next(line for line in lines[restarts:] if "disk@6" in line)
    assert row.split() == ["3", "+16.5", "s", "2.00", "1.00", "2.00", "disk@6", "1.00", "0.00", "6.00"]
    attempts = lines.index("Attempts")
    att = [line.split() for line in lines[attempts:restarts] if line.split()[:1] in (["1"], ["2"], ["3"])]
    assert att[0][:9] == ["1", "+0.0", "s", "0", "none", "6", "5", "2", "2.00"]
    assert " ".join(att[0][9:]) == "failure at step 6, rank 1"
    assert att[1][:9] == ["2", "+10.0", "s", "4", "memory@4", "4", "7", "2", "2.00"]
    assert " ".join(att[1][9:]) == "failure after step 7 (no fail record)"
    assert att[2] == ["3", "+18.5", "s", "6", "disk@6", "4", "9", "0", "0.00", "finished"]
    compute = next(line for line in lines if line.startswith("compute "))
    assert compute.split() == ["compute", "5.50", f"{100 * 5.5 / 10.5:.1f}", "550.0", "500.0", "500.0", "1000.0"]
    assert next(line for line in lines if line.startswith("lost steps")).split()[-2:] == ["4.00", "15.4"]
    assert next(line for line in lines if line.startswith("wall ")).split()[-2:] == ["26.00", "100.0"]


def test_json_output(tmp_path, capsys):
    d = _write(tmp_path, restart_run())
    assert report.main([str(d), "--json", "--no-png"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["goodput"] == 8.0 / 26 and res["lost_steps_per_failure"] == [2, 2]
    assert res["restarts"][1]["restore_source"] == "disk" and "series" not in res


@pytest.mark.parametrize("make", [clean_run, restart_run], ids=["clean", "restarts"])
def test_png_is_written_and_opens(tmp_path, capsys, make):
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (requirements-dev.txt)")
    import matplotlib.image

    d = _write(tmp_path, make())
    assert report.main([str(d)]) == 0
    png = d / "report.png"
    data = png.read_bytes()
    assert len(data) > 0 and data[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(str(png))
    assert img.shape[:2] == (700, 1200)
    assert f"figure: {png}" in capsys.readouterr().out
    assert not (d / "report.png.tmp").exists()


def test_png_elsewhere_and_for_an_old_run(tmp_path):
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (requirements-dev.txt)")
    import matplotlib.image

    d = _write(tmp_path, [{"step": i, "loss": 4.0} for i in (0, 1, 2, 1, 2)])
    out = tmp_path / "fig.png"
    assert report.main([str(d), "--png", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_SIGNATURE and matplotlib.image.imread(str(out)).shape[:2] == (700, 1200)
    assert not (d / "report.png").exists()


def test_without_matplotlib_the_table_still_prints(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib(.x) -> ImportError
    monkeypatch.delitem(sys.modules, "ichiban_comm.report.plot", raising=False)
    d = _write(tmp_path, clean_run())
    assert report.main([str(d)]) == 0
    cap = capsys.readouterr()
    assert "goodput" in cap.out and "matplotlib is not installed" in cap.err
    assert not (d / "report.png").exists()
    assert report.main([str(d), "--png", str(tmp_path / "x.png")]) == 1  # asked for: an error


def test_missing_run_dir(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert report.main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "not a directory" in err


def test_run_dir_without_metrics(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty" / "metrics.jsonl") in err


def test_metrics_that_is_no_file_or_unreadable(tmp_path, capsys, monkeypatch):
    from ichiban_comm.report import cli

    d = tmp_path / "run"
    (d / "metrics.jsonl").mkdir(parents=True)
    assert report.main([str(d), "--no-png"]) == 2
    assert str(d / "metrics.jsonl") in capsys.readouterr().err

    (tmp_path / "b").mkdir()
    d = _write(tmp_path / "b", clean_run())

    def eio(path):
        raise OSError(5, "Input/output error", path)

    monkeypatch.setattr(cli, "read_metrics", eio)  # root reads a mode-000 file: fake the error
    assert report.main([str(d), "--no-png"]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {d / 'metrics.jsonl'}: Input/output error" in err


def test_unwritable_png_path(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (requirements-dev.txt)")
    d = _write(tmp_path, clean_run())
    assert report.main([str(d), "--png", str(tmp_path / "no" / "dir" / "x.png")]) == 1
    assert "figure not written" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # matplotlib, absurd axes
def test_damaged_records_never_crash(tmp_path):
    """Keys dropped or given wrong types, records reordered: analyse(), the table and strict
    JSON still come out (numbers that cannot be computed are None), never an exception."""
    import random

    rng = random.Random(0)
    junk = [None, "x", -1, 0, 1e308, float("nan"), float("inf"), [], {}, True, 2**70]
    base = restart_run()
    plot = None
    try:
        from ichiban_comm.report.plot import write_png as plot
    except ImportError:
        pass
    for case in range(300):
        recs = [dict(r) for r in base]
        for r in recs:
            for key in list(r):
                roll = rng.random()
                if roll < 0.08:
                    del r[key]
                elif roll < 0.16:
                    r[key] = rng.choice(junk)
        if rng.random() < 0.3:
            rng.shuffle(recs)
        res = report.analyse(recs)
        assert isinstance(report.format_table(res, "run"), str)
        json.dumps({k: v for k, v in res.items() if k != "series"}, allow_nan=False)
        if plot is not None and case % 30 == 0:
            plot(res, str(tmp_path / f"{case}.png"))
            assert (tmp_path / f"{case}.png").read_bytes()[:8] == PNG_SIGNATURE


def test_python_dash_m_entry_point(tmp_path, capsys, monkeypatch):
    import runpy

    d = _write(tmp_path, clean_run())
    monkeypatch.setattr(sys, "argv", ["python -m ichiban_comm.report", str(d), "--no-png"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("ichiban_comm.report", run_name="__main__", alter_sys=False)
    assert exit_.value.code == 0 and "goodput 50.0 %" in capsys.readouterr().out
