"""Selection, Triton kernels; summaries are read straight from the paged summary cache through
the block table (or from a compact 16-bit copy of it).

- `gate_scores_fwd`: raw block scores s[t, h, j] of a token range (rows: the GQA group's heads);
- `group_scores_fwd` + `group_topn_fwd`: `shared` mode's group scores and each group's top n;
- `member_topk_fwd`: each member's n blocks in `token` / `union` mode, from raw scores;
- `decode_select_fwd`: a decode-only step's whole selection, fused.
Top n are exact (`_top_n`: a bisection over order-preserving integer keys, ties to the lower
block index), but for decode rows past DECODE_REG_BLOCKS blocks (a float threshold bisected in
scratch). `minmax` uses sum_d max(q_d mx_d, q_d mn_d) = relu(q) . mx + min(q, 0) . mn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from moba_backend.ops.common import SENTINEL, check, next_pow2
from moba_backend.plan import MobaPlan

LOG2E = 1.4426950408889634
SENTINEL_K = tl.constexpr(SENTINEL)

if TYPE_CHECKING:
    from moba_backend.ops.select.fast import Selection


@triton.jit
def _gate_score_kernel(
    q_ptr,          # [T, H, D]
    s_ptr,          # [N, SLOTS, S, HK, D] summary cache
    bt_ptr,         # [R, max_pages] int32
    req_ptr,        # [T] int32
    pos_ptr,        # [T] int32
    seq_ptr,        # [R] int32
    o_ptr,          # [t_hi - t_lo, H, NBV] float32
    t_lo, t_hi,
    stride_qt, stride_qh,
    stride_sp, stride_sslot, stride_ss, stride_sh,
    stride_bt,
    stride_ot, stride_oh,
    NBV,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    MOBA_B: tl.constexpr, PAGE: tl.constexpr, BLOCK_J: tl.constexpr, MINMAX: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Raw scores of BLOCK_M // G consecutive tokens x the G heads of one KV head (row r: token
    r // G, head r % G) against BLOCK_J blocks. Rows of several requests take one pass per
    request (each reads its own summaries); blocks past a row's own position are stored as 0."""
    TOKS: tl.constexpr = BLOCK_M // G
    i_t0 = t_lo + tl.program_id(0) * TOKS
    i_hk = tl.program_id(1)
    j0 = tl.program_id(2) * BLOCK_J
    o_m = tl.arange(0, BLOCK_M)
    i_tok = i_t0 + o_m // G
    m_row = (o_m < TOKS * G) & (i_tok < t_hi)
    i_h = i_hk * G + o_m % G
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_j = j0 + tl.arange(0, BLOCK_J)
    r_tok = tl.load(req_ptr + i_tok, mask=m_row, other=-1)
    pos = tl.load(pos_ptr + i_tok, mask=m_row, other=-1)
    p_o = o_ptr + (i_tok - t_lo).to(tl.int64)[:, None] * stride_ot + i_h[:, None] * stride_oh + o_j[None, :]
    m_o = m_row[:, None] & (o_j[None, :] < NBV)
    if j0 * MOBA_B > tl.max(pos, axis=0):
        tl.store(p_o, tl.zeros([BLOCK_M, BLOCK_J], dtype=tl.float32), mask=m_o)
    else:
        b_q = tl.load(q_ptr + i_tok.to(tl.int64)[:, None] * stride_qt + i_h[:, None] * stride_qh + o_d[None, :],
                      mask=m_row[:, None] & m_d[None, :], other=0.0)
        r_lo = tl.min(tl.where(m_row, r_tok, 1 << 30), axis=0)
        r_hi = tl.max(r_tok, axis=0)
        for r in range(r_lo, r_hi + 1):
            m_r = r_tok == r
            if tl.sum(m_r.to(tl.int32), axis=0) > 0:
                n_complete = tl.load(seq_ptr + r) // MOBA_B
                m_j = o_j < n_complete
                bt_row = bt_ptr + r * stride_bt
                b_s = _scores(b_q, s_ptr, bt_row, o_j, m_j, i_hk, o_d, m_d, stride_sp, stride_sslot,
                              stride_ss, stride_sh, MOBA_B, PAGE, MINMAX, IEEE)
                b_s = tl.where(m_j[None, :] & (o_j[None, :] * MOBA_B <= pos[:, None]), b_s, 0.0)
                tl.store(p_o, b_s, mask=m_o & m_r[:, None])


def gate_scores_fwd(q: torch.Tensor, summary_cache: torch.Tensor, plan: MobaPlan, t_lo: int, t_hi: int,
                    nbv: int, gate: str, block_m: int | None = None) -> torch.Tensor:
    """Raw scores of tokens [t_lo, t_hi): [t_hi - t_lo, H, nbv] float32 (0 past complete blocks
    and past each token's own block). float32 queries: exact float32 products; 16-bit queries:
    16-bit products against summaries rounded to their dtype (`naive.gate_scores`).
    `block_m`: rows (tokens x heads of a group) per program, default max(64, G); decode steps
    take one token a program (every row of a pass over one request's summaries).

    q: [T, H, D]; summary_cache: [N, SLOTS, S, HK, D].
    """
    T, H, D = q.shape
    HK = summary_cache.shape[3]
    G = H // HK
    n = t_hi - t_lo
    out = torch.empty(n, H, nbv, dtype=torch.float32, device=q.device)
    block_m = block_m or max(64, next_pow2(G))
    toks = block_m // G
    block_j = 64
    grid = (triton.cdiv(n, toks), HK, triton.cdiv(nbv, block_j))
    if n == 0:
        return out
    _gate_score_kernel[grid](
        q, summary_cache, plan.block_table, plan.token_req, plan.token_pos, plan.seq_lens, out, t_lo, t_hi,
        q.stride(0), q.stride(1),
        summary_cache.stride(0), summary_cache.stride(1), summary_cache.stride(2), summary_cache.stride(3),
        plan.block_table.stride(0), out.stride(0), out.stride(1), nbv,
        G=G, D=D, BLOCK_D=next_pow2(max(D, 16)), BLOCK_M=block_m,
        MOBA_B=plan.block_size, PAGE=plan.page_size, BLOCK_J=block_j, MINMAX=gate == "minmax",
        IEEE=q.dtype == torch.float32, num_warps=4,
    )
    return out


def triton_scorer(gate: str):
    """A `fast.select` scorer backed by the Triton gate kernel."""
    def scorer(q, summary_cache, plan, t_lo, t_hi, nbv):
        return gate_scores_fwd(q, summary_cache, plan, t_lo, t_hi, nbv, gate)
    return scorer


# ---------------------------------------------------------------------------------------------
# Fused selection kernels. Both read summaries through the block table, like the score kernel.
# ---------------------------------------------------------------------------------------------

