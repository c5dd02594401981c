"""Selection for the fast paths: gate scores -> compact block lists the attention kernels read.

Scores come from `torch` (CPU path) or the Triton gate kernel. The torch path takes top-k,
unions and group scores with torch ops; the Triton path fuses `shared` group scores, takes each
member's top-k in one kernel (`token`, `union`) and fuses decode-only steps. Output (`Selection`):
- `tile_blocks [NT, HK, LW]` int32: each kernel tile's blocks, ascending, SENTINEL-padded;
  `tile_nblocks [NT, HK]` how many are real. Tiles are numbered prefill first, then decode.
- `member_blocks [T, H, W]` int32 (`token` mode only): each query head's own blocks, ascending,
  SENTINEL-padded; a tile's program masks out the blocks a member did not choose. The device
  path leaves `token` prefill tiles' lists empty: their kernel, organised by KV block, reads the
  member lists alone.

Score convention: forced blocks score +inf, blocks past the group's last block -inf, so one
top-k of `n` per member takes the forced blocks and then the best candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moba_backend.ops.common import SENTINEL, next_pow2
from moba_backend.ops.pooling.naive import read_block_summaries
from moba_backend.ops.select.naive import SelectParams
from moba_backend.plan import MobaPlan

# Upper bound of one chunk's score buffer (tokens x heads x blocks x 4 bytes).
SCORE_BUDGET_BYTES = 256 << 20
# Upper bound of the per-token summary copies `torch_scores` makes to score a chunk at once.
GATHER_BUDGET_BYTES = 16 << 20


@dataclass
class Selection:
    tile_blocks: torch.Tensor          # [NT, HK, LW] int32
    tile_nblocks: torch.Tensor         # [NT, HK] int32
    member_blocks: torch.Tensor | None  # [T, H, W] int32, token mode only


def _all_tiles(plan: MobaPlan) -> tuple[torch.Tensor, ...]:
    """Prefill and decode tiles as one set: (req, q0, length, pos0), tile index = row."""
    p, d = plan.prefill, plan.decode
    return tuple(torch.cat([a, b]) for a, b in ((p.req, d.req), (p.q0, d.q0), (p.length, d.length),
                                                 (p.pos0, d.pos0)))


def forced_mask(plan: MobaPlan, groups: torch.Tensor, nbv: int, sink: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(forced [N, NBV], visible [N, NBV]) for the given groups."""
    j = torch.arange(nbv, device=groups.device)[None, :]
    c1 = plan.group_c1[groups].long()[:, None]
    flo = plan.group_flo[groups].long()[:, None]
    visible = j <= c1
    forced = visible & ((j < sink) | (j >= flo))
    return forced, visible


def torch_scores(q: torch.Tensor, summary_cache: torch.Tensor, plan: MobaPlan, t_lo: int, t_hi: int,
                 nbv: int, gate: str, summaries: torch.Tensor) -> torch.Tensor:
    """Raw gate scores s[t, h, j] of tokens [t_lo, t_hi) against complete blocks: [t, H, NBV] f32.

    One product per request over all KV heads or, when the tokens' own copies of their
    request's summaries fit GATHER_BUDGET_BYTES (decode batches), one for the whole chunk.
    `minmax` (SPEC.md: sum over d of max(q_d * max_d, q_d * min_d)) is computed as
    relu(q) . max + min(q, 0) . min, the same value (max_d >= min_d), as two products.
    """
    T = t_hi - t_lo
    H, D = q.shape[1:]
    HK = summaries.shape[3]
    G = H // HK
    out = torch.zeros(T, H, nbv, dtype=torch.float32, device=q.device)
    req = plan.token_req[t_lo:t_hi].long()
    nb = summaries.shape[1]
    if nb == 0 or T == 0:
        return out
    w = min(nb, nbv)
    # as naive.gate_scores: a 16-bit query meets its summaries rounded to its dtype
    summ = summaries[:, :w]                                            # [R, w, S, HK, D]
    if q.dtype in (torch.float16, torch.bfloat16):
        summ = summ.to(q.dtype)
    summ = summ.float()
    qc = q[t_lo:t_hi].float().view(T, HK, G, D)
    parts = ([(qc.clamp(min=0), summ[:, :, 0]), (qc.clamp(max=0), summ[:, :, 1])] if gate == "minmax"
             else [(qc, summ[:, :, 0])])
    if T * w * HK * D * 4 * len(parts) <= GATHER_BUDGET_BYTES:
        s = sum(torch.einsum("tkgd,tjkd->tkgj", qq, sm[req]) for qq, sm in parts)
        out[:, :, :w] = s.reshape(T, H, w)
        return out
    for r in torch.unique(req).tolist():
        ti = (req == r).nonzero().flatten()
        s = sum(torch.einsum("tkgd,jkd->tkgj", qq[ti], sm[r]) for qq, sm in parts)
        out[ti, :, :w] = s.reshape(len(ti), H, w)
    return out


