"""Sparse paged attention over per-tile block lists: the Triton kernel (prefill, and decode with
split-K through `ops/decode/triton_impl.py`).

One program = one kernel tile (consecutive tokens of one request) x one KV head x one split of
the tile's block list. Its rows pack tokens x the GQA group (row r: token r // G, head r % G), so
every K/V tile is loaded once for all query heads of the group. The loop runs over the tile's
selected blocks, `BLOCK_N` keys at a time, pages found through the block table per key row (a
MoBA block may span pages and a page may hold several blocks). In `token` mode each row keeps a
pointer into its own ascending block list and masks the blocks it did not choose.

`token` prefill runs instead on `token_prefill_fwd` (below), organised by KV block: the union of
a tile's per-token picks is close to every block, so walking it costs more than dense attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_backend.ops.common import SENTINEL, check, check_cache, next_pow2
from moba_backend.plan import TileSet

LOG2E = 1.4426950408889634
# NOTE: a global read inside a jit function must be a tl.constexpr.
SENTINEL_K = tl.constexpr(SENTINEL)
# loop steps ahead of its use that the attention loads a step's list entry and pages (0 or 1).
# H100, bf16, D 128, page 16, alternating A/B in one process (`benchmarks/tune_attention.py
# --prefetch 0,1`): 128K `shared` prefill 38.18 -> 37.71 ms (mean of 3 pairs, each pair faster),
# decode batch 16 at 128K 0.409 -> 0.402 ms; 2 steps ahead was slower (43.8 ms, 0.467 ms)
PREFETCH_STEPS = 1
# unmasked steps rescale the accumulator only once a row's running max has grown by more than
# this (log2; 0: every step, as the masked steps do). H100, bf16, D 128, page 16, 128K `shared`
# prefill (`benchmarks/tune_attention.py --rescale-at 8,0,...`), alternating pairs, 8 against 0:
# 35.53/38.61, 35.59/38.33, 35.64/38.24, 36.39/37.32 ms, and in an earlier call 34.77/36.12,
# 38.33/37.36, 36.18/36.28 ms; batch-16 decode at 128K 0.437/0.439, 0.439/0.441 ms. Error
# against float64 comparable (fp16, interpreter: 2.89e-4 against 2.73e-4).
RESCALE_AT_LOG2 = 8.0


@triton.jit
def _step_pages(p_blocks, p_bt, it, it_end, o_n, max_pos, MOBA_B: tl.constexpr, PAGE: tl.constexpr,
                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """List entry j of loop step `it` and the page of each of its BLOCK_N keys ([BLOCK_N] int32;
    0 past the list's end and, CAUSAL, past the tile's last query)."""
    SUB: tl.constexpr = MOBA_B // BLOCK_N
    m_it = it < it_end
    j = tl.load(p_blocks + it // SUB, mask=m_it, other=0)
    pos_k = j * MOBA_B + (it % SUB) * BLOCK_N + o_n
    m_k = (o_n * 0 + it) < it_end          # [BLOCK_N] (a scalar mask broadcast fails under the interpreter)
    if CAUSAL:
        m_k = m_k & (pos_k <= max_pos)
    return j, tl.load(p_bt + pos_k // PAGE, mask=m_k, other=0)


@triton.jit
def _attend_blocks(
    acc, m_i, l_i, i_ptr, it_lo, it_hi, step_hi,
    b_q, p_blocks, p_bt, p_mem, k_ptr, v_ptr, i_hk,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    pos_q, m_row, max_pos, o_d, m_d, scale_log2, softcap, window,
    MOBA_B: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    TOKEN_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE_DOT: tl.constexpr,
    PREFETCH: tl.constexpr, RESCALE_AT: tl.constexpr,
):
    """Online-softmax attention of the rows over list entries [it_lo, it_hi), BLOCK_N keys at a
    time, stopping before loop step step_hi. CAUSAL=False: every key precedes every query (no
    causal or bounds mask)."""
    SUB: tl.constexpr = MOBA_B // BLOCK_N
    o_n = tl.arange(0, BLOCK_N)
    it_end = tl.minimum(it_hi * SUB, step_hi)
    # NOTE: a step's keys are found through two dependent loads (list entry, then page). Issued
    # in the step itself, the K/V copies wait on them; issued PREFETCH steps ahead, they are in
    # registers by then (PREFETCH_STEPS: measured figures).
    j_a, pg_a = _step_pages(p_blocks, p_bt, it_lo * SUB, it_end, o_n, max_pos, MOBA_B, PAGE, BLOCK_N, CAUSAL)
    # NOTE: one flat loop over (selected block, sub-tile) keeps the K/V loads pipelined across
    # blocks; sub-tiles wholly after the tile's last query only load masked (no traffic).
    for it in range(it_lo * SUB, it_end):
        i_sub = it % SUB
        if PREFETCH == 0:
            j, i_page = _step_pages(p_blocks, p_bt, it, it_end, o_n, max_pos, MOBA_B, PAGE, BLOCK_N, CAUSAL)
        else:
            j, i_page = j_a, pg_a
            j_a, pg_a = _step_pages(p_blocks, p_bt, it + 1, it_end, o_n, max_pos, MOBA_B, PAGE, BLOCK_N,
                                    CAUSAL)
        pos_k = j * MOBA_B + i_sub * BLOCK_N + o_n                               # [BLOCK_N]
        if CAUSAL:
            m_k = pos_k <= max_pos
        i_page = i_page.to(tl.int64)
        i_slot = (pos_k % PAGE).to(tl.int64)
        p_k = k_ptr + i_page[:, None] * stride_kp + i_slot[:, None] * stride_ks + i_hk * stride_kh + o_d[None, :]
        p_v = v_ptr + i_page[:, None] * stride_vp + i_slot[:, None] * stride_vs + i_hk * stride_vh + o_d[None, :]
        if CAUSAL:
            b_k = tl.load(p_k, mask=m_k[:, None] & m_d[None, :], other=0.0)
        else:
            b_k = tl.load(p_k, mask=m_d[None, :], other=0.0)
        if IEEE_DOT:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))
        PLAIN: tl.constexpr = not (CAUSAL or HAS_WINDOW or TOKEN_MASK or HAS_SOFTCAP)
        LAZY: tl.constexpr = PLAIN and RESCALE_AT > 0
        if LAZY:
            # the running max (the exponentials' offset) moves, and the accumulator is
            # rescaled, only once some row's max has grown by more than RESCALE_AT (log2): a
            # tile-wide decision; p = 2^(s - m_i) stays below 2^RESCALE_AT meanwhile
            m_new = tl.maximum(m_i, tl.max(b_s, axis=1) * scale_log2)
            if tl.max(m_new - m_i, axis=0) > RESCALE_AT:
                a_r = tl.exp2(m_i - m_new)
                acc = acc * a_r[:, None]
                l_i = l_i * a_r
                m_i = m_new
            m_new = m_i
            b_p = tl.exp2(b_s * scale_log2 - m_i[:, None])
        elif PLAIN:
            # every score is finite (rows past the tile's tokens hold zero queries): the scale
            # folds into one multiply-add with the running max, and no -inf guard is needed
            m_new = tl.maximum(m_i, tl.max(b_s, axis=1) * scale_log2)
            b_p = tl.exp2(b_s * scale_log2 - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
        else:
            if HAS_SOFTCAP:
                b_s = b_s * (scale_log2 / 1.4426950408889634) / softcap
                b_s = softcap * (2.0 * tl.sigmoid(2.0 * b_s) - 1.0) * 1.4426950408889634
            else:
                b_s = b_s * scale_log2
            if CAUSAL or HAS_WINDOW or TOKEN_MASK:
                m_s = m_row[:, None]
                if CAUSAL:
                    m_s = m_s & (pos_k[None, :] <= pos_q[:, None])
                if HAS_WINDOW:
                    m_s = m_s & (pos_q[:, None] - pos_k[None, :] < window)
                if TOKEN_MASK:
                    cur = tl.load(p_mem + i_ptr, mask=m_row, other=SENTINEL_K)
                    m_sel = cur == j
                    m_s = m_s & m_sel[:, None]
                    i_ptr += (m_sel & (i_sub == SUB - 1)).to(tl.int32)
                b_s = tl.where(m_s, b_s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            b_p = tl.exp2(b_s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
        if LAZY:
            l_i = l_i + tl.sum(b_p, axis=1)
        else:
            l_i = l_i * alpha + tl.sum(b_p, axis=1)
        if CAUSAL:
            b_v = tl.load(p_v, mask=m_k[:, None] & m_d[None, :], other=0.0)
        else:
            b_v = tl.load(p_v, mask=m_d[None, :], other=0.0)
        if LAZY:
            acc_in = acc
        else:
            acc_in = acc * alpha[:, None]
        if IEEE_DOT:
            acc = tl.dot(b_p.to(b_v.dtype), b_v, acc_in, input_precision="ieee")
        else:
            acc = tl.dot(b_p.to(b_v.dtype), b_v, acc_in)
        m_i = m_new
    return acc, m_i, l_i, i_ptr


@triton.jit
def _sparse_attn_kernel(
    q_ptr,          # [T, H, D]
    k_ptr,          # [N, P, HK, D]
    v_ptr,          # [N, P, HK, D]
    o_ptr,          # [T, H, D] (NUM_SPLITS == 1) or [T, H, NUM_SPLITS, D] float32 partials
    lse_ptr,        # [T, H, NUM_SPLITS] float32 log2-sum-exp of each partial (NUM_SPLITS > 1)
    bt_ptr,         # [R, max_pages] int32
    t_req_ptr,      # [NT] int32 request of each tile
    t_q0_ptr,       # [NT] int32 first query row
    t_len_ptr,      # [NT] int32 tokens
    t_pos0_ptr,     # [NT] int32 position of the first token
    t_index_ptr,    # [NT] int64 row of the tile in blocks/nblocks
    blocks_ptr,     # [NT_all, HK, LW] int32 ascending block lists
    nblocks_ptr,    # [NT_all, HK] int32
    member_ptr,     # [T, H, W] int32 ascending per-head lists (TOKEN_MASK)
    stride_qt, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_os,
    stride_et, stride_eh,
    stride_bt,
    stride_lt, stride_lh, stride_nt,
    stride_mt, stride_mh,
    scale_log2,     # softmax scale * log2(e)
    softcap,        # > 0: logits = softcap * tanh(logits / softcap)
    window,         # > 0: keys with pos_q - pos_k < window only
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    MOBA_B: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    W_POW2: tl.constexpr, W: tl.constexpr,
    TOKEN_MASK: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE_DOT: tl.constexpr,
    PREFETCH: tl.constexpr, RESCALE_AT: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_hk = tl.program_id(1)
    i_s = tl.program_id(2)

    i_req = tl.load(t_req_ptr + i_t).to(tl.int64)
    i_q0 = tl.load(t_q0_ptr + i_t)
    n_tok = tl.load(t_len_ptr + i_t)
    pos0 = tl.load(t_pos0_ptr + i_t)
    i_row = tl.load(t_index_ptr + i_t)
    max_pos = pos0 + n_tok - 1

    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    i_tok = o_m // G
    i_h = i_hk * G + o_m % G
    m_row = i_tok < n_tok
    m_d = o_d < D
    pos_q = pos0 + i_tok
    i_q = (i_q0 + i_tok).to(tl.int64)

    p_q = q_ptr + i_q[:, None] * stride_qt + i_h[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_row[:, None] & m_d[None, :], other=0.0)

    p_blocks = blocks_ptr + i_row * stride_lt + i_hk * stride_lh
    n_blk = tl.load(nblocks_ptr + i_row * stride_nt + i_hk)
    per_split = tl.cdiv(n_blk, NUM_SPLITS)
    it_lo = i_s * per_split
    it_hi = tl.minimum(it_lo + per_split, n_blk)

    p_bt = bt_ptr + i_req * stride_bt
    p_mem = member_ptr + i_q * stride_mt + i_h * stride_mh                 # [BLOCK_M] row starts
    i_ptr = tl.zeros([BLOCK_M], dtype=tl.int32)
    if TOKEN_MASK:
        if NUM_SPLITS > 1:
            # a split starts mid-list: skip each row's entries below the split's first block
            j_first = tl.load(p_blocks + it_lo, mask=it_lo < it_hi, other=0)
            o_w = tl.arange(0, W_POW2)
            b_mem = tl.load(p_mem[:, None] + o_w[None, :], mask=m_row[:, None] & (o_w[None, :] < W),
                            other=SENTINEL_K)
            i_ptr = tl.sum((b_mem < j_first).to(tl.int32), axis=1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Blocks before the block of the tile's first query need no causal mask. Lists are ascending
    # and end with every block from that block c0 to the last entry (a tile's own blocks are
    # forced; a `shared`/`union` list, made for the whole query tile, may also end with blocks
    # after this kernel tile's last query), so the first n_blk - (last - c0 + 1) entries are such
    # blocks (were a block of that run missing, fewer would run unmasked: still exact).
    last = tl.load(p_blocks + tl.maximum(n_blk - 1, 0))
    n_full = tl.minimum(tl.maximum(n_blk - (last - pos0 // MOBA_B + 1), 0), n_blk)
    mid = tl.minimum(tl.maximum(n_full, it_lo), it_hi)
    # Steps wholly after the tile's last query (the rest of its block; blocks after it in a list
    # made for a wider query tile) would only add masked keys: stop before them. By the run
    # above, block max_pos // MOBA_B is entry n_blk - 1 - (last - max_pos // MOBA_B); the entry is
    # checked before its bound is used.
    SUB: tl.constexpr = MOBA_B // BLOCK_N
    j_stop = max_pos // MOBA_B
    i_stop = n_blk - 1 - (last - j_stop)
    m_stop = (i_stop >= 0) & (i_stop < n_blk)
    j_at = tl.load(p_blocks + tl.minimum(tl.maximum(i_stop, 0), tl.maximum(n_blk - 1, 0)))
    step_hi = tl.where(m_stop & (j_at == j_stop), i_stop * SUB + (max_pos % MOBA_B) // BLOCK_N + 1,
                       n_blk * SUB)
    acc, m_i, l_i, i_ptr = _attend_blocks(
        acc, m_i, l_i, i_ptr, it_lo, mid, step_hi, b_q, p_blocks, p_bt, p_mem, k_ptr, v_ptr, i_hk,
        stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
        pos_q, m_row, max_pos, o_d, m_d, scale_log2, softcap, window,
        MOBA_B, PAGE, BLOCK_N, False, TOKEN_MASK, HAS_SOFTCAP, HAS_WINDOW, IEEE_DOT, PREFETCH, RESCALE_AT)
    acc, m_i, l_i, i_ptr = _attend_blocks(
        acc, m_i, l_i, i_ptr, mid, it_hi, step_hi, b_q, p_blocks, p_bt, p_mem, k_ptr, v_ptr, i_hk,
        stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
        pos_q, m_row, max_pos, o_d, m_d, scale_log2, softcap, window,
        MOBA_B, PAGE, BLOCK_N, True, TOKEN_MASK, HAS_SOFTCAP, HAS_WINDOW, IEEE_DOT, PREFETCH, RESCALE_AT)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    b_o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        p_o = o_ptr + i_q[:, None] * stride_ot + i_h[:, None] * stride_oh + o_d[None, :]
        tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_row[:, None] & m_d[None, :])
    else:
        # split partials are indexed by tile (one token per tile), not by query row
        p_o = o_ptr + i_t * stride_ot + i_h[:, None] * stride_oh + i_s * stride_os + o_d[None, :]
        tl.store(p_o, b_o, mask=m_row[:, None] & m_d[None, :])
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + i_t * stride_et + i_h * stride_eh + i_s, lse, mask=m_row)


def _float32_block_n(block_n: int, d_pow2: int) -> int:
    """Keys a step for float32 operands, which take twice the shared memory of 16-bit ones."""
    return min(block_n, 64 if d_pow2 <= 64 else 32 if d_pow2 <= 128 else 16)


def sparse_attn_launch(q, k_cache, v_cache, block_table, tiles, sel, out, lse, *, block_size, scale,
                       softcap, window, block_m, num_splits, block_n=None, num_warps=None,
                       num_stages=None, prefetch=None, rescale_at=None) -> None:
    """Launch the kernel over `tiles` (a plan TileSet); `out` is [T, H, D] when num_splits == 1,
    else [NT, H, num_splits, D] float32 partials with `lse` [NT, H, num_splits] (one-token tiles)."""
    T, H, D = q.shape
    HK = k_cache.shape[2]
    G = H // HK
    P = k_cache.shape[1]
    D_pow2 = next_pow2(max(D, 16))
    # defaults from benchmarks/tune_attention.py on an H100 (bf16, D 128, 128K tokens, `shared`
    # lists of 60 blocks): 256 rows on 16 warps (four warpgroups of 64 rows) take 64 keys a
    # step over 2 stages: 35.6 ms on 16-token pages, 35.5 ms on 64-token pages (8 warps with
    # 128 keys and 3 stages: 59 ms with this loop, 38.6 ms with the one before its unmasked
    # multiply-add path; 16 warps with 128 keys spill registers: 425+ ms)
    wide = block_m >= 256 and D <= 128 and q.element_size() == 2
    if block_n is None:
        if block_m >= 256:
            block_n = min(64, block_size)
        else:
            block_n = min(128 if block_m >= 64 else 64, block_size)
    if num_warps is None:
        num_warps = 16 if wide else 8 if block_m >= 256 or (block_m >= 128 and D >= 128) else 4
    if num_stages is None:
        num_stages = 2
    if q.element_size() == 4:
        # float32 (exact products, no tensor cores) stages its operands through shared memory
        # at twice the 16-bit size: 128 keys x 4 stages no longer fit in an H100's 228 KiB
        block_n = _float32_block_n(block_n, D_pow2)
        num_stages = min(num_stages, 2)
    elif D_pow2 >= 256:
        # head dim 256: Q (64 KiB at 128 rows) and two stages of 128 keys of K and V (256 KiB)
        # do not fit in an H100's 227 KiB; 64 keys a stage do (192 KiB)
        block_n = min(block_n, 64)
    prefetch = PREFETCH_STEPS if prefetch is None else prefetch
    check(prefetch in (0, 1), f"sparse_attn_launch: prefetch={prefetch}, expected 0 or 1 (loop steps ahead)")
    rescale_at = float(RESCALE_AT_LOG2 if rescale_at is None else rescale_at)
    # p reaches 2^rescale_at before the 16-bit cast of the P @ V product: float16 holds 2^15
    check(0.0 <= rescale_at <= 15.0, f"sparse_attn_launch: rescale_at={rescale_at}, expected 0 (every step) "
                                     f"to 15 (log2 of the largest p between rescales)")
    member = sel.member_blocks
    token_mask = member is not None
    if member is None:
        member = sel.tile_blocks  # never read; any int32 tensor with three dims
    W = member.shape[-1]
    grid = (tiles.num, HK, num_splits)
    if lse is None:
        lse = out  # never written
    _sparse_attn_kernel[grid](
        q, k_cache, v_cache, out, lse, block_table,
        tiles.req, tiles.q0, tiles.length, tiles.pos0, tiles.index,
        sel.tile_blocks, sel.tile_nblocks, member,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2) if num_splits > 1 else 0,
        lse.stride(0), lse.stride(1),
        block_table.stride(0),
        sel.tile_blocks.stride(0), sel.tile_blocks.stride(1), sel.tile_nblocks.stride(0),
        member.stride(0), member.stride(1),
        scale * LOG2E, float(softcap), int(window),
        G=G, D=D, BLOCK_D=D_pow2, MOBA_B=block_size, PAGE=P,
        BLOCK_M=block_m, BLOCK_N=block_n, W_POW2=next_pow2(W), W=W,
        TOKEN_MASK=token_mask, NUM_SPLITS=num_splits,
        HAS_SOFTCAP=softcap > 0, HAS_WINDOW=window > 0, IEEE_DOT=q.dtype == torch.float32,
        PREFETCH=prefetch, RESCALE_AT=rescale_at,
        num_warps=num_warps, num_stages=num_stages,
    )


def check_attn_inputs(q, k_cache, v_cache, block_table, out) -> None:
    check_cache(k_cache, v_cache)
    check(q.dim() == 3 and q.stride(-1) == 1, f"q must be [T, H, D] with a contiguous head dim, got {tuple(q.shape)}")
    T, H, D = q.shape
    HK = k_cache.shape[2]
    check(k_cache.shape[3] == D, f"head dim of q ({D}) and k_cache ({k_cache.shape[3]}) differ")
    check(H % HK == 0, f"query heads {H} not a multiple of KV heads {HK}")
    check(q.dtype == k_cache.dtype, f"q dtype {q.dtype} != cache dtype {k_cache.dtype}")
    check(q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}")
    check(D in (32, 64, 80, 96, 128, 192, 256), f"head dim {D} not supported (32..256)")
    check(block_table.dtype == torch.int32, "block_table must be int32")
    check(out.shape == q.shape and out.stride(-1) == 1, "out must be [T, H, D] like q")


def sparse_prefill_fwd(q, k_cache, v_cache, block_table, tiles, sel, out, *, block_size, scale,
                       softcap=0.0, window=-1, tokens_per_tile, block_m) -> torch.Tensor:
    """Sparse paged prefill.

    q: [T, H, D]; k_cache, v_cache: [N, P, HK, D]; block_table: [R, max_pages] int32;
    tiles: the plan's prefill TileSet (each tile at most `tokens_per_tile` tokens);
    sel: Selection (tile lists [NT, HK, LW], optional member lists [T, H, W]);
    out: [T, H, D], written for the tiles' tokens.
    """
    check_attn_inputs(q, k_cache, v_cache, block_table, out)
    G = q.shape[1] // k_cache.shape[2]
    check(block_m >= tokens_per_tile * G, f"block_m={block_m} < tokens_per_tile x group = {tokens_per_tile * G}")
    if tiles.num:
        sparse_attn_launch(q, k_cache, v_cache, block_table, tiles, sel, out, None, block_size=block_size,
                           scale=scale, softcap=softcap, window=window, block_m=block_m, num_splits=1)
    return out


# ---------------------------------------------------------------------------------------------
# `token` prefill organised by KV block (SPEC.md: "unless the kernel is organised by KV block").
#
# A tile's union of per-token picks is close to every block, so walking it costs more than dense
# attention. Instead the members (token x head) of a span of one request's tokens are bucketed by
# the block they picked; one program takes one (span, KV head, block): it loads the block's keys
# and values and attends them for its bucket's rows, BLOCK_M gathered queries at a time. Each
# (member, pick) leaves a partial (normalized output, log2-sum-exp) and a merge kernel folds each
# member's partials. Work is proportional to the picks, as in MoBA's own formulation.
# ---------------------------------------------------------------------------------------------

# tokens of one request whose members share buckets: more fill the row tiles of a bucket
SPAN_TOKENS = 512
# programs sharing one bucket's row tiles (the sink and a span's own blocks hold every member),
# rows of a tile, warps and stages of the block kernel. H100, 128K tokens, 60 blocks of 128
# (`benchmarks/tune_attention.py --only token`): 2 splits 210 ms, 4 splits 244 ms, 128 rows
# x 8 warps 269 ms, 32 rows 265-310 ms, 1024-token spans 227 ms.
BUCKET_SPLITS = 2
TOKEN_BLOCK_M = 64
TOKEN_NUM_WARPS = 4
TOKEN_NUM_STAGES = 2
# about the most one pass's partials take (tokens x H x W x (D x element + 8) bytes); spans are
# cut no shorter than one kernel tile
PARTIAL_BUDGET_BYTES = 512 << 20


@triton.jit
def _bucket_kernel(
    member_ptr,     # [T, H, W] int32 ascending picks, SENTINEL-padded
    rows_ptr,       # [NR] int64 q row of each pass row
    row_span_ptr,   # [NR] int32 span (within the pass) of each pass row
    cnt_ptr,        # [NS, HK, NBV] int32 bucket sizes (FILL: running cursor)
    off_ptr,        # [NS, HK, NBV] int64 bucket starts (FILL)
    bucket_ptr,     # [NR * H * W] int32 out (FILL): entry (pass row * H + head) * W + pick
    NBV,
    stride_mt, stride_mh,
    H: tl.constexpr, HK: tl.constexpr, W: tl.constexpr, W_POW2: tl.constexpr, FILL: tl.constexpr,
):
    """Count (FILL=False) or place (FILL=True) the picks of one pass row x one head."""
    i_r = tl.program_id(0)
    i_h = tl.program_id(1)
    i_q = tl.load(rows_ptr + i_r)
    i_sp = tl.load(row_span_ptr + i_r)
    o_w = tl.arange(0, W_POW2)
    j = tl.load(member_ptr + i_q * stride_mt + i_h * stride_mh + o_w, mask=o_w < W, other=SENTINEL_K)
    m_w = j != SENTINEL_K
    key = (i_sp * HK + i_h // (H // HK)).to(tl.int64) * NBV + j
    if FILL:
        pos = tl.atomic_add(cnt_ptr + key, 1, mask=m_w)
        start = tl.load(off_ptr + key, mask=m_w, other=0)
        tl.store(bucket_ptr + start + pos, ((i_r * H + i_h) * W + o_w).to(tl.int32), mask=m_w)
    else:
        tl.atomic_add(cnt_ptr + key, 1, mask=m_w)


@triton.jit
def _kv_step(b_q, b_k, b_v, pos_k, pos_q, m_row, m_i, l_i, acc, scale_log2, softcap, window,
             HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE_DOT: tl.constexpr):
    """One online-softmax step of the rows over BLOCK_N keys (causal by position)."""
    if IEEE_DOT:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        b_s = tl.dot(b_q, tl.trans(b_k))
    if HAS_SOFTCAP:
        b_s = b_s * (scale_log2 / 1.4426950408889634) / softcap
        b_s = softcap * (2.0 * tl.sigmoid(2.0 * b_s) - 1.0) * 1.4426950408889634
    else:
        b_s = b_s * scale_log2
    m_s = m_row[:, None] & (pos_k[None, :] <= pos_q[:, None])
    if HAS_WINDOW:
        m_s = m_s & (pos_q[:, None] - pos_k[None, :] < window)
    b_s = tl.where(m_s, b_s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    b_p = tl.exp2(b_s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(b_p, axis=1)
    if IEEE_DOT:
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _block_attn_kernel(
    q_ptr,          # [T, H, D]
    k_ptr,          # [N, P, HK, D]
    v_ptr,          # [N, P, HK, D]
    bt_ptr,         # [R, max_pages] int32
    pos_ptr,        # [T] int32 token positions
    rows_ptr,       # [NR] int64 q row of each pass row
    span_req_ptr,   # [NS] int32 request of each span of the pass
    span_last_ptr,  # [NS] int32 last position of each span of the pass
    cnt_ptr,        # [NS * HK * NBV] int32 bucket sizes
    off_ptr,        # [NS * HK * NBV] int64 bucket starts
    bucket_ptr,     # [NR * H * W] int32 entries
    po_ptr,         # [NR * H * W, D] partial outputs (normalized)
    plse_ptr,       # [NR * H * W] float32 partial log2-sum-exp
    NBV,
    stride_qt, stride_qh,
    stride_kp, stride_ks, stride_kh,
    stride_vp, stride_vs, stride_vh,
    stride_bt,
    scale_log2, softcap, window,
    H: tl.constexpr, HK: tl.constexpr, W: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    MOBA_B: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """One bucket (span, KV head, block j), every SPLITS-th row tile of it: BLOCK_M gathered rows
    at a time attend block j. A block of one BLOCK_N step is loaded once for all its tiles."""
    key = tl.program_id(0)
    i_split = tl.program_id(1)
    count = tl.load(cnt_ptr + key)
    n_tiles = tl.cdiv(count, BLOCK_M)
    if i_split < n_tiles:
        i_sp = key // (HK * NBV)
        i_hk = (key // NBV) % HK
        j = key % NBV
        start = tl.load(off_ptr + key)
        i_req = tl.load(span_req_ptr + i_sp).to(tl.int64)
        last = tl.load(span_last_ptr + i_sp)
        p_bt = bt_ptr + i_req * stride_bt
        o_m = tl.arange(0, BLOCK_M)
        o_n = tl.arange(0, BLOCK_N)
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < D
        pos_k = j * MOBA_B + o_n
        m_k = pos_k <= last
        i_page = tl.load(p_bt + pos_k // PAGE, mask=m_k, other=0).to(tl.int64)
        i_slot = (pos_k % PAGE).to(tl.int64)
        m_kd = m_k[:, None] & m_d[None, :]
        b_k = tl.load(k_ptr + i_page[:, None] * stride_kp + i_slot[:, None] * stride_ks + i_hk * stride_kh
                      + o_d[None, :], mask=m_kd, other=0.0)
        b_v = tl.load(v_ptr + i_page[:, None] * stride_vp + i_slot[:, None] * stride_vs + i_hk * stride_vh
                      + o_d[None, :], mask=m_kd, other=0.0)
        for it in range(i_split, n_tiles, SPLITS):
            m_row = it * BLOCK_M + o_m < count
            e = tl.load(bucket_ptr + start + it * BLOCK_M + o_m, mask=m_row, other=0).to(tl.int64)
            i_h = (e // W) % H
            i_q = tl.load(rows_ptr + e // (W * H), mask=m_row, other=0)
            pos_q = tl.load(pos_ptr + i_q, mask=m_row, other=0)
            b_q = tl.load(q_ptr + i_q[:, None] * stride_qt + i_h[:, None] * stride_qh + o_d[None, :],
                          mask=m_row[:, None] & m_d[None, :], other=0.0)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            m_i, l_i, acc = _kv_step(b_q, b_k, b_v, pos_k, pos_q, m_row, m_i, l_i, acc, scale_log2,
                                     softcap, window, HAS_SOFTCAP, HAS_WINDOW, IEEE_DOT)
            for i_sub in range(1, MOBA_B // BLOCK_N):
                pos_k2 = j * MOBA_B + i_sub * BLOCK_N + o_n
                m_k2 = pos_k2 <= last
                i_page2 = tl.load(p_bt + pos_k2 // PAGE, mask=m_k2, other=0).to(tl.int64)
                i_slot2 = (pos_k2 % PAGE).to(tl.int64)
                m_kd2 = m_k2[:, None] & m_d[None, :]
                b_k2 = tl.load(k_ptr + i_page2[:, None] * stride_kp + i_slot2[:, None] * stride_ks
                               + i_hk * stride_kh + o_d[None, :], mask=m_kd2, other=0.0)
                b_v2 = tl.load(v_ptr + i_page2[:, None] * stride_vp + i_slot2[:, None] * stride_vs
                               + i_hk * stride_vh + o_d[None, :], mask=m_kd2, other=0.0)
                m_i, l_i, acc = _kv_step(b_q, b_k2, b_v2, pos_k2, pos_q, m_row, m_i, l_i, acc, scale_log2,
                                         softcap, window, HAS_SOFTCAP, HAS_WINDOW, IEEE_DOT)
            l_safe = tl.where(l_i > 0, l_i, 1.0)
            b_o = acc / l_safe[:, None]
            tl.store(po_ptr + e[:, None] * D + o_d[None, :], b_o.to(po_ptr.dtype.element_ty),
                     mask=m_row[:, None] & m_d[None, :])
            tl.store(plse_ptr + e, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")), mask=m_row)


@triton.jit
def _merge_kernel(
    member_ptr,     # [T, H, W] int32
    rows_ptr,       # [NR] int64
    po_ptr,         # [NR * H * W, D] partial outputs
    plse_ptr,       # [NR * H * W] float32
    o_ptr,          # [T, H, D]
    stride_mt, stride_mh, stride_ot, stride_oh,
    H: tl.constexpr, W: tl.constexpr, W_POW2: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One pass row x one head: fold its partials by their log2-sum-exp."""
    i_r = tl.program_id(0)
    i_h = tl.program_id(1)
    i_q = tl.load(rows_ptr + i_r)
    o_w = tl.arange(0, W_POW2)
    o_d = tl.arange(0, BLOCK_D)
    j = tl.load(member_ptr + i_q * stride_mt + i_h * stride_mh + o_w, mask=o_w < W, other=SENTINEL_K)
    m_w = j != SENTINEL_K
    e = (i_r * H + i_h).to(tl.int64) * W + o_w
    lse = tl.load(plse_ptr + e, mask=m_w, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wgt = tl.exp2(lse - m_safe)
    b_o = tl.load(po_ptr + e[:, None] * D + o_d[None, :], mask=m_w[:, None] & (o_d[None, :] < D), other=0.0)
    tot = tl.sum(wgt, axis=0)
    res = tl.sum(wgt[:, None] * b_o.to(tl.float32), axis=0) / tl.where(tot > 0, tot, 1.0)
    tl.store(o_ptr + i_q * stride_ot + i_h * stride_oh + o_d, res.to(o_ptr.dtype.element_ty), mask=o_d < D)


def _spans(tiles: TileSet, span_tokens: int) -> list[tuple[int, int, int, int]]:
    """Consecutive kernel tiles of one request merged into spans of at most `span_tokens` tokens:
    [(request, first q row, tokens, first position)] (one host read of the tile arrays)."""
    req, q0, length, pos0 = torch.stack([tiles.req, tiles.q0, tiles.length, tiles.pos0]).cpu().tolist()
    spans: list[list[int]] = []
    for r, a, n, p in zip(req, q0, length, pos0):
        s = spans[-1] if spans else None
        if s is not None and s[0] == r and s[1] + s[2] == a and s[3] + s[2] == p and s[2] + n <= span_tokens:
            s[2] += n
        else:
            spans.append([r, a, n, p])
    return [tuple(s) for s in spans]


def _span_passes(tiles: TileSet, per_token: int, budget: int, dev):
    """Spans and passes of a prefill TileSet: (q row of each span row [NR] int64, span of each
    row [NR] int32, request [NS] int32 and last position [NS] int32 of each span, first row of
    each span (host list), passes as (first span, end span) host pairs). Made once per plan (one
    host read of the tiles) and kept on the TileSet, which every layer of the step shares."""
    # about the budget: a span is cut no shorter than one kernel tile
    span_tokens = max(1, min(SPAN_TOKENS, budget // per_token))
    key = (span_tokens, per_token, budget, str(dev))
    cache = tiles.__dict__.setdefault("_token_spans", {})
    if key in cache:
        return cache[key]
    spans = _spans(tiles, span_tokens)
    # every pass's index arrays in one host-to-device copy (a copy from pageable host memory
    # waits for the stream, so none is made inside the pass loop)
    lens = torch.tensor([n for _, _, n, _ in spans])
    host = torch.cat([torch.cat([torch.arange(a, a + n) for _, a, n, _ in spans]),
                      torch.repeat_interleave(torch.arange(len(spans)), lens),
                      torch.tensor([r for r, _, _, _ in spans]),
                      torch.tensor([p + n - 1 for _, _, n, p in spans])]).to(dev)
    n_rows = int(lens.sum())
    row0 = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).tolist()
    passes, i = [], 0
    while i < len(spans):
        s0, tokens = i, 0
        while i < len(spans) and (i == s0 or (tokens + spans[i][2]) * per_token <= budget):
            tokens += spans[i][2]
            i += 1
        passes.append((s0, i))
    cache[key] = (host[:n_rows], host[n_rows:2 * n_rows].int(), host[2 * n_rows:2 * n_rows + len(spans)].int(),
                  host[2 * n_rows + len(spans):].int(), row0, passes)
    return cache[key]


def token_prefill_fwd(q, k_cache, v_cache, block_table, token_pos, tiles, sel, out, *, block_size,
                      scale, softcap=0.0, window=-1, num_visible_blocks) -> torch.Tensor:
    """Sparse paged prefill in `token` mode, organised by KV block.

    q: [T, H, D]; k_cache, v_cache: [N, P, HK, D]; block_table: [R, max_pages] int32;
    token_pos: [T] int32 positions; tiles: the plan's prefill TileSet; sel.member_blocks:
    [T, H, W] int32 each member's ascending picks (SENTINEL-padded); out: [T, H, D], written for
    the tiles' tokens. Spans run in passes whose partials fit PARTIAL_BUDGET_BYTES.
    """
    check_attn_inputs(q, k_cache, v_cache, block_table, out)
    member = sel.member_blocks
    check(member is not None and member.dim() == 3 and member.shape[:2] == q.shape[:2]
          and member.dtype == torch.int32 and member.stride(-1) == 1,
          "token prefill needs member_blocks [T, H, W] int32 with a contiguous last dim")
    check(token_pos.dtype == torch.int32 and token_pos.shape[0] >= q.shape[0],
          "token_pos must be int32 [T]")
    if tiles.num == 0:
        return out
    T, H, D = q.shape
    HK = k_cache.shape[2]
    P = k_cache.shape[1]
    W = member.shape[2]
    nbv = max(int(num_visible_blocks), 1)
    dev = q.device
    part_dtype = torch.float32 if q.dtype == torch.float32 else q.dtype
    # partial output + log-sum-exp + bucket entry per pick
    per_token = H * W * (D * part_dtype.itemsize + 8)
    D_pow2 = next_pow2(max(D, 16))
    block_m = TOKEN_BLOCK_M
    # head dim 256: 64 keys a step need 272 KiB of shared memory on an H100 (227 KiB there)
    block_n = min(block_size, 128 if D_pow2 <= 128 else 32)
    if q.element_size() == 4:
        block_n = _float32_block_n(block_n, D_pow2)
    all_rows, all_row_span, span_req, span_last, row0, passes = _span_passes(
        tiles, per_token, PARTIAL_BUDGET_BYTES, dev)
    max_spans = max(s1 - s0 for s0, s1 in passes)
    max_tokens = max(row0[s1] - row0[s0] for s0, s1 in passes)
    cnt_all = torch.empty(max_spans * HK * nbv, dtype=torch.int32, device=dev)
    cur_all = torch.empty_like(cnt_all)
    bucket = torch.empty(max_tokens * H * W, dtype=torch.int32, device=dev)
    po = torch.empty(max_tokens * H * W, D, dtype=part_dtype, device=dev)
    plse = torch.empty(max_tokens * H * W, dtype=torch.float32, device=dev)
    common = dict(H=H, HK=HK, W=W)
    for s0, s1 in passes:
        ns, tokens = s1 - s0, row0[s1] - row0[s0]
        rows = all_rows[row0[s0]:row0[s1]]
        row_span = all_row_span[row0[s0]:row0[s1]] - s0
        nkeys = ns * HK * nbv
        cnt, cur = cnt_all[:nkeys].zero_(), cur_all[:nkeys].zero_()
        _bucket_kernel[(tokens, H)](member, rows, row_span, cnt, cnt, cnt, nbv, member.stride(0),
                                    member.stride(1), W_POW2=next_pow2(W), FILL=False, **common)
        off = torch.cumsum(cnt, 0, dtype=torch.int64) - cnt
        _bucket_kernel[(tokens, H)](member, rows, row_span, cur, off, bucket, nbv, member.stride(0),
                                    member.stride(1), W_POW2=next_pow2(W), FILL=True, **common)
        _block_attn_kernel[(nkeys, BUCKET_SPLITS)](
            q, k_cache, v_cache, block_table, token_pos, rows, span_req[s0:s1], span_last[s0:s1],
            cnt, off, bucket, po, plse, nbv,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_table.stride(0), scale * LOG2E, float(softcap), int(window),
            D=D, BLOCK_D=D_pow2, MOBA_B=block_size, PAGE=P, BLOCK_M=block_m, BLOCK_N=block_n,
            SPLITS=BUCKET_SPLITS,
            HAS_SOFTCAP=softcap > 0, HAS_WINDOW=window > 0, IEEE_DOT=q.dtype == torch.float32,
            num_warps=TOKEN_NUM_WARPS, num_stages=TOKEN_NUM_STAGES, **common,
        )
        _merge_kernel[(tokens, H)](member, rows, po, plse, out, member.stride(0), member.stride(1),
                                   out.stride(0), out.stride(1), W_POW2=next_pow2(W), D=D,
                                   BLOCK_D=D_pow2, num_warps=4, H=H, W=W)
    return out
