"""Reference (pure PyTorch) delta gradient, in chunks of entries so memory stays O(k + T * chunk).

result[j] = sum_t grad_output[t, r_j] * input[t, c_j] with r_j = indices[j] // in, c_j = indices[j] % in,
accumulated in fp32 (float64 for float64 inputs). The plan is not needed here (ignored).
"""
import torch

from ..._dispatch import register_kernel

_BUDGET = 1 << 22  # elements of each gathered [T, chunk] operand (16 MiB in fp32)


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
    chunk = max(1, min(1 << 12, _BUDGET // T))
    idx = indices.reshape(-1).long()
    for start in range(0, k, chunk):
        part = idx[start:start + chunk]
        rows = grad_output.index_select(1, part // in_features).to(acc)
        cols = input.index_select(1, part % in_features).to(acc)
        result[start:start + part.numel()] = (rows * cols).sum(0)
    return result