def _lists_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [..., NBV] -> (ascending lists [..., LW] SENTINEL-padded, counts [...])."""
    nbv = mask.shape[-1]
    j = torch.arange(nbv, device=mask.device, dtype=torch.int32)
    lists = torch.sort(torch.where(mask, j, SENTINEL), dim=-1).values
    counts = mask.sum(-1, dtype=torch.int32)
    width = max(1, int(counts.max())) if counts.numel() else 1
    return lists[..., :width].contiguous(), counts


def dense_selection(plan: MobaPlan, num_kv_heads: int) -> Selection:
    """Every block up to each tile's last block (dense layers, steps whose every group is dense):
    NBV-wide lists, ascending by construction (no sort, no host read of the widest list)."""
    req, q0, length, pos0 = _all_tiles(plan)
    c1 = ((pos0 + length - 1) // plan.block_size).long()
    nbv = max(plan.num_visible_blocks, 1)
    j = torch.arange(nbv, device=c1.device)
    lists = torch.where(j[None, :] <= c1[:, None], j[None, :].int(), SENTINEL)
    lists = lists[:, None, :].expand(-1, num_kv_heads, -1).contiguous()
    counts = (c1 + 1).int()[:, None].expand(-1, num_kv_heads).contiguous()
    return Selection(lists, counts, None)


def select(q: torch.Tensor, summary_cache: torch.Tensor, plan: MobaPlan, p: SelectParams,
           backend: str = "torch", scorer: Callable | None = None) -> Selection:
    """Select blocks for every token of the step.

    q: [T, H, D]; summary_cache: [N, SLOTS, S, HK, D]. backend `torch` scores with torch ops,
    `triton` with the Triton kernels (fused group scores in `shared` mode, a per-member top-k
    kernel in `token`/`union` mode, fused selection for decode-only steps). `scorer(q, summary_cache, plan, t_lo, t_hi, nbv)`, when given, supplies
    the raw scores [t_hi - t_lo, H, NBV] float32 instead (a custom gate, such as an oracle).
    """
    HK = summary_cache.shape[3]
    if p.dense or plan.all_dense:
        return dense_selection(plan, HK)
    T, H, _ = q.shape
    G = H // HK
    dev = q.device
    nbv = max(plan.num_visible_blocks, 1)
    k = max(plan.max_select, 1)
    if backend == "triton" and scorer is None:
        from moba_backend.ops.select import triton_impl

        if plan.prefill.num == 0:
            return triton_impl.decode_select_fwd(q, summary_cache, plan, p)
        if p.mode == "shared":
            g = triton_impl.group_scores_fwd(q, summary_cache, plan, p.gate, p.sink_blocks, p.scale)
            if next_pow2(nbv) <= triton_impl.GROUP_TOPN_MAX_BLOCKS:
                lists, counts = triton_impl.group_topn_fwd(g, plan.group_n, min(k, nbv))
                return Selection(lists[plan.tile_group].contiguous(), counts[plan.tile_group].contiguous(), None)
            return _shared_lists(g, plan, k, nbv, HK)
        scorer = triton_impl.triton_scorer(p.gate)
    if backend == "triton" and p.mode in ("token", "union"):
        return _member_select_triton(q, summary_cache, plan, p, scorer, k, nbv)
    if scorer is None:
        num_blocks = (plan.seq_lens.long() // p.block_size)
        summaries = read_block_summaries(summary_cache, plan.block_table, num_blocks, p.block_size,
                                         plan.page_size)

        def scorer(q, sc, plan, lo, hi, nbv):  # noqa: E306
            return torch_scores(q, sc, plan, lo, hi, nbv, p.gate, summaries)

    if p.mode == "token":
        acc = torch.zeros(plan.num_tiles, HK, nbv, dtype=torch.bool, device=dev)
        members = torch.full((T, H, k), SENTINEL, dtype=torch.int32, device=dev)
    elif p.mode == "union":
        acc = torch.zeros(plan.num_groups, HK, nbv, dtype=torch.bool, device=dev)
    else:
        acc = torch.full((plan.num_groups, HK, nbv), float("-inf"), device=dev)

    chunk = max(1, SCORE_BUDGET_BYTES // (H * nbv * 4))
    for lo in range(0, T, chunk):
        hi = min(T, lo + chunk)
        groups = plan.token_group[lo:hi]
        forced, visible = forced_mask(plan, groups, nbv, p.sink_blocks)        # [t, NBV]
        s = scorer(q, summary_cache, plan, lo, hi, nbv)                        # [t, H, NBV]
        if p.mode == "shared":
            cand = visible & ~forced
            z = torch.where(cand[:, None, :], s * p.scale, float("-inf"))
            prob = torch.nan_to_num(torch.softmax(z, dim=-1), nan=0.0)        # no candidate: 0
            prob = torch.where(cand[:, None, :], prob, float("-inf"))
            idx = groups[:, None, None].expand(-1, HK, nbv)
            acc.scatter_reduce_(0, idx, prob.view(-1, HK, G, nbv).amax(2), reduce="amax")
            continue
        s = torch.where(forced[:, None, :], float("inf"), torch.where(visible[:, None, :], s, float("-inf")))
        top = s.topk(min(k, nbv), dim=-1).indices.to(torch.int32)              # [t, H, k]
        rank = torch.arange(top.shape[-1], device=dev)
        keep = rank[None, None, :] < plan.group_n[groups].long()[:, None, None]
        picks = torch.where(keep, top, SENTINEL)
        # scatter picks into the accumulator rows (tile for token, group for union) of each KV head
        rows = plan.token_tile[lo:hi] if p.mode == "token" else groups
        flat = (rows[:, None, None] * HK + (torch.arange(H, device=dev) // G)[None, :, None]) * nbv
        flat = (flat + picks.long().clamp(max=nbv - 1))[keep.expand_as(picks)]
        acc.view(-1)[flat] = True
        if p.mode == "token":
            members[lo:hi, :, : picks.shape[-1]] = torch.sort(picks, dim=-1).values

    if p.mode == "shared":
        groups = torch.arange(plan.num_groups, device=dev)
        forced, visible = forced_mask(plan, groups, nbv, p.sink_blocks)
        g = torch.where(forced[:, None, :], float("inf"), torch.where(visible[:, None, :], acc, float("-inf")))
        return _shared_lists(g, plan, k, nbv, HK)
    lists, counts = _lists_from_mask(acc)
    if p.mode == "token":
        w = max(1, int(members.ne(SENTINEL).sum(-1).max())) if T else 1
        return Selection(lists, counts, members[..., :w].contiguous())
    # union / shared: kernel tiles take their group's list
    return Selection(lists[plan.tile_group].contiguous(), counts[plan.tile_group].contiguous(), None)


def _member_select_triton(q, summary_cache, plan: MobaPlan, p: SelectParams, scorer: Callable, k: int,
                          nbv: int) -> Selection:
    """`token` / `union` selection on the device: scores by chunk, then one kernel per chunk
    takes each member's n blocks (`triton_impl.member_topk_fwd`) and marks the union.

    In `token` mode prefill tiles get empty lists: their kernel (`token_prefill_fwd`) reads the
    member lists only, so the unions are kept for decode tiles alone."""
    from moba_backend.ops.select import triton_impl

    T, H, _ = q.shape
    HK = summary_cache.shape[3]
    token = p.mode == "token"
    n_pre = plan.prefill.num
    rows = plan.token_tile - n_pre if token else plan.token_group
    acc = torch.zeros(plan.decode.num if token else plan.num_groups, HK, nbv, dtype=torch.int8, device=q.device)
    members = torch.full((T, H, k), SENTINEL, dtype=torch.int32, device=q.device) if token else None
    chunk = max(1, SCORE_BUDGET_BYTES // (H * nbv * 4))
    for lo in range(0, T, chunk):
        hi = min(T, lo + chunk)
        s = scorer(q, summary_cache, plan, lo, hi, nbv).float().contiguous()
        triton_impl.member_topk_fwd(s, plan, lo, hi, p.sink_blocks, rows, acc, members)
    lists, counts = _lists_from_mask(acc.bool())
    if token:
        lists = torch.cat([torch.full((n_pre, HK, lists.shape[2]), SENTINEL, dtype=lists.dtype, device=q.device),
                           lists])
        counts = torch.cat([torch.zeros(n_pre, HK, dtype=counts.dtype, device=q.device), counts])
        return Selection(lists, counts, members)
    return Selection(lists[plan.tile_group].contiguous(), counts[plan.tile_group].contiguous(), None)


def _shared_lists(g: torch.Tensor, plan: MobaPlan, k: int, nbv: int, HK: int) -> Selection:
    """Group scores [NG, HK, NBV] (forced +inf, invalid -inf) -> each group's top n, as tile lists."""
    top = g.topk(min(k, nbv), dim=-1).indices.to(torch.int32)
    keep = torch.arange(top.shape[-1], device=g.device)[None, None, :] < plan.group_n.long()[:, None, None]
    # the top n are distinct: sorting the k picks (not an NBV-wide mask) gives the ascending list
    lists = torch.sort(torch.where(keep, top, SENTINEL), dim=-1).values
    counts = keep.expand_as(top).sum(-1, dtype=torch.int32)
    return Selection(lists[plan.tile_group].contiguous(), counts[plan.tile_group].contiguous(), None)


