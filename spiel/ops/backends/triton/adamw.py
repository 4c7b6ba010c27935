"""Triton fused AdamW with per-slot step counts (backend "triton" of ``spiel.ops.adamw_step_``).

One launch updates every tensor of the call: the grid is (blocks of the largest tensor, tensors); program
(b, i) reads row i of a device table of (param, grad, exp_avg, exp_avg_sq, step) addresses and the tensor's
numel, and updates elements [b * BLOCK, (b + 1) * BLOCK) of tensor i (programs past the end exit at once).
Each element is read once and written once: 32 B per fp32 delta with fp32 moments and int16 counts.

The table is a pure function of the tensors' addresses and sizes; it is memoised (a few small device tensors,
least recently used dropped) so a steady training loop uploads it once, not every step. On a miss the table is
uploaded from pinned memory without a host sync.
"""
from __future__ import annotations

import collections
import math

import torch
import triton
import triton.language as tl

from ..._dispatch import register_kernel
from ...adamw import adamw_step_limit, bump_host_counts, host_count_groups, is_host_count

BLOCK = 2048            # elements per program
NUM_WARPS = 8
MAX_TENSORS = 65535     # grid dimension 1 limit: larger calls are split
_TABLE_CACHE_SIZE = 8
_tables: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
             torch.int16: tl.int16, torch.int32: tl.int32}


@triton.jit
def _adamw_kernel(table_ptr, lr, one_minus_beta1, beta2, one_minus_beta2, log2_beta1, log2_beta2, eps, decay,
                  last_count, host_count, P_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                  HOST_COUNT: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    row = table_ptr + tl.program_id(1) * 6
    numel = tl.load(row + 5)
    start = tl.program_id(0) * BLOCK
    if start < numel:
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
        m_ptr = tl.load(row + 2).to(tl.pointer_type(M_DTYPE))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(M_DTYPE))
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HOST_COUNT:  # one count for the tensor, incremented on the host after the launch
            t = tl.full([BLOCK], host_count, tl.float32)
        else:
            s_ptr = tl.load(row + 4).to(tl.pointer_type(S_DTYPE))
            t = tl.load(s_ptr + offs, mask=mask, other=0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.minimum(t, last_count) + 1.0
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * (g * g)
        p = p * decay
        # bias corrections per element (its own count); exp2's error is of the order of fp32 pow's
        bias1 = 1.0 - tl.exp2(t * log2_beta1)
        bias2 = 1.0 - tl.exp2(t * log2_beta2)
        denom = tl.div_rn(tl.sqrt_rn(v), tl.sqrt_rn(bias2)) + eps
        update = tl.div_rn(m, denom * bias1)
        p = tl.where(lr != 0.0, p - lr * update, p)
        tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)
        tl.store(m_ptr + offs, m.to(M_DTYPE), mask=mask)
        tl.store(v_ptr + offs, v.to(M_DTYPE), mask=mask)
        if not HOST_COUNT:
            tl.store(s_ptr + offs, t.to(S_DTYPE), mask=mask)


def _table(tensors, device: torch.device) -> torch.Tensor:
    """int64 [n, 6]: (param, grad, exp_avg, exp_avg_sq, step) addresses and numel per tensor, on ``device``."""
    flat = []
    for p, g, m, v, s in tensors:  # a host count has no device address (0: never read)
        flat += (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), 0 if is_host_count(s) else s.data_ptr(),
                 p.numel())
    key = (str(device), tuple(flat))
    table = _tables.get(key)
    if table is not None:
        _tables.move_to_end(key)
        return table
    table = torch.tensor(flat, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    _tables[key] = table
    while len(_tables) > _TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return table


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0.0 else -math.inf


@register_kernel("adamw_step", "triton")
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize) -> None:
    work = [row for row in zip(params, grads, exp_avgs, exp_avg_sqs, steps) if row[0].numel()]
    if not work:
        # a per-tensor count advances for every tensor, empty ones included (as the other backends)
        bump_host_counts([s for s in steps if is_host_count(s)])
        return
    device = work[0][0].device
    p_dtype, m_dtype, s_dtype = _TL_DTYPE[work[0][0].dtype], _TL_DTYPE[work[0][2].dtype], _TL_DTYPE[work[0][4].dtype]
    last_count = float(adamw_step_limit(work[0][4].dtype) - 1)
    host = is_host_count(work[0][4])  # the op hands in lists of one kind of count
    # per-slot counts: one pass over everything; per-tensor host counts: one pass per distinct count
    passes = host_count_groups([row[4] for row in work]) if host else [(0.0, range(len(work)))]
    for count, sel in passes:
        rows = [work[i] for i in sel]
        for lo in range(0, len(rows), MAX_TENSORS):
            chunk = rows[lo:lo + MAX_TENSORS]
            table = _table(chunk, device)
            blocks = triton.cdiv(max(row[0].numel() for row in chunk), BLOCK)
            _adamw_kernel[(blocks, len(chunk))](
                table, float(lr), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), _log2(beta1), _log2(beta2),
                float(eps), 1.0 - float(lr) * float(weight_decay), last_count, float(count),
                P_DTYPE=p_dtype, M_DTYPE=m_dtype, S_DTYPE=s_dtype, HOST_COUNT=host, MAXIMIZE=bool(maximize),
                BLOCK=BLOCK, num_warps=NUM_WARPS)
    if host:
        bump_host_counts(list(steps))  # every tensor's count, empty ones included (as the other backends)