@triton.jit
def _load_summary(s_ptr, bt_row, o_j, m_j, i_hk, o_d, m_d, slot_off,
                  stride_sp, stride_sslot, stride_sh, MOBA_B: tl.constexpr, PAGE: tl.constexpr):
    """Summary vectors of blocks o_j (one slot of S): [BLOCK_J, BLOCK_D] float32."""
    last = o_j * MOBA_B + MOBA_B - 1
    i_page = tl.load(bt_row + last // PAGE, mask=m_j, other=0).to(tl.int64)
    slot = (last % PAGE) // MOBA_B
    p = s_ptr + i_page[:, None] * stride_sp + slot[:, None] * stride_sslot + slot_off + i_hk * stride_sh + o_d[None, :]
    return tl.load(p, mask=m_j[:, None] & m_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _scores(b_q, s_ptr, bt_row, o_j, m_j, i_hk, o_d, m_d, stride_sp, stride_sslot, stride_ss, stride_sh,
            MOBA_B: tl.constexpr, PAGE: tl.constexpr, MINMAX: tl.constexpr, IEEE: tl.constexpr):
    """Raw gate scores of rows b_q [BLOCK_M, BLOCK_D] against blocks o_j: [BLOCK_M, BLOCK_J] float32.

    Summaries are rounded to b_q's dtype, as the reference does (`naive.gate_scores`): float32
    rows give exact float32 products (IEEE), 16-bit rows 16-bit tensor-core products.
    """
    b_s0 = _load_summary(s_ptr, bt_row, o_j, m_j, i_hk, o_d, m_d, 0, stride_sp, stride_sslot, stride_sh,
                         MOBA_B, PAGE).to(b_q.dtype)
    if MINMAX:
        b_s1 = _load_summary(s_ptr, bt_row, o_j, m_j, i_hk, o_d, m_d, stride_ss, stride_sp, stride_sslot,
                             stride_sh, MOBA_B, PAGE).to(b_q.dtype)
        q_pos = tl.maximum(b_q, 0.0).to(b_q.dtype)  # (a 16-bit max with 0.0 comes back float32)
        q_neg = tl.minimum(b_q, 0.0).to(b_q.dtype)
        return _dot(q_pos, tl.trans(b_s0), IEEE) + _dot(q_neg, tl.trans(b_s1), IEEE)
    return _dot(b_q, tl.trans(b_s0), IEEE)


@triton.jit
def _scores_direct(b_q, s_row, o_j, m_j, o_d, m_d, stride_ss, stride_sj,
                   MINMAX: tl.constexpr, IEEE: tl.constexpr):
    """`_scores` over a compact copy (`compact_summaries`): block j's summary at
    s_row + j * stride_sj (one request and KV head), already in b_q's dtype."""
    p = s_row + o_j[:, None] * stride_sj + o_d[None, :]
    m = m_j[:, None] & m_d[None, :]
    b_s0 = tl.load(p, mask=m, other=0.0)
    if MINMAX:
        b_s1 = tl.load(p + stride_ss, mask=m, other=0.0)
        q_pos = tl.maximum(b_q, 0.0).to(b_q.dtype)
        q_neg = tl.minimum(b_q, 0.0).to(b_q.dtype)
        return _dot(q_pos, tl.trans(b_s0), IEEE) + _dot(q_neg, tl.trans(b_s1), IEEE)
    return _dot(b_q, tl.trans(b_s0), IEEE)


@triton.jit
def _group_members(q_ptr, q0, r0, n_rows, i_hk, o_d, m_d, stride_qt, stride_qh,
                   G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows r0 .. r0 + BLOCK_M - 1 of a group's members (token x head, heads fastest): their
    query rows i_q, heads i_h, row mask and queries b_q [BLOCK_M, BLOCK_D] (zeros past n_rows)."""
    o_m = r0 + tl.arange(0, BLOCK_M)
    m_row = o_m < n_rows
    i_q = (q0 + o_m // G).to(tl.int64)
    i_h = i_hk * G + o_m % G
    b_q = tl.load(q_ptr + i_q[:, None] * stride_qt + i_h[:, None] * stride_qh + o_d[None, :],
                  mask=m_row[:, None] & m_d[None, :], other=0.0)
    return i_q, i_h, m_row, b_q


@triton.jit
def _group_scores(b_q, s_ptr, s_row, bt_row, o_j, m_j, i_hk, o_d, m_d,
                  stride_sp, stride_sslot, stride_ss, stride_sh,
                  MOBA_B: tl.constexpr, PAGE: tl.constexpr, MINMAX: tl.constexpr, IEEE: tl.constexpr,
                  DIRECT: tl.constexpr):
    """`_scores` through the paged cache, or (DIRECT) `_scores_direct` over a compact copy whose
    (j, slot) strides come in the places of (slot of a page, slot)."""
    if DIRECT:
        return _scores_direct(b_q, s_row, o_j, m_j, o_d, m_d, stride_ss, stride_sslot, MINMAX, IEEE)
    return _scores(b_q, s_ptr, bt_row, o_j, m_j, i_hk, o_d, m_d, stride_sp, stride_sslot, stride_ss,
                   stride_sh, MOBA_B, PAGE, MINMAX, IEEE)


@triton.jit
def _group_scores_t(b_q, s_ptr, s_row, bt_row, o_j, m_j, i_hk, o_d, m_d,
                    stride_sp, stride_sslot, stride_ss, stride_sh,
                    MOBA_B: tl.constexpr, PAGE: tl.constexpr, MINMAX: tl.constexpr, IEEE: tl.constexpr,
                    DIRECT: tl.constexpr):
    """`_group_scores` transposed: [BLOCK_J, BLOCK_M], blocks as rows, so a max over the
    members (columns) reduces inside a warp."""
    dt = b_q.dtype
    if DIRECT:
        p = s_row + o_j[:, None] * stride_sslot + o_d[None, :]
        m = m_j[:, None] & m_d[None, :]
        b_s0 = tl.load(p, mask=m, other=0.0)
        b_s1 = b_s0
        if MINMAX:
            b_s1 = tl.load(p + stride_ss, mask=m, other=0.0)
    else:
        b_s0 = _load_summary(s_ptr, bt_row, o_j, m_j, i_hk, o_d, m_d, 0, stride_sp, stride_sslot, stride_sh,
                             MOBA_B, PAGE).to(dt)
        b_s1 = b_s0
        if MINMAX:
            b_s1 = _load_summary(s_ptr, bt_row, o_j, m_j, i_hk, o_d, m_d, stride_ss, stride_sp, stride_sslot,
                                 stride_sh, MOBA_B, PAGE).to(dt)
    return _dot_t(b_s0, b_s1, b_q, MINMAX, IEEE)


@triton.jit
def _dot_t(b_s0, b_s1, b_q, MINMAX: tl.constexpr, IEEE: tl.constexpr):
    """Scores of loaded summaries b_s0 (and, for `minmax`, b_s1) [BLOCK_J, BLOCK_D] against rows
    b_q [BLOCK_M, BLOCK_D], transposed: [BLOCK_J, BLOCK_M]."""
    if MINMAX:
        q_pos = tl.maximum(b_q, 0.0).to(b_q.dtype)
        q_neg = tl.minimum(b_q, 0.0).to(b_q.dtype)
        return _dot(b_s0, tl.trans(q_pos), IEEE) + _dot(b_s1, tl.trans(q_neg), IEEE)
    return _dot(b_s0, tl.trans(b_q), IEEE)


@triton.jit
def _lse_step(b_s, m_i, l_i, scale_log2):
    """One online log2-sum-exp2 step over scores b_s [BLOCK_M, BLOCK_J] (masked columns -inf,
    at least one finite column: the running max is finite after the first step, so no -inf
    guard, and the scale folds into one multiply-add)."""
    m_new = tl.maximum(m_i, tl.max(b_s, axis=1) * scale_log2)
    return m_new, l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(b_s * scale_log2 - m_new[:, None]), axis=1)


@triton.jit
def _lse_sweep(b_q, s_ptr, s_row, bt_row, i_hk, o_d, m_d, stride_sp, stride_sslot, stride_ss, stride_sh,
               scale_log2, sink, flo, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr,
               MOBA_B: tl.constexpr, PAGE: tl.constexpr, MINMAX: tl.constexpr, IEEE: tl.constexpr,
               DIRECT: tl.constexpr):
    """Running (max, sum) of 2^(s * scale_log2) of each row of b_q over candidates sink .. flo-1:
    log2-sum-exp2 = m + log2(l) ([BLOCK_M] each; m -inf and l 0 when there is no candidate).
    The whole steps skip the column mask; only a last partial step applies it (the fused group
    kernel at 128K on an H200: 2.57 -> 2.48 ms, three alternating pairs)."""
    o_jj = tl.arange(0, BLOCK_J)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    j_tail = sink + tl.maximum(flo - sink, 0) // BLOCK_J * BLOCK_J     # (no candidate: flo <= sink)
    for j0 in range(sink, j_tail, BLOCK_J):
        o_j = j0 + o_jj
        b_s = _group_scores(b_q, s_ptr, s_row, bt_row, o_j, o_j < flo, i_hk, o_d, m_d, stride_sp, stride_sslot,
                            stride_ss, stride_sh, MOBA_B, PAGE, MINMAX, IEEE, DIRECT)
        m_i, l_i = _lse_step(b_s, m_i, l_i, scale_log2)
    for j0 in range(j_tail, flo, BLOCK_J):          # at most one partial step
        o_j = j0 + o_jj
        m_j = o_j < flo
        b_s = _group_scores(b_q, s_ptr, s_row, bt_row, o_j, m_j, i_hk, o_d, m_d, stride_sp, stride_sslot,
                            stride_ss, stride_sh, MOBA_B, PAGE, MINMAX, IEEE, DIRECT)
        m_i, l_i = _lse_step(tl.where(m_j[None, :], b_s, float("-inf")), m_i, l_i, scale_log2)
    return m_i, l_i


@triton.jit
def _group_lse_kernel(
    q_ptr,          # [T, H, D]
    s_ptr,          # [N, SLOTS, S, HK, D]
    bt_ptr,         # [R, max_pages] int32
    g_req_ptr, g_q0_ptr, g_len_ptr, g_flo_ptr,              # [NG] int32
    lse_ptr,        # [T, H] float32: log2-sum-exp2 of s * scale * log2(e) over the candidates
    stride_qt, stride_qh,
    stride_sp, stride_sslot, stride_ss, stride_sh,
    stride_bt, stride_lt,
    scale_log2, sink,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr, MOBA_B: tl.constexpr, PAGE: tl.constexpr,
    MINMAX: tl.constexpr, IEEE: tl.constexpr,
):
    """`shared` mode, pass 1: each member's softmax normaliser over its group's candidates.
    One program = BLOCK_M members (token x head rows) of one (group, KV head)."""
    i_g = tl.program_id(0)
    i_hk = tl.program_id(1)
    r0 = tl.program_id(2) * BLOCK_M
    n_rows = tl.load(g_len_ptr + i_g) * G
    if r0 >= n_rows:
        return
    i_req = tl.load(g_req_ptr + i_g).to(tl.int64)
    q0 = tl.load(g_q0_ptr + i_g)
    flo = tl.load(g_flo_ptr + i_g)
    bt_row = bt_ptr + i_req * stride_bt
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    i_q, i_h, m_row, b_q = _group_members(q_ptr, q0, r0, n_rows, i_hk, o_d, m_d, stride_qt, stride_qh,
                                          G, BLOCK_M)
    m_i, l_i = _lse_sweep(b_q, s_ptr, s_ptr, bt_row, i_hk, o_d, m_d, stride_sp, stride_sslot, stride_ss,
                          stride_sh, scale_log2, sink, flo, BLOCK_M, BLOCK_J, MOBA_B, PAGE, MINMAX, IEEE,
                          False)
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    tl.store(lse_ptr + i_q * stride_lt + i_h, lse, mask=m_row)


@triton.jit
def _group_max_kernel(
    q_ptr,          # [T, H, D]
    s_ptr,          # [N, SLOTS, S, HK, D]
    bt_ptr,         # [R, max_pages] int32
    g_req_ptr, g_q0_ptr, g_len_ptr, g_c1_ptr, g_flo_ptr,   # [NG] int32
    lse_ptr,        # [T, H] float32 from _group_lse_kernel
    o_ptr,          # [NG, HK, NBV] float32 group scores (+inf forced, -inf past c1)
    stride_qt, stride_qh,
    stride_sp, stride_sslot, stride_ss, stride_sh,
    stride_bt, stride_lt, stride_og, stride_oh,
    scale_log2, sink, NBV,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr, MOBA_B: tl.constexpr, PAGE: tl.constexpr,
    MINMAX: tl.constexpr, IEEE: tl.constexpr,
):
    """`shared` mode, pass 2: for BLOCK_J blocks of one (group, KV head), the group score
    max_m p[m, j] = 2^(max_m (z[m, j] - lse[m])) (exp2 is monotone: one exp2 per block). The
    summaries are loaded once; the products are computed transposed ([blocks, members]) so the
    max over members reduces inside a warp."""
    i_g = tl.program_id(0)
    i_hk = tl.program_id(1)
    j0 = tl.program_id(2) * BLOCK_J
    c1 = tl.load(g_c1_ptr + i_g)
    flo = tl.load(g_flo_ptr + i_g)
    o_j = j0 + tl.arange(0, BLOCK_J)
    forced = (o_j <= c1) & ((o_j < sink) | (o_j >= flo))
    cand = (o_j >= sink) & (o_j < flo)
    best = tl.full([BLOCK_J], float("-inf"), dtype=tl.float32)
    if (j0 < flo) & (j0 + BLOCK_J > sink):
        i_req = tl.load(g_req_ptr + i_g).to(tl.int64)
        q0 = tl.load(g_q0_ptr + i_g)
        n_rows = tl.load(g_len_ptr + i_g) * G
        bt_row = bt_ptr + i_req * stride_bt
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < D
        dt = q_ptr.dtype.element_ty
        b_s0 = _load_summary(s_ptr, bt_row, o_j, cand, i_hk, o_d, m_d, 0, stride_sp, stride_sslot,
                             stride_sh, MOBA_B, PAGE).to(dt)
        b_s1 = b_s0
        if MINMAX:
            b_s1 = _load_summary(s_ptr, bt_row, o_j, cand, i_hk, o_d, m_d, stride_ss, stride_sp,
                                 stride_sslot, stride_sh, MOBA_B, PAGE).to(dt)
        for r0 in range(0, n_rows, BLOCK_M):
            i_q, i_h, m_row, b_q = _group_members(q_ptr, q0, r0, n_rows, i_hk, o_d, m_d, stride_qt,
                                                  stride_qh, G, BLOCK_M)
            lse = tl.load(lse_ptr + i_q * stride_lt + i_h, mask=m_row, other=float("inf"))
            b_t = _dot_t(b_s0, b_s1, b_q.to(dt), MINMAX, IEEE)
            b_t = b_t * scale_log2 - lse[None, :]                      # [BLOCK_J, BLOCK_M]
            best = tl.maximum(best, tl.max(b_t, axis=1))
    val = tl.where(forced, float("inf"), tl.where(cand, tl.exp2(best), float("-inf")))
    tl.store(o_ptr + i_g * stride_og + i_hk * stride_oh + o_j, val, mask=o_j < NBV)


@triton.jit
def _group_fused_kernel(
    q_ptr,          # [T, H, D]
    s_ptr,          # [N, SLOTS, S, HK, D]
    bt_ptr,         # [R, max_pages] int32
    g_req_ptr, g_q0_ptr, g_len_ptr, g_flo_ptr,              # [NG] int32
    o_ptr,          # [NG, HK, NBV] float32, -inf on entry: max over members of z - lse
    stride_qt, stride_qh,
    stride_sp, stride_sslot, stride_ss, stride_sh,
    stride_bt, stride_og, stride_oh,
    scale_log2, sink,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr, MOBA_B: tl.constexpr, PAGE: tl.constexpr,
    MINMAX: tl.constexpr, IEEE: tl.constexpr, DIRECT: tl.constexpr,
):
    """`shared` mode in one launch. One program = BLOCK_M members (token x head rows) of one
    (group, KV head), its queries loaded once: a first sweep over the candidates gives each
    member's log2-sum-exp2 lse[m] of z = s * scale * log2(e); a second sweep takes, per block,
    max over its members of z[m, j] - lse[m] (products transposed, [blocks, members], so the
    max reduces inside a warp: 2.99 -> 2.52 ms at 128K on an H100) and folds it into the
    group's row with an atomic max (order-free, so the result is exact and deterministic). `_group_finish_kernel` then
    maps the row to 2^row, +inf on forced blocks and -inf elsewhere.

    DIRECT: s_ptr is a compact copy [R, HK, S, NBV, D] (`compact_summaries`), read with the
    strides (request, j, slot, KV head) in place of (page, slot of a page, slot, KV head)."""
    i_g = tl.program_id(0)
    i_hk = tl.program_id(1)
    r0 = tl.program_id(2) * BLOCK_M
    n_rows = tl.load(g_len_ptr + i_g) * G
    flo = tl.load(g_flo_ptr + i_g)
    if (r0 >= n_rows) | (flo <= sink):
        return
    i_req = tl.load(g_req_ptr + i_g).to(tl.int64)
    q0 = tl.load(g_q0_ptr + i_g)
    bt_row = bt_ptr + i_req * stride_bt
    s_row = s_ptr + i_req * stride_sp + i_hk * stride_sh      # DIRECT only
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_jj = tl.arange(0, BLOCK_J)
    i_q, i_h, m_row, b_q = _group_members(q_ptr, q0, r0, n_rows, i_hk, o_d, m_d, stride_qt, stride_qh,
                                          G, BLOCK_M)
    m_i, l_i = _lse_sweep(b_q, s_ptr, s_row, bt_row, i_hk, o_d, m_d, stride_sp, stride_sslot, stride_ss,
                          stride_sh, scale_log2, sink, flo, BLOCK_M, BLOCK_J, MOBA_B, PAGE, MINMAX, IEEE,
                          DIRECT)
    # rows past the group's members must not win a max: lse +inf
    lse = tl.where(m_row, m_i + tl.log2(l_i), float("inf"))
    p_o = o_ptr + i_g * stride_og + i_hk * stride_oh
    for j0 in range(sink, flo, BLOCK_J):
        o_j = j0 + o_jj
        m_j = o_j < flo
        b_t = _group_scores_t(b_q, s_ptr, s_row, bt_row, o_j, m_j, i_hk, o_d, m_d, stride_sp, stride_sslot,
                              stride_ss, stride_sh, MOBA_B, PAGE, MINMAX, IEEE, DIRECT)
        best = tl.max(b_t * scale_log2 - lse[None, :], axis=1)
        tl.atomic_max(p_o + o_j, best, mask=m_j, sem="relaxed")


@triton.jit
def _group_finish_kernel(
    o_ptr,          # [NG, HK, NBV] float32: in, max_m z - lse; out, the group scores
    g_c1_ptr, g_flo_ptr,                                     # [NG] int32
    stride_og, stride_oh,
    sink, NBV,
    BLOCK_J: tl.constexpr,
):
    """2^row on candidates (sink <= j < flo), +inf on forced blocks (j < sink or flo <= j <= c1),
    -inf past c1."""
    i_g = tl.program_id(0)
    i_hk = tl.program_id(1)
    o_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    c1 = tl.load(g_c1_ptr + i_g)
    flo = tl.load(g_flo_ptr + i_g)
    forced = (o_j <= c1) & ((o_j < sink) | (o_j >= flo))
    cand = (o_j >= sink) & (o_j < flo)
    p_o = o_ptr + i_g * stride_og + i_hk * stride_oh + o_j
    best = tl.load(p_o, mask=cand & (o_j < NBV), other=float("-inf"))
    val = tl.where(forced, float("inf"), tl.where(cand, tl.exp2(best), float("-inf")))
    tl.store(p_o, val, mask=o_j < NBV)


# `group_scores_fwd` (one launch) reads the summaries from a 16-bit copy (`compact_summaries`)
# when the step sees at least COMPACT_MIN_BLOCKS blocks and the copy fits COMPACT_BUDGET_BYTES.
# H100, D 128, 8 KV heads, block 128 (`benchmarks/tune_attention.py --only gate`), group kernels
# from the paged float32 cache -> from the copy, the copy included: 8K tokens 0.124 -> 0.168 ms,
# 16K 0.106 -> 0.097, 32K 0.345 -> 0.262, 64K 1.146 -> 0.858, 128K 4.051 -> 2.987, 512K
# 58.98 -> 46.32.
COMPACT_MIN_BLOCKS = 128
COMPACT_BUDGET_BYTES = 256 << 20


@triton.jit
def _compact_kernel(
    s_ptr,          # [N, SLOTS, S, HK, D] float32 summary cache
    bt_ptr,         # [R, max_pages] int32
    o_ptr,          # [R, HK, S, NBV, D] out, 16-bit
    NBV, max_pages, n_pages,
    stride_sp, stride_sslot, stride_ss, stride_sh,
    stride_bt,
    stride_or, stride_oh, stride_os, stride_oj,
    S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
    MOBA_B: tl.constexpr, PAGE: tl.constexpr,
):
    """One program = BLOCK_J blocks of one request x (KV head, slot of S)."""
    i_r = tl.program_id(0).to(tl.int64)
    o_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    i_hk = tl.program_id(2) // S
    i_s = tl.program_id(2) % S
    o_d = tl.arange(0, BLOCK_D)
    m_j = o_j < NBV
    m = m_j[:, None] & (o_d < D)[None, :]
    last = o_j * MOBA_B + MOBA_B - 1
    col = tl.minimum(last // PAGE, max_pages - 1)
    # entries past a request's complete blocks copy whatever its table points at (in range);
    # the group kernels never read them
    i_page = tl.load(bt_ptr + i_r * stride_bt + col, mask=m_j, other=0)
    i_page = tl.minimum(tl.maximum(i_page, 0), n_pages - 1).to(tl.int64)
    slot = (last % PAGE) // MOBA_B
    x = tl.load(s_ptr + i_page[:, None] * stride_sp + slot[:, None] * stride_sslot + i_s * stride_ss
                + i_hk * stride_sh + o_d[None, :], mask=m, other=0.0)
    tl.store(o_ptr + i_r * stride_or + i_hk * stride_oh + i_s * stride_os + o_j[:, None] * stride_oj
             + o_d[None, :], x.to(o_ptr.dtype.element_ty), mask=m)


def compact_summaries(summary_cache: torch.Tensor, plan: MobaPlan, dtype: torch.dtype) -> torch.Tensor:
    """The summaries of blocks 0 .. NBV-1 of every request in `dtype`: [R, HK, S, NBV, D], each
    (request, KV head) a dense run of rows. The one-launch group kernel reads half the bytes of
    the float32 cache there, in runs, instead of one page lookup per block. Entries past a
    request's complete blocks hold whatever its table points at; the kernels never read them.
    No host synchronisation: the shape comes from the plan."""
    N, _, S, HK, D = summary_cache.shape
    nbv, R = max(plan.num_visible_blocks, 1), plan.num_reqs
    out = torch.empty(R, HK, S, nbv, D, dtype=dtype, device=summary_cache.device)
    if R == 0:
        return out
    bt = plan.block_table
    block_j = 32
    _compact_kernel[(R, triton.cdiv(nbv, block_j), HK * S)](
        summary_cache, bt, out, nbv, bt.shape[1], N,
        summary_cache.stride(0), summary_cache.stride(1), summary_cache.stride(2), summary_cache.stride(3),
        bt.stride(0), out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        S=S, D=D, BLOCK_D=next_pow2(max(D, 16)), BLOCK_J=block_j, MOBA_B=plan.block_size,
        PAGE=plan.page_size, num_warps=4)
    return out


def group_scores_fwd(q: torch.Tensor, summary_cache: torch.Tensor, plan: MobaPlan, gate: str,
                     sink: int, scale: float, block_m: int | None = None, block_j: int | None = None,
                     num_warps: int | None = None, num_stages: int = 2, compact: bool | None = None,
                     fused: bool = True) -> torch.Tensor:
    """`shared` group scores of every group: [NG, HK, NBV] float32, forced +inf, past c1 -inf.

    One launch (`fused`, the default: each program sweeps its members' candidates twice, for
    their normalisers, then for the per-block max, folded across programs by an atomic max) or
    two (the normalisers, then the per-block max over members).
    Products in the query's dtype (16-bit: summaries rounded to it, as `naive.gate_scores`
    does; float32: exact). `compact` (one launch only; default: 16-bit queries, requests of at
    least COMPACT_MIN_BLOCKS blocks, a copy within COMPACT_BUDGET_BYTES) reads the summaries
    from a copy in the query's dtype (`compact_summaries`).
    Launch defaults measured with benchmarks/tune_attention.py on an H100 (128K tokens, D 128).

    q: [T, H, D]; summary_cache: [N, SLOTS, S, HK, D].
    """
    T, H, D = q.shape
    HK = summary_cache.shape[3]
    G = H // HK
    nbv = max(plan.num_visible_blocks, 1)
    out = torch.empty(plan.num_groups, HK, nbv, dtype=torch.float32, device=q.device)
    if plan.num_groups == 0:
        return out
    page, table = plan.page_size, plan.block_table
    if compact is None:
        copy_bytes = plan.num_reqs * nbv * summary_cache[0, 0].numel() * q.element_size()
        compact = (fused and q.dtype != torch.float32 and nbv >= COMPACT_MIN_BLOCKS
                   and copy_bytes <= COMPACT_BUDGET_BYTES)
    if compact and not fused:
        raise ValueError("group_scores_fwd: compact summaries are read by the one-launch kernel only "
                         "(fused=True)")
    rows = plan.max_group_len * G
    consts = dict(G=G, D=D, BLOCK_D=next_pow2(max(D, 16)), MOBA_B=plan.block_size,
                  MINMAX=gate == "minmax", IEEE=q.dtype == torch.float32, num_stages=num_stages)
    scale_log2 = float(scale) * LOG2E
    if fused:
        # H100, 128K tokens, D 128: 256 members x 64 blocks a step on 8 warps: 4.1 ms from the
        # paged float32 cache, 3.1 ms from the compact copy, its copy included (two launches at
        # their best, 64 members x 128 blocks on 4 warps: 5.6 ms)
        block_m = block_m or max(16, min(256, next_pow2(rows)))
        block_j, num_warps = block_j or 64, num_warps or 8
        if compact:
            summary_cache = compact_summaries(summary_cache, plan, q.dtype)
            # (request, j, slot, KV head) strides in the kernel's (page, slot of a page, slot,
            # KV head) places
            s_strides = (summary_cache.stride(0), summary_cache.stride(3), summary_cache.stride(2),
                         summary_cache.stride(1))
        else:
            s_strides = tuple(summary_cache.stride(i) for i in range(4))
        out.fill_(float("-inf"))
        _group_fused_kernel[(plan.num_groups, HK, triton.cdiv(rows, block_m))](
            q, summary_cache, table, plan.group_req, plan.group_q0, plan.group_len, plan.group_flo, out,
            q.stride(0), q.stride(1), *s_strides, table.stride(0), out.stride(0), out.stride(1),
            scale_log2, int(sink), BLOCK_M=block_m, BLOCK_J=block_j, PAGE=page, DIRECT=compact,
            num_warps=num_warps, **consts)
        _group_finish_kernel[(plan.num_groups, HK, triton.cdiv(nbv, 128))](
            out, plan.group_c1, plan.group_flo, out.stride(0), out.stride(1), int(sink), nbv, BLOCK_J=128)
        return out
    block_m, block_j, num_warps = block_m or 64, block_j or 128, num_warps or 4
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    strides = (q.stride(0), q.stride(1), summary_cache.stride(0), summary_cache.stride(1),
               summary_cache.stride(2), summary_cache.stride(3), table.stride(0), lse.stride(0))
    consts.update(BLOCK_M=block_m, BLOCK_J=block_j, PAGE=page, num_warps=num_warps)
    _group_lse_kernel[(plan.num_groups, HK, triton.cdiv(rows, block_m))](
        q, summary_cache, table, plan.group_req, plan.group_q0, plan.group_len,
        plan.group_flo, lse, *strides, scale_log2, int(sink), **consts)
    _group_max_kernel[(plan.num_groups, HK, triton.cdiv(nbv, block_j))](
        q, summary_cache, table, plan.group_req, plan.group_q0, plan.group_len,
        plan.group_c1, plan.group_flo, lse, out, *strides, out.stride(0), out.stride(1),
        scale_log2, int(sink), nbv, **consts)
    return out


@triton.jit
def _group_topn_kernel(
    g_ptr,          # [NG, HK, NBV] float32 group scores (+inf forced, -inf past c1)
    g_n_ptr,        # [NG] int32 blocks to take
    lists_ptr,      # [NG, HK, W] int32 out: ascending, SENTINEL-padded
    counts_ptr,     # [NG, HK] int32 out
    NBV, stride_gg, stride_gh, stride_lg, stride_lh, stride_cg,
    W: tl.constexpr, BLOCK_W: tl.constexpr, NBV_R: tl.constexpr,
):
    """One group x KV head: its n highest group scores (`_top_n`; forced blocks score +inf),
    written as an ascending list."""
    i_g = tl.program_id(0)
    i_hk = tl.program_id(1)
    o_j = tl.arange(0, NBV_R)
    b_g = tl.load(g_ptr + i_g * stride_gg + i_hk * stride_gh + o_j, mask=o_j < NBV, other=float("-inf"))
    visible = b_g != float("-inf")
    forced = b_g == float("inf")
    n_sel = tl.full([1], tl.load(g_n_ptr + i_g), dtype=tl.int32)
    take = tl.max(_top_n(tl.where(forced, 0.0, b_g)[None, :], visible[None, :], forced[None, :], n_sel, 1,
                         NBV_R).to(tl.int32), axis=0)
    p_l = lists_ptr + i_g * stride_lg + i_hk * stride_lh
    tl.store(p_l + tl.cumsum(take, axis=0) - 1, o_j, mask=take > 0)
    n = tl.sum(take, axis=0)
    for w0 in range(0, W, BLOCK_W):
        o_w = w0 + tl.arange(0, BLOCK_W)
        tl.store(p_l + o_w, tl.full([BLOCK_W], SENTINEL_K, tl.int32), mask=(o_w >= n) & (o_w < W))
    tl.store(counts_ptr + i_g * stride_cg + i_hk, n)


# `group_topn_fwd` holds a group's row of scores in registers up to this many blocks
GROUP_TOPN_MAX_BLOCKS = 8192


def group_topn_fwd(g: torch.Tensor, group_n: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's top n of its scores g [NG, HK, NBV] (forced +inf, invalid -inf; n per group
    from group_n [NG] int32, at most `width`): ascending lists [NG, HK, width] int32, SENTINEL-
    padded, and counts [NG, HK] int32. Ties go to the lower block index. One program per group
    and KV head; NBV at most GROUP_TOPN_MAX_BLOCKS."""
    NG, HK, nbv = g.shape
    nbv_r = next_pow2(max(nbv, 16))
    check(nbv_r <= GROUP_TOPN_MAX_BLOCKS, f"group_topn_fwd: {nbv} blocks, at most {GROUP_TOPN_MAX_BLOCKS}")
    lists = torch.empty(NG, HK, width, dtype=torch.int32, device=g.device)
    counts = torch.empty(NG, HK, dtype=torch.int32, device=g.device)
    if NG:
        _group_topn_kernel[(NG, HK)](
            g, group_n, lists, counts, nbv, g.stride(0), g.stride(1), lists.stride(0), lists.stride(1),
            counts.stride(0), W=width, BLOCK_W=min(64, next_pow2(width)), NBV_R=nbv_r,
            num_warps=4 if nbv_r <= 2048 else 8)
    return lists, counts


MODE_IDS = {"token": 0, "union": 1, "shared": 2}


@triton.jit
def _top_n(b_s, visible, forced, n_sel, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
    """Each row of b_s [BLOCK_R, BLOCK_J] takes its forced blocks plus its highest-scoring visible
    blocks, n_sel [BLOCK_R] in all (every visible block when fewer), found exactly: a bisection over
    the scores' order-preserving int32 keys finds the n-th largest key, ties at it go to the
    lower block index. Returns the take mask [BLOCK_R, BLOCK_J]."""
    # -0.0 as +0.0: equal as values, so a tie (broken by block index), not two keys
    b_s = tl.where(b_s == 0.0, 0.0, b_s)
    # order-preserving int32 key of a float32: flip the magnitude bits of negatives
    bits = b_s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(forced, 0x7FFFFFFF, key)
    key = tl.where(visible, key, -0x7FFFFFFF - 1)
    n_vis = tl.sum(visible.to(tl.int32), axis=1)
    n_take = tl.minimum(n_sel, n_vis)
    # largest lo with count(key >= lo) >= n_take: the n_take-th largest key. The bounds are
    # int64 (hi starts at 2^31); every mid fits int32 (it lies between lo and hi, and equals hi
    # only for rows already done), so the per-block compares stay 32-bit.
    # The search stops early once every row's count at lo is exactly n_take (distinct scores
    # get there in about half the 32 halvings); lo is then a threshold, not always a key.
    lo = tl.full([BLOCK_R], -2147483648, dtype=tl.int64)
    hi = tl.full([BLOCK_R], 2147483648, dtype=tl.int64)
    cnt_lo = tl.full([BLOCK_R], BLOCK_J, dtype=tl.int32)
    n_open = tl.sum(tl.full([BLOCK_R], 1, dtype=tl.int32), axis=0)
    it = 0
    while (it < 32) & (n_open > 0):
        mid = (lo + hi) // 2
        cnt = tl.sum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), axis=1)
        ok = cnt >= n_take
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
        cnt_lo = tl.where(ok, cnt, cnt_lo)
        n_open = tl.sum(((cnt_lo != n_take) & (hi - lo > 1)).to(tl.int32), axis=0)
        it += 1
    kth = lo.to(tl.int32)
    above = key > kth[:, None]
    tie = (key == kth[:, None]) & visible
    need = n_take - tl.sum(above.to(tl.int32), axis=1)
    take = visible & (above | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= need[:, None])))
    return take & (n_take > 0)[:, None]


