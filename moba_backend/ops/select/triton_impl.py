"""Gate scores, Triton kernel: raw block scores s[t, h, j] of a token range against the complete
blocks' summaries, read straight from the paged summary cache through the block table.

One program = one token x one KV head x BLOCK_J blocks; rows are the GQA group's heads. Top-k,
unions and group scores are done by `fast.select` on the scores (torch.topk on the device).
`minmax` uses sum_d max(q_d mx_d, q_d mn_d) = relu(q) . mx + min(q, 0) . mn.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_backend.ops.common import next_pow2
from moba_backend.plan import MobaPlan


@triton.jit
def _gate_score_kernel(
    q_ptr,          # [T, H, D]
    s_ptr,          # [N, SLOTS, S, HK, D] summary cache
    bt_ptr,         # [R, max_pages] int32
    req_ptr,        # [T] int32
    seq_ptr,        # [R] int32
    o_ptr,          # [t_hi - t_lo, H, NBV] float32
    t_lo,
    stride_qt, stride_qh,
    stride_sp, stride_sslot, stride_ss, stride_sh,
    stride_bt,
    stride_ot, stride_oh,
    NBV,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    MOBA_B: tl.constexpr, PAGE: tl.constexpr, BLOCK_J: tl.constexpr, MINMAX: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_hk = tl.program_id(1)
    i_j = tl.program_id(2)
    i_tok = (t_lo + i_t).to(tl.int64)
    i_req = tl.load(req_ptr + i_tok).to(tl.int64)
    n_complete = tl.load(seq_ptr + i_req) // MOBA_B
    o_g = tl.arange(0, BLOCK_G)
    o_d = tl.arange(0, BLOCK_D)
    o_j = i_j * BLOCK_J + tl.arange(0, BLOCK_J)
    m_g = o_g < G
    m_d = o_d < D
    m_j = o_j < n_complete
    i_h = i_hk * G + o_g
    b_q = tl.load(q_ptr + i_tok * stride_qt + i_h[:, None] * stride_qh + o_d[None, :],
                  mask=m_g[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    last = o_j * MOBA_B + MOBA_B - 1
    i_page = tl.load(bt_ptr + i_req * stride_bt + last // PAGE, mask=m_j, other=0).to(tl.int64)
    slot = (last % PAGE) // MOBA_B
    p_s = s_ptr + i_page[:, None] * stride_sp + slot[:, None] * stride_sslot + i_hk * stride_sh + o_d[None, :]
    b_s0 = tl.load(p_s, mask=m_j[:, None] & m_d[None, :], other=0.0).to(tl.float32)   # [BLOCK_J, BLOCK_D]
    if MINMAX:
        b_s1 = tl.load(p_s + stride_ss, mask=m_j[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        b_o = tl.dot(tl.maximum(b_q, 0.0), tl.trans(b_s0), input_precision="ieee") \
            + tl.dot(tl.minimum(b_q, 0.0), tl.trans(b_s1), input_precision="ieee")
    else:
        b_o = tl.dot(b_q, tl.trans(b_s0), input_precision="ieee")                     # [BLOCK_G, BLOCK_J]
    p_o = o_ptr + i_t * stride_ot + i_h[:, None] * stride_oh + o_j[None, :]
    tl.store(p_o, b_o, mask=m_g[:, None] & (o_j[None, :] < NBV))


def gate_scores_fwd(q: torch.Tensor, summary_cache: torch.Tensor, plan: MobaPlan, t_lo: int, t_hi: int,
                    nbv: int, gate: str) -> torch.Tensor:
    """Raw scores of tokens [t_lo, t_hi): [t_hi - t_lo, H, nbv] float32 (0 past complete blocks).

    q: [T, H, D]; summary_cache: [N, SLOTS, S, HK, D].
    """
    T, H, D = q.shape
    HK = summary_cache.shape[3]
    G = H // HK
    n = t_hi - t_lo
    out = torch.empty(n, H, nbv, dtype=torch.float32, device=q.device)
    block_j = 64
    grid = (n, HK, triton.cdiv(nbv, block_j))
    _gate_score_kernel[grid](
        q, summary_cache, plan.block_table, plan.token_req, plan.seq_lens, out, t_lo,
        q.stride(0), q.stride(1),
        summary_cache.stride(0), summary_cache.stride(1), summary_cache.stride(2), summary_cache.stride(3),
        plan.block_table.stride(0), out.stride(0), out.stride(1), nbv,
        G=G, D=D, BLOCK_D=next_pow2(max(D, 16)), BLOCK_G=max(16, next_pow2(G)),
        MOBA_B=plan.block_size, PAGE=plan.page_size, BLOCK_J=block_j, MINMAX=gate == "minmax",
        num_warps=4,
    )
    return out


def triton_scorer(gate: str):
    """A `fast.select` scorer backed by the Triton gate kernel."""
    def scorer(q, summary_cache, plan, t_lo, t_hi, nbv):
        return gate_scores_fwd(q, summary_cache, plan, t_lo, t_hi, nbv, gate)
    return scorer
