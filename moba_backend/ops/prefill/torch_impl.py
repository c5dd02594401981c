"""Sparse paged attention on torch ops: the CPU path (prefill and decode tiles alike).

The reference (`naive.sparse_attention`) masks a dense [tokens, heads, keys] score matrix per
request; this path computes only what a kernel would: each kernel tile gathers the keys and
values of its own block list once per KV head (GQA: one gather for the group's query heads) and
attends them under a mask holding causality and the sliding window: with torch's fused SDPA, or
with two explicit products where SDPA does not fit (`token` mode, whose members' own subsets
mask whole blocks; a soft cap; one-token decode tiles). Consecutive kernel tiles of a request
are first merged into runs of up to `MERGE_TOKENS` tokens (those with equal lists; in `token`
mode any, over the union of their lists, the members' own lists still masking), so a run
gathers its keys once. Tiles are batched (padded to the widest list of the batch) and cut into
batches of at most `WORK_BUDGET_BYTES` of gathered keys, values, mask and scores. Computed in
float32, as the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moba_backend.ops.common import SENTINEL
from moba_backend.ops.select.fast import Selection, _lists_from_mask
from moba_backend.plan import MobaPlan, TileSet

# gathered K/V, mask and explicit scores of one batch of tiles
WORK_BUDGET_BYTES = 64 << 20
# tokens of a merged run of kernel tiles
MERGE_TOKENS = 128


def sparse_attention_plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: MobaPlan,
                          sel: Selection, out: torch.Tensor, block_size: int, scale: float,
                          softcap: float = 0.0, window: int = -1) -> None:
    """`sparse_attention_tiles` over a step's prefill tiles, then its decode tiles.
    q: [T, H, D]; k_cache, v_cache: [N, P, HK, D]; out: [T, H, D]."""
    for tiles in (plan.prefill, plan.decode):
        sparse_attention_tiles(q, k_cache, v_cache, plan.block_table, tiles, sel.tile_blocks,
                               sel.tile_nblocks, sel.member_blocks, out, block_size, scale, softcap, window)


def sparse_attention_tiles(
    q: torch.Tensor,                        # [T, H, D]
    k_cache: torch.Tensor,                  # [N, P, HK, D]
    v_cache: torch.Tensor,                  # [N, P, HK, D]
    block_table: torch.Tensor,              # [R, max_pages]
    tiles: TileSet,                         # [NT] kernel tiles (consecutive query rows each)
    tile_blocks: torch.Tensor,              # [NT, HK, LW] ascending block lists, SENTINEL-padded
    tile_nblocks: torch.Tensor,             # [NT, HK]
    member_blocks: torch.Tensor | None,     # [T, H, W] each member's own blocks (`token`), else None
    out: torch.Tensor,                      # [T, H, D] written at the tiles' rows
    block_size: int,
    scale: float,
    softcap: float = 0.0,
    window: int = -1,
) -> None:
    """Attend every tile of `tiles` over its selected blocks (causal, GQA), writing `out`.

    `tile_blocks` / `tile_nblocks` are indexed by `tiles.index` (a Selection's tile rows)."""
    if tiles.num == 0:
        return
    if int(tiles.length.max()) > 1:   # (decode tiles, one token of a request each, never merge)
        tiles, tile_blocks, tile_nblocks = _merge_runs(tiles, tile_blocks, tile_nblocks,
                                                       union=member_blocks is not None)
    NT = tiles.num
    H, D = q.shape[1:]
    HK = k_cache.shape[2]
    G = H // HK
    B = block_size
    rows = tiles.index.long()
    nblk = tile_nblocks[rows].long()                                   # [NT, HK]
    tt = int(tiles.length.max())
    # explicit [.., G, tt, L] scores and probabilities (see _attend_batch)
    scores = member_blocks is not None or softcap > 0 or tt == 1
    per_tile = HK * B * max(1, int(nblk.max())) * (2 * D * 4 + tt + (8 * G * tt if scores else 0))
    step = max(1, WORK_BUDGET_BYTES // per_tile)
    attend = _attend_decode if tt == 1 else _attend_batch
    for lo in range(0, NT, step):
        sl = slice(lo, min(NT, lo + step))
        attend(q, k_cache, v_cache, block_table, tiles.req[sl].long(), tiles.q0[sl].long(),
               tiles.length[sl].long(), tiles.pos0[sl].long(), tile_blocks[rows[sl]], nblk[sl],
               member_blocks, out, B, scale, softcap, window)


def _merge_runs(tiles: TileSet, blocks: torch.Tensor, nblocks: torch.Tensor, union: bool):
    """Consecutive tiles of one request (adjacent rows and positions) merged into runs of at most
    MERGE_TOKENS tokens: (runs, lists, counts), runs indexing the new lists. Without `union`
    only tiles with equal lists merge (a run keeps that list); with it, a run takes the union."""
    req, q0, length, pos0, index = (x.cpu().tolist() for x in
                                    (tiles.req, tiles.q0, tiles.length, tiles.pos0, tiles.index))
    host_blocks, host_n = blocks.cpu(), nblocks.cpu()
    runs: list[list[int]] = []          # [req, q0, length, pos0, first tile, last tile]
    for i in range(len(req)):
        if runs:
            r = runs[-1]
            joins = (r[0] == req[i] and r[1] + r[2] == q0[i] and r[3] + r[2] == pos0[i]
                     and r[2] + length[i] <= MERGE_TOKENS)
            if joins and not union:
                a, b = index[r[4]], index[i]
                joins = torch.equal(host_n[a], host_n[b]) and torch.equal(host_blocks[a], host_blocks[b])
            if joins:
                r[2] += length[i]
                r[5] = i
                continue
        runs.append([req[i], q0[i], length[i], pos0[i], i, i])
    dev = tiles.req.device
    cols = torch.tensor([r[:4] for r in runs], dtype=torch.int32).T.to(dev)
    first = torch.tensor([index[r[4]] for r in runs])
    if not union:
        merged = TileSet(*cols, torch.arange(len(runs), device=dev))
        return merged, blocks[first.to(blocks.device)], nblocks[first.to(nblocks.device)]
    # union of each run's lists, as an ascending SENTINEL-padded list per (run, KV head)
    NT, HK, LW = host_blocks.shape
    run_of = torch.tensor([k for k, r in enumerate(runs) for _ in range(r[4], r[5] + 1)])
    tile_rows = torch.tensor(index)
    own = host_blocks[tile_rows]                                                # [NT_tiles, HK, LW]
    ok = torch.arange(LW) < host_n[tile_rows][..., None]
    nbv = int(torch.where(ok, own, -1).max()) + 1 if bool(ok.any()) else 1
    mask = torch.zeros(len(runs), HK, nbv + 1, dtype=torch.bool)
    mask[run_of[:, None, None], torch.arange(HK)[None, :, None], torch.where(ok, own, nbv).long()] = True
    lists, counts = _lists_from_mask(mask[..., :nbv])
    merged = TileSet(*cols, torch.arange(len(runs), device=dev))
    return merged, lists.to(blocks.device), counts.to(nblocks.device)


def _gather_rows(caches: tuple[torch.Tensor, ...], page: torch.Tensor, slot: torch.Tensor,
                 hk: torch.Tensor) -> list[torch.Tensor]:
    """cache[page, slot, hk] ([..., D], indices broadcast) of each cache: one `index_select` of
    whole rows over a flat row view when the strides allow (rows copied whole: several times
    faster on CPU than element-wise advanced indexing; the row numbers are shared by caches of
    equal strides), advanced indexing otherwise."""
    out, rows, rows_for = [], None, None
    shape = torch.broadcast_shapes(page.shape, slot.shape, hk.shape)
    for cache in caches:
        D = cache.shape[-1]
        strides = cache.stride()[:3]
        if any(st % D for st in strides):
            out.append(cache[page, slot, hk])
            continue
        s0, s1, s2 = (st // D for st in strides)
        if rows_for != (s0, s1, s2):
            rows, rows_for = (page * s0 + slot * s1 + hk * s2).flatten(), (s0, s1, s2)
        last = sum((dim - 1) * st for dim, st in zip(cache.shape[:3], (s0, s1, s2)))
        flat = cache.as_strided((last + 1, D), (D, 1))
        out.append(flat.index_select(0, rows).view(*shape, D))
    return out


def _key_rows(k_cache, v_cache, block_table, req, blocks, B):
    """Keys and values of each (tile, KV head)'s blocks [n, HK, lw], float32 [n, HK, lw * B, D],
    and their positions [n, HK, lw * B]. Physical rows are looked up once per run of gcd(P, B)
    keys (a run never crosses a page or a block); padding entries (and the tail of a partial
    block past the last page) read a valid row, for the caller to mask."""
    n, HK, lw = blocks.shape
    P = k_cache.shape[1]
    dev = blocks.device
    kpos = (blocks[..., None] * B + torch.arange(B, device=dev)).flatten(2)  # [n, HK, L]
    run = math.gcd(P, B)
    rpos = kpos[..., ::run]                                                   # [n, HK, L / run]
    table = block_table.to(dev).long()
    page = table[req[:, None, None], (rpos // P).clamp(max=table.shape[1] - 1)]
    slot = (rpos % P)[..., None] + torch.arange(run, device=dev)              # [n, HK, L / run, run]
    hk = torch.arange(HK, device=dev)[None, :, None, None]
    kc, vc = (x.float().flatten(2, 3) for x in _gather_rows((k_cache, v_cache), page[..., None], slot, hk))
    return kc, vc, kpos


def _attend_decode(q, k_cache, v_cache, block_table, req, q0, length, pos0, blocks, nblk,
                   member_blocks, out, B, scale, softcap, window) -> None:
    """`_attend_batch` for one-token tiles (decode): the same result with the fewest ops (a
    decode step runs this once a layer, where op count, not arithmetic, is the cost on CPU):
    blocks masked whole, the causal and window masks on positions, two batched products."""
    n, HK = nblk.shape
    H, D = q.shape[1:]
    G = H // HK
    dev = q.device
    lw = max(1, int(nblk.max()))
    blk_ok = torch.arange(lw, device=dev) < nblk[..., None]                  # [n, HK, lw]
    blocks = torch.where(blk_ok, blocks[..., :lw].long(), 0)
    kc, vc, kpos = _key_rows(k_cache, v_cache, block_table, req, blocks, B)  # [n, HK, L, D]
    qv = q.index_select(0, q0).float().view(n * HK, G, D)
    s = torch.bmm(qv, kc.flatten(0, 1).transpose(1, 2)).view(n, HK, G, lw, B) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    allowed = (kpos <= pos0[:, None, None]).view(n, HK, 1, lw, B) & blk_ok[:, :, None, :, None]
    if window > 0:
        allowed &= (pos0[:, None, None] - kpos < window).view(n, HK, 1, lw, B)
    if member_blocks is not None:
        mem = member_blocks.to(dev).index_select(0, q0).long().view(n, HK, G, -1)   # [n, HK, G, W]
        allowed = allowed & (mem[..., None] == blocks[:, :, None, None, :]).any(-2)[..., None]
    s.masked_fill_(~allowed, float("-inf"))
    o = torch.bmm(torch.softmax(s.view(n * HK, G, lw * B), dim=-1), vc.flatten(0, 1))
    out.index_copy_(0, q0, o.view(n, H, D).to(out.dtype))


def _attend_batch(q, k_cache, v_cache, block_table, req, q0, length, pos0, blocks, nblk,
                  member_blocks, out, B, scale, softcap, window) -> None:
    n, HK = nblk.shape
    T, H, D = q.shape
    G = H // HK
    dev = q.device
    lw = max(1, int(nblk.max()))
    tt = int(length.max())
    blocks = blocks[..., :lw].long()                                          # [n, HK, lw]
    blk_ok = torch.arange(lw, device=dev) < nblk[..., None]                  # [n, HK, lw]
    blocks = torch.where(blk_ok, blocks, 0)
    kc, vc, kpos = _key_rows(k_cache, v_cache, block_table, req, blocks, B)  # [n, HK, L, D]

    i = torch.arange(tt, device=dev)
    q_ok = i[None, :] < length[:, None]                                       # [n, tt]
    qrow = torch.where(q_ok, q0[:, None] + i, 0)
    qpos = pos0[:, None] + i                                                  # [n, tt]
    qt = q[qrow].float().view(n, tt, HK, G, D).permute(0, 2, 3, 1, 4)        # [n, HK, G, tt, D]

    key_ok = blk_ok.repeat_interleave(B, dim=2)                               # [n, HK, L]
    allowed = key_ok[:, :, None, :] & (kpos[:, :, None, :] <= qpos[:, None, :, None])
    if window > 0:
        allowed &= qpos[:, None, :, None] - kpos[:, :, None, :] < window
    # padded query rows attend everything (their output is dropped): no fully masked row
    allowed = (allowed | ~q_ok[:, None, :, None])[:, :, None]                 # [n, HK, 1, tt, L]
    if member_blocks is None and softcap <= 0 and tt > 1:
        o = F.scaled_dot_product_attention(
            qt.flatten(0, 1), kc.flatten(0, 1)[:, None], vc.flatten(0, 1)[:, None],
            attn_mask=allowed.flatten(0, 1), scale=scale, enable_gqa=G > 1)
        o = o.view(n, HK, G, tt, D)
    else:
        # explicit scores: the members' own lists mask whole blocks (a [.., lw, 1] broadcast,
        # never a per-key copy per head), a soft cap needs the raw logits, and for one-token
        # tiles (decode) two products cost less than SDPA's setup
        s = torch.einsum("nkgtd,nkld->nkgtl", qt, kc) * scale                 # [n, HK, G, tt, L]
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        s.masked_fill_(~allowed, float("-inf"))
        if member_blocks is not None:
            mem = member_blocks.to(dev)[qrow].long().view(n, tt, HK, G, -1)   # [n, tt, HK, G, W]
            mem = torch.where(mem == SENTINEL, -1, mem)
            own = (mem[..., None] == torch.where(blk_ok, blocks, -2)[:, None, :, None, None, :]).any(-2)
            own = own.permute(0, 2, 3, 1, 4) | ~q_ok[:, None, None, :, None]  # [n, HK, G, tt, lw]
            s.view(n, HK, G, tt, lw, B).masked_fill_(~own[..., None], float("-inf"))
        o = torch.einsum("nkgtl,nkld->nkgtd", torch.softmax(s, dim=-1), vc)
    o = o.permute(0, 3, 1, 2, 4).reshape(n, tt, H, D)
    out[qrow[q_ok]] = o[q_ok].to(out.dtype)
