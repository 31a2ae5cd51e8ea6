"""python -m ichiban_comm.checkpoint inspect|verify|export

    python -m pytest -q tests/checkpoint/test_cli.py
"""

import json
import os

import pytest
import torch

from ichiban_comm.checkpoint import AsyncCheckpointer
from ichiban_comm.checkpoint import _layout as layout
from ichiban_comm.checkpoint.__main__ import main

from _states import assert_same, make_state


@pytest.fixture()
def saved(tmp_path):
    root = tmp_path / "ck"
    states = {s: make_state(s) for s in (1, 2)}
    with AsyncCheckpointer(root, compression="zstd") as ck:
        for s, st in states.items():
            ck.save(s, st)
    return str(root), states


def test_inspect(saved, capsys):
    root, states = saved
    assert main(["inspect", root]) == 0
    out = capsys.readouterr().out
    assert "step 2" in out and "model.w " in out and "bfloat16" in out and "older committed steps: [1]" in out
    assert main(["inspect", layout.step_dir(root, 1), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 1 and info["compression"] == "zstd"
    names = {t["name"] for t in info["tensors"]}
    assert {"model.w", "views.rows", "optim.state.0.exp_avg"} <= names
    assert info["state"]["step"] == 1 and info["state"]["model"]["w"].startswith("<tensor")


def test_verify_ok_and_corrupt(saved, capsys):
    root, _ = saved
    assert main(["verify", root, "--all"]) == 0
    assert capsys.readouterr().out.count("OK") == 2
    m = layout.read_manifest(root, 1)
    fname, foff, stored = m["tensors"][0]["shards"][0]["chunks"][0][:3]
    path = os.path.join(layout.step_dir(root, 1), fname)
    data = bytearray(open(path, "rb").read())
    data[foff] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert main(["verify", root, "--all"]) == 1
    out = capsys.readouterr().out
    assert "step 1: FAILED" in out and fname in out and "step 2: OK" in out
    assert main(["verify", str(os.path.dirname(root)) + "/nope"]) == 2


def test_export_torch(saved, tmp_path):
    root, states = saved
    out = str(tmp_path / "state.pt")
    assert main(["export", root, out, "--step", "1"]) == 0
    assert_same(states[1], torch.load(out, weights_only=False))


def test_export_safetensors(saved, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    root, states = saved
    out = str(tmp_path / "state.safetensors")
    assert main(["export", root, out]) == 0
    loaded = load_file(out)
    assert torch.equal(loaded["model.w"], states[2]["model"]["w"])
    assert torch.equal(loaded["views.rows"], states[2]["views"]["rows"])
