"""The tensor-parallel layers one by one against their unsplit torch modules (two real processes
over gloo; the model-level tests run "ichiban"), and ShardSpec's slicing.

    .venv/bin/python -m pytest tests/parallel/test_layers.py -q
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spawn import run_workers

from ichiban_comm.parallel.layers import ShardSpec

TOL = dict(rtol=1e-5, atol=1e-6)  # float32, a handful of products summed in another order


@pytest.mark.parametrize("dim,parts,tp", [(0, 1, 2), (0, 3, 2), (1, 2, 4), (1, 1, 3)])
def test_shard_spec_slices_and_reassembles(dim, parts, tp):
    shape = [6 * tp, 12 * tp]
    full = torch.randn(shape)
    specs = [ShardSpec(dim, parts, tp, r, tuple(shape)) for r in range(tp)]
    pieces = [s.local(full) for s in specs]
    assert all(p.shape == specs[0].local_shape for p in pieces)
    torch.testing.assert_close(specs[0].full(pieces), full, rtol=0, atol=0)
    if parts == 3:  # rank r holds its rows of q, of k and of v
        q, k, v = full.chunk(3, dim=dim)
        mine = torch.cat([t.chunk(tp, dim=dim)[1] for t in (q, k, v)], dim=dim)
        torch.testing.assert_close(pieces[1], mine)


def _grads_full(mod, names, group):
    from ichiban_comm.parallel import gather_full

    return {n: gather_full(getattr(mod, n).grad, getattr(getattr(mod, n), "tp_shard", None), group)
            for n in names}


def _layers_body(rank, world):
    import torch.distributed as dist

    from ichiban_comm.parallel.layers import (ColumnParallelLinear, ParallelLMHead,
                                              RowParallelLinear, VocabParallelEmbedding,
                                              gather_sequence, reduce_scatter_sequence,
                                              scatter_sequence)

    g = dist.new_group(list(range(world)))
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, requires_grad=True)
    gy = torch.randn(2, 8, 12)

    # column then row, with the overlap on and off, against nn.Linear
    lin1, lin2 = nn.Linear(16, 24), nn.Linear(24, 12)
    ref = lin2(F.gelu(lin1(x)))
    ref.backward(gy)
    ref_dx = x.grad.clone()
    for overlap in (True, False):
        x.grad = None
        col = ColumnParallelLinear.from_module(lin1, g)
        col.overlap = overlap
        row = RowParallelLinear.from_module(lin2, g)
        y = row(F.gelu(col(x)))
        torch.testing.assert_close(y, ref, **TOL)
        y.backward(gy)
        torch.testing.assert_close(x.grad, ref_dx, **TOL)
        for mod, lin in ((col, lin1), (row, lin2)):
            got = _grads_full(mod, ["weight", "bias"], g)
            torch.testing.assert_close(got["weight"], lin.weight.grad, **TOL)
            torch.testing.assert_close(got["bias"], lin.bias.grad, **TOL)

    # sequence parallel: scatter -> gather is the identity; reduce-scatter sums the slices
    s = scatter_sequence(x, g)
    assert s.shape == (2, 8 // world, 16)
    torch.testing.assert_close(gather_sequence(s, g), x, rtol=0, atol=0)
    parts = reduce_scatter_sequence(x * (rank + 1), g)
    torch.testing.assert_close(parts, x.chunk(world, 1)[rank] * sum(range(1, world + 1)), **TOL)

    # vocabulary-parallel embedding (with a padding row) and head against the unsplit modules
    emb = nn.Embedding(32, 16, padding_idx=3)
    ids = torch.tensor([[0, 3, 17, 31, 8, 16, 15, 3]])
    ref_e = emb(ids)
    ref_e.sum().backward()
    pe = VocabParallelEmbedding.from_module(emb, g)
    out = pe(ids)
    torch.testing.assert_close(out, ref_e, rtol=0, atol=0)
    out.sum().backward()
    torch.testing.assert_close(_grads_full(pe, ["weight"], g)["weight"], emb.weight.grad, **TOL)
    assert float(emb.weight.grad[3].abs().sum()) == 0.0

    head = nn.Linear(16, 32, bias=False)
    h = torch.randn(10, 16, requires_grad=True)
    t = torch.randint(0, 32, (10,))
    t[4] = -100
    ref_l = F.cross_entropy(head(h), t)
    ref_l.backward()
    ref_dh = h.grad.clone()
    h.grad = None
    ph = ParallelLMHead.from_module(head, g)
    loss = ph.loss(h, t)
    torch.testing.assert_close(loss, ref_l, **TOL)
    loss.backward()
    torch.testing.assert_close(h.grad, ref_dh, **TOL)
    torch.testing.assert_close(_grads_full(ph, ["weight"], g)["weight"], head.weight.grad, **TOL)
    torch.testing.assert_close(ph(h), head(h), **TOL)  # gathered logits

    # errors name the numbers
    for make, words in ((lambda: ColumnParallelLinear.from_module(nn.Linear(4, 9), g, parts=3),
                         "out_features=9 (3 fused parts of 3) is not divisible by tp=2"),
                        (lambda: VocabParallelEmbedding(1, 4, g),   # (33 is padded to 34)
                         "vocabulary size 1 is too small for tp=2")):
        with pytest.raises(ValueError, match=r".*") as e:
            make()
        assert words in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="sequence length 7 .* not divisible by tp=2"):
        scatter_sequence(torch.randn(1, 7, 4), g)
    return True


def test_layers_match_unsplit_modules_gloo():
    assert run_workers(_layers_body, 2, backend="gloo", timeout=120,
                       env={"TRITON_INTERPRET": "0"}) == [True, True]
