"""Random training-like states shared by the checkpoint tests."""

import collections

import torch


def make_state(seed: int, scale: int = 1):
    """A nest with every kind of leaf the checkpointer supports (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64 * scale, 48, generator=g)
    base = torch.randn(40, 30, generator=g)
    emb = torch.randn(33, 16, generator=g).to(torch.bfloat16)
    state = {
        "model": collections.OrderedDict([
            ("w", w),
            ("w_t_view", torch.randn(48, 96, generator=g).t()[::2, 1:]),   # non-contiguous
            ("emb", emb),
            ("emb_tied", emb),                                            # same tensor twice
            ("half", torch.randn(7, 5, generator=g).half()),
            ("idx", torch.randint(-1000, 1000, (123,), generator=g)),
            ("mask", torch.rand(17, generator=g) > 0.5),
            ("scalar", torch.tensor(3.25)),
            ("empty", torch.empty(0, 4)),
            ("cplx", torch.randn(6, generator=g, dtype=torch.complex64)),
        ]),
        "views": {"base": base, "rows": base[3:9], "cols": base[:, 5:11]},  # share storage
        "optim": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.randn(64 * scale, 48, generator=g)}},
                  "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "foreach": None,
                                    "params": [0], "name": "decay"}]},
        "step": seed,
        "rng": torch.get_rng_state(),
        "misc": [1, 2.5, float("nan"), float("-inf"), "text", b"\x00\xff", None, True,
                 torch.float16, torch.device("cpu"), torch.Size([2, 3]), (1, (2, 3))],
    }
    return state


def assert_same(a, b, path="state"):
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert bits_equal(a, b), f"{path}: values differ"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, f"{path}: nan expected"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (nan-safe), independent of layout."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
