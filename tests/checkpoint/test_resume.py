"""Resuming training from a checkpoint reproduces the uninterrupted run exactly.

    python -m pytest -q tests/checkpoint/test_resume.py
"""

import torch

from ichiban_comm.checkpoint import AsyncCheckpointer


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.1), torch.nn.GELU(),
                                torch.nn.Linear(32, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _step(model, opt):
    x = torch.randn(8, 16)             # data and dropout both draw from the global RNG
    loss = (model(x) - x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_resume_reproduces_loss_curve(tmp_path):
    steps, every = 12, 4
    model, opt = _setup()
    reference = [_step(model, opt) for _ in range(steps)]

    model, opt = _setup()
    ck = AsyncCheckpointer(tmp_path, keep_last=2)
    for step in range(7):              # "crashes" after step 7, last checkpoint at 4
        _step(model, opt)
        if (step + 1) % every == 0:
            ck.save(step + 1, {"model": model.state_dict(), "optim": opt.state_dict(), "step": step + 1},
                    rank_state={"rng": torch.get_rng_state()})
    ck.close()

    model, opt = _setup()              # a fresh process would start here
    ck = AsyncCheckpointer(tmp_path, keep_last=2)
    state = ck.load(into={"model": model.state_dict()})
    opt.load_state_dict(state["optim"])
    torch.set_rng_state(ck.load_rank_state()["rng"])
    resumed = [_step(model, opt) for _ in range(state["step"], steps)]
    ck.close()
    assert state["step"] == 4
    assert resumed == reference[4:]
