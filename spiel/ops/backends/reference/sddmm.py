"""Reference (pure PyTorch) delta gradient: a gather-dot in chunks of entries (memory O(k + T * chunk)), or,
above 1/64 density, the dense product in bounded row bands (memory O(k + band)).

result[j] = sum_t grad_output[t, r_j] * input[t, c_j] with r_j = indices[j] // in, c_j = indices[j] % in,
accumulated in fp32 (float64 for float64 inputs). The plan is not needed here (ignored).
"""
import torch

from ..._dispatch import register_kernel

_BUDGET = 1 << 22  # elements of each gathered [T, chunk] operand (16 MiB in fp32)


# Above this density the reference takes the dense product in row bands (a BLAS GEMM per band of at most
# _BUDGET elements, then a gather): per requested entry a gather-dot costs ~2 T scattered reads, a GEMM row
# costs in * T / (BLAS speed-up ~50-100x); at LoRA-like densities (2-3%) bands are 5-10x faster on a CPU.
_BAND_DENSITY = 1.0 / 64


def _matmul_exact(a, b):
    """a @ b in the operands' dtype, never TF32 (the reference must not lose fp32 precision)."""
    if a.is_cuda and a.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return a @ b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = True
    return a @ b


def _banded(grad_output, input, idx, in_features, acc):
    """The entries from row bands of the dense product (memory O(k + band); any index order)."""
    out_features = grad_output.shape[1]
    rows_per_band = max(1, _BUDGET // max(in_features, 1))
    rows = torch.div(idx, in_features, rounding_mode="floor")
    cols = idx - rows * in_features
    x = input.to(acc)
    result = torch.zeros(idx.numel(), dtype=acc, device=grad_output.device)
    for r0 in range(0, out_features, rows_per_band):
        r1 = min(out_features, r0 + rows_per_band)
        inside = (rows >= r0) & (rows < r1)
        band = _matmul_exact(grad_output[:, r0:r1].to(acc).t(), x)  # [r1 - r0, in]
        local = ((rows - r0).clamp(0, r1 - r0 - 1) * in_features + cols)
        result = torch.where(inside, band.view(-1).index_select(0, local), result)
    return result


@register_kernel("sddmm", "torch")
def sddmm(grad_output, input, indices, out_features, in_features, plan):
    acc = torch.float64 if grad_output.dtype == torch.float64 else torch.float32
    k = indices.numel()
    T = grad_output.shape[0]
    result = torch.empty(k, dtype=acc, device=grad_output.device)
    if k == 0:
        return result
    if T == 0:
        return result.zero_()
    idx = indices.reshape(-1).long()
    if k >= _BAND_DENSITY * out_features * in_features:
        return _banded(grad_output, input, idx, in_features, acc)
    chunk = max(1, min(1 << 12, _BUDGET // T))
    for start in range(0, k, chunk):
        part = idx[start:start + chunk]
        rows = grad_output.index_select(1, part // in_features).to(acc)
        cols = input.index_select(1, part % in_features).to(acc)
        result[start:start + part.numel()] = (rows * cols).sum(0)
    return result
