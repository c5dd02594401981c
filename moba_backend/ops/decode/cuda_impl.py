"""Sparse paged decode, CUDA kernel (`csrc/decode.cuh`): split-K over each decode token's block
list, the GQA group's heads sharing each K/V load, then a log-sum-exp merge of the splits.

Launch shapes depend only on the batch (tokens, KV heads) and the list width: no host sync,
CUDA-graph safe.
"""

from __future__ import annotations

import functools

import torch

from moba_backend.ops import cuda_ext
from moba_backend.ops.common import check

# CTAs the split-K launch aims for, per multiprocessor: two waves of resident CTAs (two fit an
# SM at head dim 128), so no half-empty last wave
CTAS_PER_SM = 4
MAX_SPLITS = 32


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits_for(num_tokens: int, num_kv_heads: int, list_width: int, device: torch.device) -> int:
    """Splits per (token, KV head): enough CTAs to fill the GPU, at least 2 blocks a split."""
    target = CTAS_PER_SM * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    want = target // max(1, num_tokens * num_kv_heads)
    return max(1, min(want, MAX_SPLITS, list_width // 2))


def sparse_decode_fwd(q, k_cache, v_cache, block_table, tiles, sel, out, *, block_size, scale,
                      softcap=0.0, window=-1, num_splits: int | None = None) -> torch.Tensor:
    """Sparse paged decode.

    q: [T, H, D] bf16/fp16 (rows of decode tokens named by `tiles`, one token per tile), D in
    64/128/256; k_cache, v_cache: [N, P, HK, D], P a multiple of 16; block_table: [R, max_pages]
    int32; sel: Selection with tile lists [NT_all, HK, LW]; out: [T, H, D], written at the decode rows.
    """
    check(sel.member_blocks is None, "the CUDA decode takes tile lists only (token mode: use Triton)")
    if tiles.num == 0:
        return out
    S = num_splits or num_splits_for(tiles.num, k_cache.shape[2], sel.tile_blocks.shape[-1], q.device)
    cuda_ext.ops().decode(q, k_cache, v_cache, out, block_table, tiles.req, tiles.q0, tiles.length,
                          tiles.pos0, tiles.index, sel.tile_blocks, sel.tile_nblocks, block_size, S,
                          scale, softcap, window)
    return out