@triton.jit
def _count_above(p_rows, thr, incl, sink, flo, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr):
    """Per row, the candidates (sink <= j < flo) scoring >= thr (incl) or > thr (not incl)."""
    o_jj = tl.arange(0, BLOCK_J)
    cnt = tl.zeros([BLOCK_G], dtype=tl.int32)
    for j0 in range(0, flo, BLOCK_J):
        o_j = j0 + o_jj
        m_c = (o_j >= sink) & (o_j < flo)
        b_s = tl.load(p_rows + o_j[None, :])
        above = tl.where(incl[:, None], b_s >= thr[:, None], b_s > thr[:, None])
        cnt += tl.sum((m_c[None, :] & above).to(tl.int32), axis=1)
    return cnt


@triton.jit
def _decode_select_kernel(
    q_ptr,          # [T, H, D]
    s_ptr,          # [N, SLOTS, S, HK, D]
    bt_ptr,         # [R, max_pages] int32
    t_req_ptr, t_q0_ptr,                      # [NT] int32 decode tiles (one token each)
    tok_group_ptr,                            # [T] int64
    g_c1_ptr, g_flo_ptr, g_n_ptr,             # [NG] int32
    sc_ptr,         # [T, H, NBV] float32 raw scores (SCORED) from `gate_scores_fwd`
    scr_ptr,        # [NT, HK, G (+ 1 in shared mode), NBV_P] float32 scratch
    blocks_ptr,     # [NT, HK, LW] int32 out: ascending block list of the tile
    nblocks_ptr,    # [NT, HK] int32 out
    member_ptr,     # [T, H, W] int32 out (MODE == 0): ascending per-head lists, SENTINEL-padded
    stride_qt, stride_qh,
    stride_sp, stride_sslot, stride_ss, stride_sh,
    stride_bt,
    stride_sct, stride_sch,
    stride_scr_t, stride_scr_h, stride_scr_g,
    stride_lt, stride_lh, stride_nt,
    stride_mt, stride_mh,
    scale, sink,
    W: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_W: tl.constexpr, MOBA_B: tl.constexpr, PAGE: tl.constexpr,
    MINMAX: tl.constexpr, IEEE: tl.constexpr, MODE: tl.constexpr, ITERS: tl.constexpr,
    REG: tl.constexpr, NBV_R: tl.constexpr, SCORED: tl.constexpr,
):
    """Selection of one decode token x one KV head, fused: scores -> threshold -> sorted lists.

    Each selecting row (a head in `token`/`union`, the group score in `shared`) takes the forced
    blocks plus the candidates scoring >= a threshold found by bisection so that exactly
    n - forced candidates pass: the same n = right as the prefill path, so a decode step equals
    a one-token prefill.

    SCORED: the raw scores come from `gate_scores_fwd` (one program per token x KV head x
    64 blocks, which fills the GPU when the batch is small) instead of this program's products.
    REG (up to DECODE_REG_BLOCKS visible blocks): each selecting row is held in registers as
    NBV_R scores and takes its blocks exactly (`_top_n`, the prefill top-k's bisection over
    order-preserving integer keys). Otherwise the threshold is bisected over the float scores
    in the scratch rows, and ties that no threshold separates (or that 40 halvings of the score
    range did not) are broken by block index.
    """
    i_t = tl.program_id(0)
    i_hk = tl.program_id(1)
    i_req = tl.load(t_req_ptr + i_t).to(tl.int64)
    i_q = tl.load(t_q0_ptr + i_t).to(tl.int64)
    i_grp = tl.load(tok_group_ptr + i_q)
    c1 = tl.load(g_c1_ptr + i_grp)
    flo = tl.load(g_flo_ptr + i_grp)
    n_sel = tl.load(g_n_ptr + i_grp)
    n_forced = (c1 + 1 - flo) + tl.minimum(sink, flo)
    n_cand = tl.maximum(flo - sink, 0)
    k_sel = n_sel - n_forced         # candidates to take
    bt_row = bt_ptr + i_req * stride_bt

    o_g = tl.arange(0, BLOCK_G)
    m_g = o_g < G
    i_h = i_hk * G + o_g
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_jj = tl.arange(0, BLOCK_J)
    if not SCORED:
        b_q = tl.load(q_ptr + i_q * stride_qt + i_h[:, None] * stride_qh + o_d[None, :],
                      mask=m_g[:, None] & m_d[None, :], other=0.0)
    p_scr = scr_ptr + i_t * stride_scr_t + i_hk * stride_scr_h

    # pass 1: candidate scores into the scratch rows
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    for j0 in range(0, flo, BLOCK_J):
        o_j = j0 + o_jj
        m_c = (o_j >= sink) & (o_j < flo)
        if SCORED:
            b_s = tl.load(sc_ptr + i_q * stride_sct + i_h[:, None] * stride_sch + o_j[None, :],
                          mask=m_c[None, :] & m_g[:, None], other=0.0)
        else:
            b_s = _scores(b_q, s_ptr, bt_row, o_j, o_j < flo, i_hk, o_d, m_d, stride_sp, stride_sslot,
                          stride_ss, stride_sh, MOBA_B, PAGE, MINMAX, IEEE)
        b_s = tl.where(m_c[None, :] & m_g[:, None], b_s, float("-inf"))
        if MODE == 2:
            b_s = b_s * scale
            m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(b_s - m_safe[:, None]), axis=1)
            m_i = m_new
        tl.store(p_scr + o_g[:, None] * stride_scr_g + o_j[None, :], b_s, mask=m_g[:, None])
    # the rows that select: heads, or (shared) one group-score row kept at scratch row G
    if MODE == 2:
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        for j0 in range(0, flo, BLOCK_J):
            o_j = j0 + o_jj
            b_s = tl.load(p_scr + o_g[:, None] * stride_scr_g + o_j[None, :], mask=m_g[:, None],
                          other=float("-inf"))
            b_p = tl.where(m_g[:, None], tl.exp(b_s - m_safe[:, None]) / l_safe[:, None], float("-inf"))
            b_p = tl.where(((o_j >= sink) & (o_j < flo))[None, :], b_p, float("-inf"))
            tl.store(p_scr + G * stride_scr_g + o_j, tl.max(b_p, axis=0))
        r_row = tl.where(o_g == 0, G, 0)
        m_r = o_g == 0
    else:
        r_row = tl.where(m_g, o_g, 0)   # padding rows read row 0 and select nothing (m_r)
        m_r = m_g
    p_rows = p_scr + r_row[:, None] * stride_scr_g
    p_mem = member_ptr + i_q * stride_mt + i_h * stride_mh
    p_blk = blocks_ptr + i_t * stride_lt + i_hk * stride_lh
    if REG:
        o_r = tl.arange(0, NBV_R)
        visible = o_r <= c1
        forced = visible & ((o_r < sink) | (o_r >= flo))
        n_row = tl.full([1], n_sel, dtype=tl.int32)
        uni = tl.zeros([NBV_R], dtype=tl.int32)
        for g in range(1 if MODE == 2 else G):
            b_s = tl.load(p_scr + (G if MODE == 2 else g) * stride_scr_g + o_r, mask=visible & ~forced,
                          other=0.0)
            take = tl.max(_top_n(b_s[None, :], visible[None, :], forced[None, :], n_row, 1, NBV_R).to(tl.int32),
                          axis=0)
            uni = tl.maximum(uni, take)
            if MODE == 0:
                p_g = member_ptr + i_q * stride_mt + (i_hk * G + g) * stride_mh
                tl.store(p_g + tl.cumsum(take, axis=0) - 1, o_r, mask=take > 0)
                n_g = tl.sum(take, axis=0)
                for w0 in range(0, W, BLOCK_W):
                    o_w = w0 + tl.arange(0, BLOCK_W)
                    tl.store(p_g + o_w, tl.full([BLOCK_W], SENTINEL_K, tl.int32), mask=(o_w >= n_g) & (o_w < W))
        tl.store(p_blk + tl.cumsum(uni, axis=0) - 1, o_r, mask=uni > 0)
        tl.store(nblocks_ptr + i_t * stride_nt + i_hk, tl.sum(uni, axis=0))
    else:
        # bisection on the threshold, per row
        lo = tl.full([BLOCK_G], float("inf"), dtype=tl.float32)
        hi = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        for j0 in range(0, flo, BLOCK_J):
            o_j = j0 + o_jj
            m_c = (o_j >= sink) & (o_j < flo)
            b_s = tl.load(p_rows + o_j[None, :])
            lo = tl.minimum(lo, tl.min(tl.where(m_c[None, :], b_s, float("inf")), axis=1))
            hi = tl.maximum(hi, tl.max(tl.where(m_c[None, :], b_s, float("-inf")), axis=1))
        # count at the top score: when even the top value is held by more than k_sel candidates
        # (exact ties), no threshold separates them and the ties are broken by index below
        incl = tl.full([BLOCK_G], 1, tl.int1)
        cnt_hi = _count_above(p_rows, hi, incl, sink, flo, BLOCK_G, BLOCK_J)
        done = (~m_r) | (n_cand <= k_sel) | (cnt_hi == k_sel)
        tau = tl.where(n_cand <= k_sel, float("-inf"), hi)
        hi_incl = cnt_hi < k_sel         # invariant when True: fewer than k_sel candidates score >= hi
        it = 0
        while (it < ITERS) & (tl.sum((~done).to(tl.int32), axis=0) > 0):
            mid = (lo + hi) * 0.5
            cnt = _count_above(p_rows, mid, incl, sink, flo, BLOCK_G, BLOCK_J)
            ok = (cnt == k_sel) & (~done)
            tau = tl.where(ok, mid, tau)
            done = done | ok
            lo = tl.where((~done) & (cnt > k_sel), mid, lo)
            hi_incl = hi_incl | ((~done) & (cnt < k_sel))
            hi = tl.where((~done) & (cnt < k_sel), mid, hi)
            it += 1
        # rows left undone hold exact ties in [lo, hi]: take those above, then ties by block index
        n_above = _count_above(p_rows, hi, hi_incl, sink, flo, BLOCK_G, BLOCK_J)
        tie_need = tl.where(done, 0, k_sel - n_above)

        # compaction: ascending lists
        n_mem = tl.zeros([BLOCK_G], dtype=tl.int32)
        n_tie = tl.zeros([BLOCK_G], dtype=tl.int32)
        n_uni = 0
        for j0 in range(0, c1 + 1, BLOCK_J):
            o_j = j0 + o_jj
            m_c = (o_j >= sink) & (o_j < flo)
            forced = (o_j <= c1) & ((o_j < sink) | (o_j >= flo))
            b_s = tl.load(p_rows + o_j[None, :], mask=m_c[None, :], other=float("-inf"))
            above = tl.where(hi_incl[:, None], b_s >= hi[:, None], b_s > hi[:, None])
            take = m_c[None, :] & tl.where(done[:, None], b_s >= tau[:, None], above)
            ties = m_c[None, :] & (b_s >= lo[:, None]) & (~above) & (tie_need[:, None] > 0)
            tie_rank = n_tie[:, None] + tl.cumsum(ties.to(tl.int32), axis=1)
            take = take | (ties & (tie_rank <= tie_need[:, None]))
            n_tie += tl.sum(ties.to(tl.int32), axis=1)
            sel = (forced[None, :] | take) & m_r[:, None]
            if MODE == 0:
                pos = n_mem[:, None] + tl.cumsum(sel.to(tl.int32), axis=1) - 1
                tl.store(p_mem[:, None] + pos, o_j[None, :].broadcast_to(BLOCK_G, BLOCK_J), mask=sel & (pos < W))
                n_mem += tl.sum(sel.to(tl.int32), axis=1)
            uni = tl.max(sel.to(tl.int32), axis=0)
            upos = n_uni + tl.cumsum(uni, axis=0) - 1
            tl.store(p_blk + upos, o_j, mask=uni > 0)
            n_uni += tl.sum(uni, axis=0)
        tl.store(nblocks_ptr + i_t * stride_nt + i_hk, n_uni)
        if MODE == 0:
            for w0 in range(0, W, BLOCK_W):
                o_w = w0 + tl.arange(0, BLOCK_W)
                tl.store(p_mem[:, None] + o_w[None, :], tl.full([BLOCK_G, BLOCK_W], SENTINEL_K, tl.int32),
                         mask=m_g[:, None] & (o_w[None, :] >= n_mem[:, None]) & (o_w[None, :] < W))


