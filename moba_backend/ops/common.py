"""Small shared pieces of the ops: gate kinds, list sentinels, tensor checks."""

from __future__ import annotations

import torch

# Padding value of sorted block lists; larger than any block index, so sorted lists stay sorted.
SENTINEL = 1 << 30

GATE_KINDS = ("mean", "max", "minmax", "learned")


def summary_slots(gate: str) -> int:
    """Vectors per block summary: `minmax` keeps max and min, the others one."""
    if gate not in GATE_KINDS:
        raise ValueError(f"gate={gate!r}: expected one of {GATE_KINDS}")
    return 2 if gate == "minmax" else 1


def slots_per_page(block_size: int, page_size: int) -> int:
    """Summary slots a page holds: one per MoBA block that ends inside the page."""
    return max(1, page_size // block_size)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor | None = None) -> None:
    check(k_cache.dim() == 4, f"k_cache must be [num_pages, page_size, HK, D], got {tuple(k_cache.shape)}")
    check(k_cache.stride(-1) == 1, "k_cache: the head dim must be contiguous")
    if v_cache is not None:
        check(v_cache.shape == k_cache.shape, f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
        check(v_cache.dtype == k_cache.dtype, "v_cache and k_cache dtypes differ")
        check(v_cache.stride(-1) == 1, "v_cache: the head dim must be contiguous")
