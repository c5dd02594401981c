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
- **pooling work**: the (request, block) pairs whose last token this step writes; a block
  index < 0 is no work (`DecodePlanBuffers` keeps one entry per request).

`build_plan` reads the step's shape on the host and makes fresh tensors: any step, eager only.
`DecodePlanBuffers` plans steps of one query token per request (decodes, one-token prompt chunks)
with device ops into persistent tensors whose shapes depend only on the batch size, so such a
step can be captured once in a CUDA graph and replayed. Both take each group's block window from
`group_window`.
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
    # shapes fixed by the batch size (DecodePlanBuffers): layers must not size anything from
    # the data (no host reads), so the step can run under CUDA graph capture and replay
    static: bool = False
    # (first query row, tokens) of each request when the step is fresh prompts only (no cached
    # context) whose every group runs dense: the step is then plain causal attention over its
    # own new keys and values (`MobaAttention` may hand it to a dense kernel); else None
    fresh_dense: tuple[tuple[int, int], ...] | None = None
    # the same spans when the step is fresh prompts only, dense or not (a dense layer's route)
    fresh_prompts: tuple[tuple[int, int], ...] | None = None
    # every group of the step runs dense (short contexts): selection is every visible block
    all_dense: bool = False

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

    `token` mode keeps small tiles (64 rows): its prefill kernel merges consecutive tiles into
    spans (`token_prefill_fwd`), and the tile kernel, which runs each tile over the union of its
    members' blocks, is left for decode; `union` and `shared` tiles share one list and take 256
    rows when the head
    dim is known to be at most 128 (fastest on an H100 at 128K tokens,
    `benchmarks/tune_attention.py`: 38.9 ms against 44.1 ms at 128 rows), else 128.
    """
    gp = next_pow2(num_heads // num_kv_heads)
    rows = 64 if mode == "token" else 256 if head_dim is not None and head_dim <= 128 else 128
    tpt = max(1, min(query_tile, rows // gp))
    return tpt, max(16, next_pow2(tpt * gp))


def max_select_for(cfg: MobaConfig, num_visible_blocks: int) -> int:
    """The widest selection (`MobaPlan.max_select`) any group of any step can ask for when no
    context passes `num_visible_blocks` blocks: a window's `right`, or every visible block of a
    group dense below a seq limit (c1 + 1 <= ceil((limit - 1) / B))."""
    B = cfg.moba_block_size
    widths = [cfg.moba_decoder_top_k_right, (cfg.decoder_seq_limit + B - 2) // B,
              cfg.moba_encoder_top_k_right, (cfg.encoder_seq_limit + B - 2) // B]
    return max(1, min(num_visible_blocks, max(widths)))


def group_window(cfg: MobaConfig, lo: torch.Tensor, hi: torch.Tensor, right, limit):
    """The block window of groups spanning positions [lo, hi] that select `right` blocks and run
    dense below `limit` tokens (`right`, `limit`: ints, or tensors per group): (c1, flo, n, dense),
    the last visible block, the first forced local block (candidates are below it), the blocks
    to select, and whether the group runs dense (every visible block)."""
    B = cfg.moba_block_size
    c1 = hi // B
    dense = (hi + 1 < limit) | (c1 + 1 <= right)
    flo = torch.where(dense, 0, torch.clamp(lo // B - cfg.moba_local_blocks, min=0))
    return c1, flo, torch.where(dense, c1 + 1, right), dense


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
        c1, flo, n, is_dense = group_window(cfg, lo, hi, right, limit)
        g_c1.append(c1)
        g_flo.append(flo)
        g_n.append(n)
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
    fresh = all(sl[r] == qsl[r + 1] - qsl[r] and not dec[r] for r in range(R))
    all_dense = bool(R) and bool(cat(g_dense, torch.bool).all())
    fresh_prompts = tuple((qsl[r], sl[r]) for r in range(R) if sl[r] > 0) if R and fresh else None
    fresh_dense = fresh_prompts if fresh_prompts and all_dense else None

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
        fresh_dense=fresh_dense, fresh_prompts=fresh_prompts, all_dense=all_dense,
    )


class DecodePlanBuffers:
    """Plans of one-token-per-request steps in persistent tensors, for CUDA graphs.

    For a step of R requests of one query token each (request r's token in row r: decodes, and
    one-token prompt chunks, which `prefill` marks and which select with the encoder window as
    in `build_plan`), `plan` writes every per-step tensor with device ops (no host
    synchronisation) into buffers made once for `max_reqs` requests, and returns a MobaPlan whose
    tensors are views of those buffers and whose sizes depend only on R: `num_visible_blocks`
    covers `max_seq_len`, and `max_select` the widest selection any length can ask for. Every
    token runs as a decode tile (split-K). A graph captured for R requests then replays on the
    plan of any later step of R requests. Padding requests (sequence length 0, slot < 0, as
    engines pad a graph's batch) attend position 0 through their block table's first page;
    their rows are garbage and their K/V and summaries are not written.
    """

    def __init__(self, cfg: MobaConfig, max_reqs: int, max_seq_len: int, page_size: int,
                 num_heads: int, num_kv_heads: int, device: torch.device | str,
                 head_dim: int | None = None):
        check(max_reqs >= 1, f"max_reqs={max_reqs} must be >= 1")
        check(max_seq_len >= 1, f"max_seq_len={max_seq_len} must be >= 1")
        check(num_heads % num_kv_heads == 0,
              f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        cfg.check_seq_len(max_seq_len)
        self.cfg, self.max_reqs, self.max_seq_len, self.page_size = cfg, max_reqs, max_seq_len, page_size
        self.tokens_per_tile, self.block_m = tokens_per_tile_for(
            num_heads, num_kv_heads, cfg.moba_tile_select, cfg.moba_query_tile, head_dim)
        B = cfg.moba_block_size
        self.num_visible_blocks = (max_seq_len + B - 1) // B
        self.max_select = max_select_for(cfg, self.num_visible_blocks)
        dev = torch.device(device)
        i32 = dict(dtype=torch.int32, device=dev)
        self.arange = torch.arange(max_reqs, **i32)
        self.arange64 = self.arange.long()
        self.ones = torch.ones(max_reqs, **i32)
        self.decode = torch.ones(max_reqs, dtype=torch.bool, device=dev)
        self.empty = torch.zeros(0, **i32)
        self.seq_lens = torch.ones(max_reqs, **i32)
        self.pos = torch.zeros(max_reqs, **i32)
        self.slot_mapping = torch.full((max_reqs,), -1, dtype=torch.int64, device=dev)
        self.c1 = torch.zeros(max_reqs, **i32)
        self.flo = torch.zeros(max_reqs, **i32)
        self.n = torch.ones(max_reqs, **i32)
        self.dense = torch.ones(max_reqs, dtype=torch.bool, device=dev)
        self.pool_blk = torch.full((max_reqs,), -1, **i32)
        self.block_table: torch.Tensor | None = None

    def plan(self, seq_lens: torch.Tensor, block_table: torch.Tensor, slot_mapping: torch.Tensor,
             prefill: torch.Tensor | None = None) -> MobaPlan:
        """The plan of a step of one token per request: seq_lens [R] (tokens after this step; 0
        pads), block_table [R, pages], slot_mapping [R] (the new token's slot; < 0 pads),
        prefill [R] bool (a one-token prompt chunk: encoder window; None: all decodes)."""
        R = seq_lens.shape[0]
        cfg, B = self.cfg, self.cfg.moba_block_size
        check(1 <= R <= self.max_reqs, f"{R} decode requests: expected 1..{self.max_reqs}")
        check(block_table.dim() == 2 and block_table.shape[0] == R,
              f"block_table must be [{R}, pages], got {tuple(block_table.shape)}")
        check(slot_mapping.shape == (R,), f"slot_mapping must be [{R}], got {tuple(slot_mapping.shape)}")
        check(prefill is None or prefill.shape == (R,), f"prefill must be [{R}] bool")
        dev = self.seq_lens.device
        L = seq_lens.to(dev).long()
        eff = L.clamp(min=1)
        hi = eff - 1
        right, limit = cfg.moba_decoder_top_k_right, cfg.decoder_seq_limit
        if prefill is not None:
            pf = prefill.to(dev)
            right = torch.where(pf, cfg.moba_encoder_top_k_right, right)
            limit = torch.where(pf, cfg.encoder_seq_limit, limit)
            self.decode[:R].copy_(~pf)
        else:
            self.decode[:R].fill_(True)
        c1, flo, n, dense = group_window(cfg, hi, hi, right, limit)
        self.seq_lens[:R].copy_(eff)
        self.pos[:R].copy_(hi)
        self.slot_mapping[:R].copy_(slot_mapping)
        self.c1[:R].copy_(c1)
        self.flo[:R].copy_(flo)
        self.n[:R].copy_(n)
        self.dense[:R].copy_(dense)
        self.pool_blk[:R].copy_(torch.where((L > 0) & (L % B == 0), L // B - 1, -1))
        if self.block_table is None:
            self.block_table = torch.zeros(self.max_reqs, block_table.shape[1], dtype=torch.int32,
                                           device=dev)
        # a graph captured earlier holds this buffer's address: it is never reallocated
        check(block_table.shape[1] == self.block_table.shape[1],
              f"block_table has {block_table.shape[1]} pages per request; these buffers were made "
              f"for {self.block_table.shape[1]}")
        self.block_table[:R].copy_(block_table)
        ar, ar64 = self.arange[:R], self.arange64[:R]
        empty = TileSet(req=self.empty, q0=self.empty, length=self.empty, pos0=self.empty,
                        index=self.empty.long())
        return MobaPlan(
            num_tokens=R, num_reqs=R, block_size=B, page_size=self.page_size,
            tokens_per_tile=self.tokens_per_tile, block_m=self.block_m,
            seq_lens=self.seq_lens[:R], block_table=self.block_table[:R],
            token_req=ar, token_pos=self.pos[:R], token_decode=self.decode[:R], token_group=ar64,
            token_tile=ar64, slot_mapping=self.slot_mapping[:R],
            group_c1=self.c1[:R], group_flo=self.flo[:R], group_n=self.n[:R],
            group_dense=self.dense[:R], group_req=ar, group_q0=ar, group_len=self.ones[:R],
            prefill=empty,
            decode=TileSet(req=ar, q0=ar, length=self.ones[:R], pos0=self.pos[:R], index=ar64),
            tile_group=ar64, pool_req=ar, pool_blk=self.pool_blk[:R],
            num_visible_blocks=self.num_visible_blocks, max_select=self.max_select,
            max_group_len=1, static=True)