# decode selection holds a row of scores in registers up to this many visible blocks (1M tokens
# at block 128); longer rows bisect over the scratch rows
DECODE_REG_BLOCKS = 8192
# below this many (token, KV head) programs the raw scores come from `gate_scores_fwd` first
# (one program per 64 blocks); at or above, each selection program scores its own row. H100,
# 32 heads of 8 KV heads, D 128, 1024 blocks (128K): batch 1 23.6 us split against 42.7 fused,
# batch 16 66.7 against 56.7
DECODE_SCORE_SPLIT_BELOW = 64


def decode_select_fwd(q: torch.Tensor, summary_cache: torch.Tensor, plan: MobaPlan, p) -> "Selection":
    """Selection of a decode-only step in one launch: tile lists [NT, HK, LW] and, in `token`
    mode, member lists [T, H, W]. No host sync: shapes come from the plan (CUDA-graph safe).
    NOTE: rows are numbered by decode tile; in a decode-only step that is `TileSet.index`.

    q: [T, H, D]; summary_cache: [N, SLOTS, S, HK, D]; p: SelectParams.
    """
    from moba_backend.ops.select.fast import Selection

    T, H, D = q.shape
    HK = summary_cache.shape[3]
    G = H // HK
    nbv = max(plan.num_visible_blocks, 1)
    W = max(plan.max_select, 1)
    LW = W if p.mode == "shared" else min(nbv, G * W)
    tiles = plan.decode
    block_j = 64
    nbv_r = next_pow2(max(nbv, 16))
    reg = nbv_r <= DECODE_REG_BLOCKS
    scored = tiles.num * HK < DECODE_SCORE_SPLIT_BELOW
    block_g = max(16, next_pow2(G))
    nbv_p = triton.cdiv(nbv, block_j) * block_j
    dev = q.device
    scratch = torch.empty(tiles.num, HK, G + (p.mode == "shared"), nbv_p, dtype=torch.float32, device=dev)
    blocks = torch.empty(tiles.num, HK, LW, dtype=torch.int32, device=dev)
    nblocks = torch.empty(tiles.num, HK, dtype=torch.int32, device=dev)
    members = torch.empty(T, H, W, dtype=torch.int32, device=dev) if p.mode == "token" else blocks
    if tiles.num:
        raw = gate_scores_fwd(q, summary_cache, plan, 0, T, nbv, p.gate, block_m=block_g) if scored else scratch
        _decode_select_kernel[(tiles.num, HK)](
            q, summary_cache, plan.block_table, tiles.req, tiles.q0, plan.token_group,
            plan.group_c1, plan.group_flo, plan.group_n,
            raw, scratch, blocks, nblocks, members,
            q.stride(0), q.stride(1),
            summary_cache.stride(0), summary_cache.stride(1), summary_cache.stride(2), summary_cache.stride(3),
            plan.block_table.stride(0), raw.stride(0), raw.stride(1),
            scratch.stride(0), scratch.stride(1), scratch.stride(2),
            blocks.stride(0), blocks.stride(1), nblocks.stride(0),
            members.stride(0), members.stride(1),
            float(p.scale), int(p.sink_blocks),
            W=W, G=G, D=D, BLOCK_D=next_pow2(max(D, 16)), BLOCK_G=block_g, BLOCK_J=block_j,
            BLOCK_W=min(64, next_pow2(W)), MOBA_B=plan.block_size, PAGE=plan.page_size,
            MINMAX=p.gate == "minmax", IEEE=q.dtype == torch.float32, MODE=MODE_IDS[p.mode], ITERS=40,
            REG=reg, NBV_R=nbv_r if reg else 16, SCORED=scored, num_warps=4 if nbv_r <= 2048 else 8,
        )
    return Selection(blocks, nblocks, members if p.mode == "token" else None)


