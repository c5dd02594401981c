"""Writing a step's K/V into the paged cache, torch reference."""

from __future__ import annotations

import torch


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter the step's K/V [T, HK, D] into the paged caches [N, P, HK, D] at `slot_mapping`
    [<= T] (slot = page * P + offset); slots < 0 are padding and write nothing."""
    n = slot_mapping.numel()
    slots = slot_mapping.long()
    keep = slots >= 0
    P = k_cache.shape[1]
    s = slots[keep]
    k_cache[s // P, s % P] = key[:n][keep].to(k_cache.dtype)
    v_cache[s // P, s % P] = value[:n][keep].to(v_cache.dtype)
