"""The per-step plan: everything MoBA needs that all layers share, computed once per step.

Built from what every engine has (query start offsets, sequence lengths, block table, slot
mapping, which requests decode). Layers only read it (STYLE.md "plan once per step, run per
layer").

Tokens are in request order (all tokens of request 0, then request 1, ...), as engines lay out
`query_start_loc`. Three ways of cutting those tokens:
- **groups** (selection tiles, SPEC.md "query tile"): in `token` mode each token; in `union` and
  `shared` modes the tokens of one request in one aligned window `[i*T, (i+1)*T)`; a decode token
  is always a group of one. Each group has its block range `[c0, c1]`, its forced range and its
  block count `n`.
- **kernel tiles**: what one attention program handles, `tokens_per_tile` tokens aligned to
  multiples of it (which divides T, so a kernel tile never straddles a group in `union` and
  `shared`). Prefill tiles and decode tiles (one token each) are kept apart.
- **pooling work**: the (request, block) pairs whose last token this step writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moba_backend.config import MobaConfig
from moba_backend.ops.common import check, next_pow2


@dataclass
class TileSet:
    """Kernel tiles: [NT] int32 each."""

    req: torch.Tensor
    q0: torch.Tensor       # row of the first token in q
    length: torch.Tensor   # tokens in the tile
    pos0: torch.Tensor     # absolute position of the first token
    index: torch.Tensor    # [NT] int64 index of this tile among all tiles (prefill first)

    @property
    def num(self) -> int:
        return int(self.req.numel())


@dataclass
class MobaPlan:
    num_tokens: int
    num_reqs: int
    block_size: int
    page_size: int
    tokens_per_tile: int
    block_m: int                # rows (tokens x padded group) of one prefill program
    # per request [R]
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    # per token [T]
    token_req: torch.Tensor
    token_pos: torch.Tensor
    token_decode: torch.Tensor   # bool
    token_group: torch.Tensor    # int64
    token_tile: torch.Tensor     # int64 kernel tile (prefill tiles first, then decode tiles)
    slot_mapping: torch.Tensor
    # per group [NG]
    group_c1: torch.Tensor       # last block of the group
    group_flo: torch.Tensor      # forced own/local range is [flo, c1]; cands are j < flo, j >= sink
    group_n: torch.Tensor        # blocks to select (every visible block when dense)
    group_dense: torch.Tensor    # bool
    group_req: torch.Tensor      # request of the group
    group_q0: torch.Tensor       # first query row (a group's tokens are consecutive rows)
    group_len: torch.Tensor      # tokens in the group
    # kernel tiles
    prefill: TileSet
    decode: TileSet
    tile_group: torch.Tensor     # [NT] group of each tile (union/shared), -1 in token mode
    # pooling work [W]
    pool_req: torch.Tensor
    pool_blk: torch.Tensor
    # sizes
    num_visible_blocks: int      # NBV = max(c1) + 1
    max_select: int              # max over groups of n
    max_group_len: int = 1       # max over groups of the tokens in it

    @property
    def num_groups(self) -> int:
        return int(self.group_c1.numel())

    @property
    def num_tiles(self) -> int:
        return self.prefill.num + self.decode.num


def _aligned_pieces(start: int, stop: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions [start, stop) at multiples of `step`: (first positions, lengths)."""
    firsts = torch.cat([torch.tensor([start]), torch.arange(min((start // step + 1) * step, stop), stop, step)])
    return firsts, torch.diff(torch.cat([firsts, torch.tensor([stop])]))


def tokens_per_tile_for(num_heads: int, num_kv_heads: int, mode: str, query_tile: int,
                        head_dim: int | None = None) -> tuple[int, int]:
    """(tokens per prefill kernel tile, rows of one program). Rows pack tokens x GQA group.

    `token` mode runs each tile over the union of its members' blocks, so its tiles are kept
    small (64 rows); `union` and `shared` tiles share one list and take 256 rows when the head
    dim is known to be at most 128 (fastest on an H100 at 128K tokens,
    `benchmarks/tune_attention.py`: 38.9 ms against 44.1 ms at 128 rows), else 128.
    """
    gp = next_pow2(num_heads // num_kv_heads)
    rows = 64 if mode == "token" else 256 if head_dim is not None and head_dim <= 128 else 128
    tpt = max(1, min(query_tile, rows // gp))
    return tpt, max(16, next_pow2(tpt * gp))


def build_plan(
    cfg: MobaConfig,
    query_start_loc: torch.Tensor,  # [R+1]
    seq_lens: torch.Tensor,         # [R] tokens after this step
    block_table: torch.Tensor,      # [R, max_pages]
    slot_mapping: torch.Tensor,     # [T]
    is_decode: torch.Tensor,        # [R] bool (decode requests have one query token)
    page_size: int,
    num_heads: int,
    num_kv_heads: int,
    device: torch.device | str | None = None,
    head_dim: int | None = None,
) -> MobaPlan:
    """Plan one step. Host-side work on small per-request arrays; tensors land on `device`.
    `head_dim`, when given, lets the plan pick larger kernel tiles for head dims up to 128."""
    B = cfg.moba_block_size
    T_tile = cfg.moba_query_tile
    mode = cfg.moba_tile_select
    check(num_heads % num_kv_heads == 0,
          f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    qsl = query_start_loc.cpu().tolist()
    sl = seq_lens.cpu().tolist()
    dec = is_decode.cpu().tolist()
    R = len(sl)
    check(len(qsl) == R + 1, "query_start_loc must have num_reqs + 1 entries")
    tpt, block_m = tokens_per_tile_for(num_heads, num_kv_heads, mode, T_tile, head_dim)

    # Per request pieces, concatenated at the end (int64 CPU tensors).
    tok_req, tok_pos, tok_dec, tok_group, tok_tile = [], [], [], [], []
    g_c1, g_flo, g_n, g_dense = [], [], [], []
    g_req, g_q0, g_len = [], [], []
    p_tiles, d_tiles, p_tile_group, d_tile_group = [], [], [], []
    pool_req, pool_blk = [], []
    n_groups = 0
    n_ptiles = n_dtiles = 0

    for r in range(R):
        q_lo, q_hi = qsl[r], qsl[r + 1]
        n_q = q_hi - q_lo
        L = sl[r]
        ctx = L - n_q
        check(n_q >= 0 and ctx >= 0, f"request {r}: query length {n_q} > sequence length {L}")
        cfg.check_seq_len(L)
        if n_q == 0:
            continue
        decode = bool(dec[r])
        check(not decode or n_q == 1, f"request {r}: a decode request has one query token, got {n_q}")
        pool_blk.append(torch.arange(ctx // B, L // B))
        pool_req.append(torch.full((L // B - ctx // B,), r))
        pos = torch.arange(ctx, L)
        # groups: [lo, hi] position range of each
        if mode == "token" or decode:
            lo = hi = pos
            lens = torch.ones_like(pos)
            groups_of = n_groups + torch.arange(n_q)
        else:
            lo, lens = _aligned_pieces(ctx, L, T_tile)
            hi = lo + lens - 1
            groups_of = n_groups + torch.repeat_interleave(torch.arange(len(lo)), lens)
        n_groups += len(lo)
        right = cfg.moba_decoder_top_k_right if decode else cfg.moba_encoder_top_k_right
        limit = cfg.decoder_seq_limit if decode else cfg.encoder_seq_limit
        c1 = hi // B
        is_dense = (hi + 1 < limit) | (c1 + 1 <= right)
        g_c1.append(c1)
        g_flo.append(torch.where(is_dense, 0, torch.clamp(lo // B - cfg.moba_local_blocks, min=0)))
        g_n.append(torch.where(is_dense, c1 + 1, right))
        g_dense.append(is_dense)
        g_req.append(torch.full_like(lo, r))
        g_q0.append(q_lo + lo - ctx)
        g_len.append(lens)
        # kernel tiles
        firsts, lens = _aligned_pieces(ctx, L, 1 if decode else tpt)
        base = n_dtiles if decode else n_ptiles
        rows = torch.stack([torch.full_like(firsts, r), q_lo + firsts - ctx, lens, firsts], 1)
        (d_tiles if decode else p_tiles).append(rows)
        tg = torch.full_like(firsts, -1) if mode == "token" else groups_of[firsts - ctx]
        (d_tile_group if decode else p_tile_group).append(tg)
        tile_ids = base + torch.repeat_interleave(torch.arange(len(firsts)), lens)
        tok_tile.append(tile_ids if not decode else -1 - tile_ids)  # decode tiles renumbered below
        if decode:
            n_dtiles += len(firsts)
        else:
            n_ptiles += len(firsts)
        tok_req.append(torch.full((n_q,), r))
        tok_pos.append(pos)
        tok_dec.append(torch.full((n_q,), decode))
        tok_group.append(groups_of)

    def cat(xs: list, dtype=torch.int64, width: int = 0) -> torch.Tensor:
        if not xs:
            return torch.zeros((0, width) if width else (0,), dtype=dtype)
        return torch.cat(xs).to(dtype)

    token_tile = cat(tok_tile)
    token_tile = torch.where(token_tile < 0, n_ptiles + (-1 - token_tile), token_tile)
    T = int(token_tile.numel())
    check(T == qsl[-1] - qsl[0], "query_start_loc must cover the tokens of the step contiguously")
    c1_all = cat(g_c1)
    n_all = cat(g_n)

    dev = device if device is not None else block_table.device
    i32 = dict(dtype=torch.int32, device=dev)

    def tile_set(tiles: list, offset: int) -> TileSet:
        t = cat(tiles, torch.int32, width=4).to(dev)
        return TileSet(req=t[:, 0].contiguous(), q0=t[:, 1].contiguous(), length=t[:, 2].contiguous(),
                       pos0=t[:, 3].contiguous(),
                       index=torch.arange(offset, offset + t.shape[0], dtype=torch.int64, device=dev))

    return MobaPlan(
        num_tokens=T, num_reqs=R, block_size=B, page_size=page_size,
        tokens_per_tile=tpt, block_m=block_m,
        seq_lens=seq_lens.to(device=dev, dtype=torch.int32),
        block_table=block_table.to(device=dev, dtype=torch.int32),
        token_req=cat(tok_req, torch.int32).to(dev), token_pos=cat(tok_pos, torch.int32).to(dev),
        token_decode=cat(tok_dec, torch.bool).to(dev),
        token_group=cat(tok_group).to(dev), token_tile=token_tile.to(dev),
        slot_mapping=slot_mapping.to(dev),
        group_c1=c1_all.to(**i32), group_flo=cat(g_flo).to(**i32), group_n=n_all.to(**i32),
        group_dense=cat(g_dense, torch.bool).to(dev),
        group_req=cat(g_req).to(**i32), group_q0=cat(g_q0).to(**i32), group_len=cat(g_len).to(**i32),
        prefill=tile_set(p_tiles, 0), decode=tile_set(d_tiles, n_ptiles),
        tile_group=cat(p_tile_group + d_tile_group).to(dev),
        pool_req=cat(pool_req, torch.int32).to(dev), pool_blk=cat(pool_blk, torch.int32).to(dev),
        num_visible_blocks=int(c1_all.max()) + 1 if c1_all.numel() else 0,
        max_select=int(n_all.max()) if n_all.numel() else 0,
        max_group_len=max((int(x.max()) for x in g_len if x.numel()), default=1),
    )
