"""``spiel.ops.index_put_many_`` / ``index_select_many`` on the reference backend: the loops they stand for,
schemas (opcheck), bad input. The CUDA kernel is compared with this backend in tests/gpu/test_cuda_merge.py."""
import pytest
import torch

import spiel.ops as ops


def _case(dtype, index_dtype, g, count=5):
    shapes = [(3, 5), (1, 1), (7, 11), (2, 64), (5, 7)][:count]
    dense = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    ks = [min(s[0] * s[1], j * 3) for j, s in enumerate(shapes)]  # one empty
    idxs = [torch.randperm(s[0] * s[1], generator=g)[:k].to(index_dtype) for s, k in zip(shapes, ks)]
    vals = [torch.randn(k, generator=g).to(dtype) for k in ks]
    return dense, idxs, vals


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_matches_the_loops(dtype, index_dtype):
    g = torch.Generator().manual_seed(0)
    dense, idxs, vals = _case(dtype, index_dtype, g)
    want = [d.clone() for d in dense]
    for w, i, v in zip(want, idxs, vals):
        w.view(-1)[i.long()] = v
    ops.index_put_many_(dense, idxs, vals)
    for d, w in zip(dense, want):
        assert torch.equal(d, w)
    got = ops.index_select_many(dense, idxs)
    for o, d, i in zip(got, dense, idxs):
        assert o.dtype == dtype and torch.equal(o, d.view(-1)[i.long()])
    out = [torch.full((i.numel(),), float("nan"), dtype=dtype) for i in idxs]
    assert ops.index_select_many(dense, idxs, out) == out
    for o, d, i in zip(out, dense, idxs):
        assert torch.equal(o, d.view(-1)[i.long()])
    ops.index_put_many_([], [], [])
    assert ops.index_select_many([], []) == []


def test_bad_input():
    g = torch.Generator().manual_seed(1)
    dense, idxs, vals = _case(torch.float32, torch.int32, g)
    with pytest.raises(ValueError, match="same length"):
        ops.index_put_many_(dense, idxs[:-1], vals)
    with pytest.raises(TypeError, match=r"values\[1\]"):
        ops.index_put_many_(dense, idxs, [vals[0], vals[1].double()] + vals[2:])
    with pytest.raises(TypeError, match=r"indices\[2\] must have"):
        ops.index_put_many_(dense, idxs[:2] + [idxs[2].long()] + idxs[3:], vals)
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.index_select_many(dense, [i.float() for i in idxs])
    with pytest.raises(ValueError, match=r"indices\[0\] must lie in \[0, 15\)"):
        ops.index_put_many_(dense, [torch.tensor([15], dtype=torch.int32)] + idxs[1:], [torch.ones(1)] + vals[1:])
    with pytest.raises(ValueError, match="contiguous"):
        ops.index_put_many_([dense[2].t()], [idxs[2]], [vals[2]])
    with pytest.raises(ValueError, match="1-D of one length"):
        ops.index_put_many_([dense[2]], [idxs[2]], [vals[2][:-1]])
    with pytest.raises(TypeError, match="list of tensors"):
        ops.index_select_many(dense[0], idxs)


def test_opcheck():
    g = torch.Generator().manual_seed(2)
    dense, idxs, vals = _case(torch.float32, torch.int64, g)
    torch.library.opcheck(torch.ops.spiel.index_put_many_.default, (dense, idxs, vals))
    out = [torch.empty(i.numel()) for i in idxs]
    torch.library.opcheck(torch.ops.spiel.index_select_many.default, (dense, idxs, out))
