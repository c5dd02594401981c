"""Sparse paged decode: the attention kernel of `ops/prefill/triton_impl.py` run with split-K
over each decode token's block list (one token x the GQA group per program, the list cut into
`num_splits` parts), then a log-sum-exp merge of the parts.

Launch shapes depend only on the batch (tokens, heads) and the list width, never on data read
back from the device, so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_backend.ops.common import next_pow2
from moba_backend.ops.prefill.triton_impl import check_attn_inputs, sparse_attn_launch

# Programs the split-K launch aims for (a few waves on a large GPU).
TARGET_PROGRAMS = 512
MAX_SPLITS = 32


def num_splits_for(num_tokens: int, num_kv_heads: int, list_width: int) -> int:
    """Splits per (token, KV head): enough programs to fill the GPU, at least 2 blocks a split."""
    want = max(1, TARGET_PROGRAMS // max(1, num_tokens * num_kv_heads))
    return max(1, min(want, MAX_SPLITS, (list_width + 1) // 2))


def merge_splits(o_part: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """o_part: [T, H, S, D] float32; lse: [T, H, S] log2-sum-exp (-inf: empty). -> [T, H, D] f32."""
    m = lse.amax(-1, keepdim=True)
    w = torch.exp2(lse - torch.where(torch.isinf(m), 0.0, m))
    return (o_part * w[..., None]).sum(2) / w.sum(-1, keepdim=True).clamp_min(1e-30)


@triton.jit
def _merge_kernel(
    o_ptr,          # [NT, H, S, D] float32 partials
    lse_ptr,        # [NT, H, S] float32 log2-sum-exp (-inf: empty)
    q0_ptr,         # [NT] int32 row of each tile's token in out
    out_ptr,        # [T, H, D]
    stride_ot, stride_oh, stride_os,
    stride_et, stride_eh,
    stride_yt, stride_yh,
    S: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """`merge_splits` for one (decode token, head), written straight into its row of out."""
    i_t = tl.program_id(0)
    i_h = tl.program_id(1)
    o_s = tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_s = o_s < S
    m_d = o_d < D
    lse = tl.load(lse_ptr + i_t * stride_et + i_h * stride_eh + o_s, mask=m_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    b_o = tl.load(o_ptr + i_t * stride_ot + i_h * stride_oh + o_s[:, None] * stride_os + o_d[None, :],
                  mask=m_s[:, None] & m_d[None, :], other=0.0)
    acc = tl.sum(b_o * w[:, None], axis=0) / tl.maximum(tl.sum(w, axis=0), 1e-30)
    i_row = tl.load(q0_ptr + i_t).to(tl.int64)
    tl.store(out_ptr + i_row * stride_yt + i_h * stride_yh + o_d, acc.to(out_ptr.dtype.element_ty), mask=m_d)


def merge_splits_fwd(o_part: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
    """out[rows[t], h] = merge_splits(o_part, lse)[t, h], in one launch."""
    NT, H, S, D = o_part.shape
    if NT == 0:
        return
    _merge_kernel[(NT, H)](
        o_part, lse, rows, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        S=S, BLOCK_S=next_pow2(S), D=D, BLOCK_D=next_pow2(max(D, 16)), num_warps=1 if D <= 64 else 2,
    )


def sparse_decode_fwd(q, k_cache, v_cache, block_table, tiles, sel, out, *, block_size, scale,
                      softcap=0.0, window=-1, num_splits: int | None = None) -> torch.Tensor:
    """Sparse paged decode.

    q: [T, H, D] (rows of decode tokens named by `tiles`, one token per tile);
    k_cache, v_cache: [N, P, HK, D]; block_table: [R, max_pages] int32;
    sel: Selection with tile lists [NT_all, HK, LW]; out: [T, H, D], written at the decode rows.
    """
    check_attn_inputs(q, k_cache, v_cache, block_table, out)
    T, H, D = q.shape
    HK = k_cache.shape[2]
    if tiles.num == 0:
        return out
    S = num_splits or num_splits_for(tiles.num, HK, sel.tile_blocks.shape[-1])
    block_m = max(16, next_pow2(H // HK))
    if S == 1:
        sparse_attn_launch(q, k_cache, v_cache, block_table, tiles, sel, out, None,
                           block_size=block_size, scale=scale, softcap=softcap, window=window,
                           block_m=block_m, num_splits=1)
        return out
    o_part = torch.empty(tiles.num, H, S, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(tiles.num, H, S, dtype=torch.float32, device=q.device)
    sparse_attn_launch(q, k_cache, v_cache, block_table, tiles, sel, o_part, lse,
                       block_size=block_size, scale=scale, softcap=softcap, window=window,
                       block_m=block_m, num_splits=S)
    merge_splits_fwd(o_part, lse, tiles.q0, out)
    return out
