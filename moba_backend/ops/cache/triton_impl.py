"""Writing a step's K/V into the paged cache, one program per token: no host synchronisation
(padding slots are masked in the kernel, not filtered on the host), so the write can run under
CUDA graph capture."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_backend.ops.common import check, next_pow2


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cp, stride_cs, stride_ch, stride_dp, stride_ds, stride_dh,
                     HK: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     PAGE: tl.constexpr):
    i_t = tl.program_id(0)
    slot = tl.load(slot_ptr + i_t).to(tl.int64)
    if slot < 0:
        return
    page = slot // PAGE
    off = slot % PAGE
    o_h = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    m = (o_h[:, None] < HK) & (o_d[None, :] < D)
    t = i_t.to(tl.int64)
    k = tl.load(k_ptr + t * stride_kt + o_h[:, None] * stride_kh + o_d[None, :], mask=m)
    v = tl.load(v_ptr + t * stride_vt + o_h[:, None] * stride_vh + o_d[None, :], mask=m)
    tl.store(kc_ptr + page * stride_cp + off * stride_cs + o_h[:, None] * stride_ch + o_d[None, :],
             k.to(kc_ptr.dtype.element_ty), mask=m)
    tl.store(vc_ptr + page * stride_dp + off * stride_ds + o_h[:, None] * stride_dh + o_d[None, :],
             v.to(vc_ptr.dtype.element_ty), mask=m)


def write_kv_fwd(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """`naive.write_kv` in one launch. key, value: [>= T, HK, D]; caches [N, P, HK, D];
    slot_mapping [T] (< 0: padding)."""
    T = slot_mapping.numel()
    HK, D = k_cache.shape[2:]
    check(key.shape[1:] == (HK, D) and value.shape[1:] == (HK, D),
          f"key/value must be [T, {HK}, {D}], got {tuple(key.shape)} / {tuple(value.shape)}")
    check(key.shape[0] >= T and value.shape[0] >= T,
          f"key/value have {key.shape[0]}/{value.shape[0]} rows, slot_mapping {T}")
    check(key.stride(-1) == 1 and value.stride(-1) == 1 and k_cache.stride(-1) == 1
          and v_cache.stride(-1) == 1, "key, value and the caches need a contiguous head dim")
    if T == 0:
        return
    _write_kv_kernel[(T,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HK=HK, D=D, BLOCK_H=next_pow2(HK), BLOCK_D=next_pow2(max(D, 16)), PAGE=k_cache.shape[1],
        num_warps=1 if HK * D <= 1024 else 4,
    )