# ---------------------------------------------------------------------------------------------
# Per-member top-k (`token` and `union` prefill): raw scores -> each member's n blocks.
# ---------------------------------------------------------------------------------------------

# scores one program holds (members x blocks) and its warps, doubled past 1024 blocks (H100,
# `benchmarks/tune_attention.py --only token`, whole selection: 128K tokens, 1024 blocks:
# 1024 x 2 warps 41.1 ms, 2048 x 2 45.1 ms, 4096 x 4 51.7 ms; 512K, 4096 blocks: 2 warps
# 945 ms, 4 warps 766 ms, 8 warps 884 ms)
TOPK_ELEMS = 1024
TOPK_NUM_WARPS = 2


@triton.jit
def _member_topk_kernel(
    s_ptr,          # [t_hi - t_lo, H, NBV] float32 raw scores of the tokens [t_lo, t_hi)
    tok_group_ptr,  # [T] int64
    acc_row_ptr,    # [T] int64 row of each token in acc (its kernel tile or group; < 0: none)
    g_c1_ptr, g_flo_ptr, g_n_ptr,             # [NG] int32
    member_ptr,     # [T, H, W] int32 out (MEMBERS): ascending picks; entries past n untouched
    acc_ptr,        # [NA, HK, NBV] int8 out: 1 where some member of the row picks the block
    t_lo, t_hi, NBV, sink,
    stride_st, stride_sh,
    stride_mt, stride_mh,
    stride_at, stride_ah,
    H: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
    MEMBERS: tl.constexpr,
):
    """BLOCK_R members (row r: token r // H, head r % H) each take their forced blocks plus the
    highest-scoring candidates, n in all (`_top_n`)."""
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    i_tok = t_lo + o_r // H
    m_r = i_tok < t_hi
    i_h = o_r % H
    i_grp = tl.load(tok_group_ptr + i_tok, mask=m_r, other=0)
    c1 = tl.load(g_c1_ptr + i_grp, mask=m_r, other=-1)
    flo = tl.load(g_flo_ptr + i_grp, mask=m_r, other=0)
    n_sel = tl.load(g_n_ptr + i_grp, mask=m_r, other=0)
    o_j = tl.arange(0, BLOCK_J)
    visible = (o_j[None, :] <= c1[:, None]) & (o_j[None, :] < NBV)
    forced = visible & ((o_j[None, :] < sink) | (o_j[None, :] >= flo[:, None]))
    p_s = s_ptr + (i_tok - t_lo).to(tl.int64)[:, None] * stride_st + i_h[:, None] * stride_sh + o_j[None, :]
    b_s = tl.load(p_s, mask=visible & ~forced, other=0.0)
    take = _top_n(b_s, visible, forced, n_sel, BLOCK_R, BLOCK_J)
    if MEMBERS:
        slot = tl.cumsum(take.to(tl.int32), axis=1) - 1
        p_m = member_ptr + i_tok.to(tl.int64)[:, None] * stride_mt + i_h[:, None] * stride_mh + slot
        tl.store(p_m, o_j[None, :] + tl.zeros_like(slot), mask=take)
    i_acc = tl.load(acc_row_ptr + i_tok, mask=m_r, other=-1)
    p_a = acc_ptr + i_acc[:, None] * stride_at + (i_h // G)[:, None] * stride_ah + o_j[None, :]
    tl.store(p_a, tl.full([BLOCK_R, BLOCK_J], 1, dtype=tl.int8), mask=take & (i_acc >= 0)[:, None])


def member_topk_fwd(scores: torch.Tensor, plan: MobaPlan, t_lo: int, t_hi: int, sink: int,
                    acc_rows: torch.Tensor, acc: torch.Tensor, members: torch.Tensor | None) -> None:
    """Each member of the tokens [t_lo, t_hi) picks its n blocks (`plan.group_n`; the forced ones
    always among them).

    scores: [t_hi - t_lo, H, NBV] float32 raw gate scores; acc_rows: [T] int64 row of acc per
    token (< 0: not marked); acc: [NA, HK, NBV] int8, set to 1 at every pick; members:
    [T, H, W] int32 or None,
    each member's picks written ascending into its first n entries.
    """
    n, H, nbv = scores.shape
    HK = acc.shape[1]
    if n == 0:
        return
    block_j = next_pow2(max(nbv, 16))
    block_r = max(1, min(16, TOPK_ELEMS // block_j))
    mem = members if members is not None else acc
    grid = (triton.cdiv(n * H, block_r),)
    _member_topk_kernel[grid](
        scores, plan.token_group, acc_rows, plan.group_c1, plan.group_flo, plan.group_n, mem, acc,
        t_lo, t_hi, nbv, int(sink),
        scores.stride(0), scores.stride(1), mem.stride(0), mem.stride(1), acc.stride(0), acc.stride(1),
        H=H, G=H // HK, BLOCK_R=block_r, BLOCK_J=block_j, MEMBERS=members is not None,
        num_warps=TOPK_NUM_WARPS if block_j <= 1024 else 2 * TOPK_NUM_WARPS,
    )
