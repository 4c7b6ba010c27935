"""The single-plan build of sessions 3-8, kept as the specification of :func:`spiel.ops.backends.sddmm_plan.build_plans`
(the batched build must produce the same plans, element for element)."""
from typing import Optional, Tuple

import torch

from spiel.ops.backends.sddmm_plan import (E_MAX, H_IN, H_K, H_LEVEL_C, H_LEVEL_R, H_MAGIC, H_NC, H_NCTILES, H_NITEMS,
                                           H_NR, H_NTILES, H_OUT, H_SPAN, HDR, MAGIC, SB, STRATEGIES, TILE, _cdiv,
                                           _pick, balance_plans, choose_levels, cuda_wgmma, encode, estimate_costs,
                                           grid_dims, layout)


def _group(keys_sorted_tile: torch.Tensor, nt: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the tile id of each entry in sorted order: (tile_list [nt], tile_ptr [nt+1], tile_slot [nt], count)."""
    dev = keys_sorted_tile.device
    k = keys_sorted_tile.numel()
    pos = torch.arange(k, device=dev)
    start = torch.ones(k, dtype=torch.bool, device=dev)
    if k > 1:
        start[1:] = keys_sorted_tile[1:] != keys_sorted_tile[:-1]
    slot = torch.cumsum(start.to(torch.int64), 0) - 1
    count = slot[-1:] + 1 if k else torch.zeros(1, dtype=torch.int64, device=dev)
    dummy = torch.full_like(slot, nt + 1)
    where = torch.where(start, slot, dummy)
    tile_list = torch.zeros(nt + 2, dtype=torch.int64, device=dev).scatter_(0, where, keys_sorted_tile)[:nt]
    tile_ptr = torch.full((nt + 2,), k, dtype=torch.int64, device=dev).scatter_(0, where, pos)[:nt + 1]
    slot_of = torch.full((nt + 1,), -1, dtype=torch.int64, device=dev)
    slot_of.scatter_(0, torch.where(start, keys_sorted_tile, torch.full_like(slot, nt)), slot)
    return tile_list, tile_ptr, slot_of[:nt], count


def _used(idx: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(list [n] of used values ascending padded with 0, rank map [n] (value -> rank), count [1])."""
    dev = idx.device
    present = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    present.scatter_(0, idx, torch.ones_like(idx))
    present = present[:n]
    rank = torch.cumsum(present, 0) - 1
    count = present.sum().reshape(1)
    where = torch.where(present.bool(), rank, torch.full_like(rank, n))
    lst = torch.zeros(n + 1, dtype=torch.int64, device=dev).scatter_(0, where, torch.arange(n, device=dev))[:n]
    return lst, rank.clamp(min=0), count


def build_plan_reference(indices: torch.Tensor, out_features: int, in_features: int, *,
                         triton: Optional[str] = None, cuda: Optional[str] = None, compaction: bool = True,
                         T_hint: int = 4096, balance: bool = True) -> torch.Tensor:
    """``sddmm_plan.build_plan`` as of session 8 (one plan, one read-back), unchanged: same arguments."""
    out_features, in_features = int(out_features), int(in_features)
    dev = indices.device
    k = indices.numel()
    if k >= 2**31 - 1:
        raise ValueError("sddmm plan: more than 2**31 - 2 indices")
    for name in (triton, cuda):
        if name is not None and name not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    lay = layout(k, out_features, in_features)
    ntr, ntc = grid_dims(out_features, in_features)
    nt = ntr * ntc
    nsbc = _cdiv(ntc, SB)
    i64 = torch.int64
    idx = indices.reshape(-1).to(i64)
    r = idx // in_features
    c = idx - r * in_features
    tr, tc = r // TILE, c // TILE
    sb = (tr // SB) * nsbc + tc // SB
    tile_in_sb = (tr % SB) * SB + tc % SB
    local = (r % TILE) * TILE + c % TILE
    key = (sb * (SB * SB) + tile_in_sb) * (TILE * TILE) + local
    perm = torch.sort(key).indices if k else torch.zeros(0, dtype=i64, device=dev)
    r_s, c_s = r[perm], c[perm]
    tid_s = (r_s // TILE) * ntc + c_s // TILE
    tile_list, tile_ptr, tile_slot, n_tiles = _group(tid_s, nt)

    # sparse work items: split each superblock's run into chunks of <= E_MAX entries
    wmax = lay["items"][1] // 6
    pos = torch.arange(k, device=dev)
    sb_s = sb[perm]
    sb_start = torch.ones(k, dtype=torch.bool, device=dev)
    if k > 1:
        sb_start[1:] = sb_s[1:] != sb_s[:-1]
    first = torch.cummax(torch.where(sb_start, pos, torch.zeros_like(pos)), 0).values if k else pos
    item_start = sb_start | ((pos - first) % E_MAX == 0)
    item = torch.cumsum(item_start.to(i64), 0) - 1
    n_items = item[-1:] + 1 if k else torch.zeros(1, dtype=i64, device=dev)
    items = torch.zeros(6, wmax, dtype=i64, device=dev)
    if k:
        e_end = torch.zeros(wmax, dtype=i64, device=dev).scatter_reduce_(0, item, pos + 1, "amax", include_self=False)
        e_begin = torch.zeros(wmax, dtype=i64, device=dev).scatter_reduce_(0, item, pos, "amin", include_self=False)
        rmin = torch.zeros(wmax, dtype=i64, device=dev).scatter_reduce_(0, item, r_s, "amin", include_self=False)
        rmax = torch.zeros(wmax, dtype=i64, device=dev).scatter_reduce_(0, item, r_s, "amax", include_self=False)
        cmin = torch.zeros(wmax, dtype=i64, device=dev).scatter_reduce_(0, item, c_s, "amin", include_self=False)
        cmax = torch.zeros(wmax, dtype=i64, device=dev).scatter_reduce_(0, item, c_s, "amax", include_self=False)
        valid = torch.arange(wmax, device=dev) < n_items
        nrows = torch.where(valid, rmax - rmin + 1, torch.zeros_like(rmax))
        ncols = torch.where(valid, cmax - cmin + 1, torch.zeros_like(cmax))
        items = torch.stack([e_begin, e_end, rmin, nrows, cmin, ncols])
        span_sum = (nrows + ncols).sum().reshape(1)
    else:
        span_sum = torch.zeros(1, dtype=i64, device=dev)
    items = items.t().contiguous().reshape(-1)  # item-major: 6 ints per item
    # row-major order inside each item (same item ranges): a CUDA sparse warp step (32 consecutive positions
    # from the item start) then mostly shares a few grad_output rows (shared-memory broadcasts); its lanes are
    # then dealt to quarter-warps against bank conflicts (balance_plans, at the end)
    if k:
        sperm = perm[torch.sort(item * (out_features * in_features) + idx[perm]).indices]
    else:
        sperm = perm

    rowlist, rowrank, n_r = _used(r, out_features)
    collist, colrank, n_c = _used(c, in_features)

    # the one sync: counts that decide the strategies and the compaction levels
    st = torch.cat([n_tiles, n_items, n_r, n_c, span_sum]).tolist()
    stats = {"n_tiles": st[0], "n_items": st[1], "nR": st[2], "nC": st[3], "span_sum": st[4]}
    lr, lc = choose_levels(out_features, in_features, stats["nR"], stats["nC"]) if compaction else (0, 0)
    if lr == 0:
        rowlist = torch.arange(out_features, device=dev)
        rowrank = rowlist
    if lc == 0:
        collist = torch.arange(in_features, device=dev)
        colrank = collist
    if lr or lc:
        cr, cc = rowrank[r], colrank[c]
        ckey = ((cr // TILE) * ntc + cc // TILE) * (TILE * TILE) + (cr % TILE) * TILE + cc % TILE
        cperm = torch.sort(ckey).indices
        ctid_s = ckey[cperm] // (TILE * TILE)
        ctile_list, ctile_ptr, ctile_slot, n_ct = _group(ctid_s, nt)
        # bound for the model (no second sync): tiles of the used compact rectangle
        stats["n_ctiles"] = min(_cdiv(max(stats["nR"], 1), TILE) * _cdiv(max(stats["nC"], 1), TILE), nt)
    else:
        cperm, ctile_list, ctile_ptr, ctile_slot, n_ct = perm, tile_list, tile_ptr, tile_slot, n_tiles
        stats["n_ctiles"] = stats["n_tiles"]

    choice = {}
    for be, forced in (("triton", triton), ("cuda", cuda)):
        if forced is not None:
            choice[be] = forced
        else:
            choice[be] = _pick(estimate_costs(T_hint, out_features, in_features, k, stats, be, lr, lc,
                                              wgmma=be == "cuda" and cuda_wgmma(dev)))
    code = encode(lr, lc, choice["triton"], choice["cuda"])

    header = torch.zeros(HDR, dtype=i64, device=dev)
    header[H_MAGIC] = MAGIC
    header[H_K] = k
    header[H_OUT] = out_features
    header[H_IN] = in_features
    header[H_NTILES] = n_tiles[0]
    header[H_NITEMS] = n_items[0]
    header[H_NR] = n_r[0]
    header[H_NC] = n_c[0]
    header[H_NCTILES] = n_ct[0]
    header[H_LEVEL_R] = lr
    header[H_LEVEL_C] = lc
    header[H_SPAN] = span_sum[0]
    parts = [header, perm, sperm, tile_list, tile_ptr, tile_slot, items, rowlist, collist, rowrank, colrank, cperm,
             ctile_list, ctile_ptr, ctile_slot, torch.zeros(code, dtype=i64, device=dev)]
    plan = torch.cat([p.reshape(-1).to(i64) for p in parts]).to(torch.int32)
    assert plan.numel() == lay["base"][0] + code
    if balance:
        balance_plans([(plan, indices, out_features, in_features)])
    return plan
