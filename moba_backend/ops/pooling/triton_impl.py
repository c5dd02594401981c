"""Block summaries, Triton kernel: one program per (completed block, KV head) pools the block's
B keys from the paged cache and writes the summary at the page holding the block's last token
(layout and the reason for it: `naive.py`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_backend.ops.common import check, check_cache, next_pow2, slots_per_page, summary_slots

GATE_IDS = {"mean": 0, "max": 1, "minmax": 2, "learned": 3}


@triton.jit
def _pool_kernel(
    k_ptr,          # [N, P, HK, D]
    s_ptr,          # [N, SLOTS, S, HK, D]
    w_ptr,          # [HK, B, D] learned gate weights (GATE == 3)
    bt_ptr,         # [R, max_pages] int32
    work_req_ptr,   # [W] int32
    work_blk_ptr,   # [W] int32
    stride_kp, stride_ks, stride_kh,
    stride_sp, stride_sslot, stride_ss, stride_sh,
    stride_wh, stride_wt,
    stride_bt,
    GATE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    MOBA_B: tl.constexpr, PAGE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i_w = tl.program_id(0)
    i_hk = tl.program_id(1)
    i_req = tl.load(work_req_ptr + i_w).to(tl.int64)
    j = tl.load(work_blk_ptr + i_w)
    if j < 0:  # no work (a static plan's entry for a request that completes no block)
        return
    p_bt = bt_ptr + i_req * stride_bt
    o_t = tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    b_max = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
    b_min = tl.full([BLOCK_D], float("inf"), dtype=tl.float32)
    for t0 in range(0, MOBA_B, BLOCK_T):
        pos = j * MOBA_B + t0 + o_t
        i_page = tl.load(p_bt + pos // PAGE).to(tl.int64)
        p_k = k_ptr + i_page[:, None] * stride_kp + (pos % PAGE)[:, None] * stride_ks + i_hk * stride_kh + o_d[None, :]
        b_k = tl.load(p_k, mask=m_d[None, :], other=0.0).to(tl.float32)       # [BLOCK_T, BLOCK_D]
        if GATE == 3:
            p_w = w_ptr + i_hk * stride_wh + (t0 + o_t)[:, None] * stride_wt + o_d[None, :]
            b_k = b_k * tl.load(p_w, mask=m_d[None, :], other=0.0).to(tl.float32)
        b_sum += tl.sum(b_k, axis=0)
        b_max = tl.maximum(b_max, tl.max(b_k, axis=0))
        b_min = tl.minimum(b_min, tl.min(b_k, axis=0))
    last = j * MOBA_B + MOBA_B - 1
    i_page = tl.load(p_bt + last // PAGE).to(tl.int64)
    slot = (last % PAGE) // MOBA_B
    p_s = s_ptr + i_page * stride_sp + slot * stride_sslot + i_hk * stride_sh + o_d
    if GATE == 0:
        tl.store(p_s, (b_sum / MOBA_B).to(s_ptr.dtype.element_ty), mask=m_d)
    elif GATE == 1:
        tl.store(p_s, b_max.to(s_ptr.dtype.element_ty), mask=m_d)
    elif GATE == 2:
        tl.store(p_s, b_max.to(s_ptr.dtype.element_ty), mask=m_d)
        tl.store(p_s + stride_ss, b_min.to(s_ptr.dtype.element_ty), mask=m_d)
    else:
        tl.store(p_s, b_sum.to(s_ptr.dtype.element_ty), mask=m_d)


def check_pool_inputs(k_cache: torch.Tensor, summary_cache: torch.Tensor, plan, gate: str,
                      weight: torch.Tensor | None) -> None:
    """The cache, summary and learned-weight shapes every pooling implementation requires."""
    check_cache(k_cache)
    N, P, HK, D = k_cache.shape
    B = plan.block_size
    want = (N, slots_per_page(B, P), summary_slots(gate), HK, D)
    check(tuple(summary_cache.shape) == want, f"summary_cache must be {want}, got {tuple(summary_cache.shape)}")
    if gate == "learned":
        check(weight is not None and tuple(weight.shape) == (HK, B, D),
              f"learned gate weight must be [{HK}, {B}, {D}]")


def update_block_summaries_fwd(k_cache: torch.Tensor, summary_cache: torch.Tensor, plan, gate: str,
                               weight: torch.Tensor | None = None) -> None:
    """Write the summaries of the blocks completed in this step (the plan's pooling work).

    k_cache: [N, P, HK, D]; summary_cache: [N, SLOTS, S, HK, D]; weight: [HK, B, D] (learned).
    """
    check_pool_inputs(k_cache, summary_cache, plan, gate, weight)
    N, P, HK, D = k_cache.shape
    B = plan.block_size
    check(summary_cache.stride(-1) == 1, "summary_cache: the head dim must be contiguous")
    if gate == "learned":
        check(weight.stride(-1) == 1, "learned gate weight: the head dim must be contiguous")
    w = weight if weight is not None else summary_cache
    n_work = plan.pool_req.numel()
    if n_work == 0:
        return
    # up to 16K key elements a load: a block's keys at once at D 128 (H100, 128K tokens, 8 KV
    # heads: 116.5 us against 171.8 in 32-key steps)
    _pool_kernel[(n_work, HK)](
        k_cache, summary_cache, w, plan.block_table, plan.pool_req, plan.pool_blk,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        summary_cache.stride(0), summary_cache.stride(1), summary_cache.stride(2), summary_cache.stride(3),
        w.stride(0) if weight is not None else 0, w.stride(1) if weight is not None else 0,
        plan.block_table.stride(0),
        GATE=GATE_IDS[gate], D=D, BLOCK_D=next_pow2(max(D, 16)), MOBA_B=B, PAGE=P,
        BLOCK_T=min(B, 16384 // next_pow2(max(D, 16))), num_warps=4,
    )