def selection_mask(sel: Selection, plan: MobaPlan, num_heads: int) -> torch.Tensor:
    """The dense mask [T, H, NBV] a Selection stands for (for tests and the quality harness).
    With member lists (`token` mode) those alone say it: a tile's list is their union."""
    nbv = max(plan.num_visible_blocks, 1)
    if sel.member_blocks is not None:
        mem = torch.zeros(plan.num_tokens, num_heads, nbv + 1, dtype=torch.bool, device=sel.member_blocks.device)
        mem.scatter_(2, sel.member_blocks.long().clamp(max=nbv), True)
        return mem[..., :nbv]
    NT, HK, LW = sel.tile_blocks.shape
    G = num_heads // HK
    valid = torch.arange(LW, device=sel.tile_blocks.device)[None, None, :] < sel.tile_nblocks[..., None]
    tile_mask = torch.zeros(NT, HK, nbv + 1, dtype=torch.bool, device=sel.tile_blocks.device)
    tile_mask.scatter_(2, torch.where(valid, sel.tile_blocks.long(), nbv).clamp(max=nbv), True)
    return tile_mask[plan.token_tile][:, torch.arange(num_heads) // G, :nbv]   # [T, H, NBV]


def selection_from_mask(mask: torch.Tensor, plan: MobaPlan, num_kv_heads: int) -> Selection:
    """The Selection a mask [T, H, NBV] bool stands for (the inverse of `selection_mask`): each
    member's own ascending list, and per kernel tile and KV head the union of its members'."""
    T, H, nbv = mask.shape
    G = H // num_kv_heads
    tile_mask = torch.zeros(plan.num_tiles, num_kv_heads, nbv, dtype=torch.bool, device=mask.device)
    tile_mask.index_put_((plan.token_tile.to(mask.device),), mask.view(T, num_kv_heads, G, nbv).any(2),
                         accumulate=True)
    lists, counts = _lists_from_mask(tile_mask)
    return Selection(lists, counts, _lists_from_mask(mask)[0])

