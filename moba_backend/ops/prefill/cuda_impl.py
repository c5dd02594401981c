"""Sparse paged prefill, CUDA kernel (`csrc/prefill.cuh`, tensor cores via mma.sync): same
contract as `triton_impl.sparse_prefill_fwd` for tile lists shared by a tile's members (`shared`
and `union` modes; `token` mode's member masks run on the Triton kernel)."""

from __future__ import annotations

import torch

from moba_backend.ops import cuda_ext
from moba_backend.ops.common import check


def sparse_prefill_fwd(q, k_cache, v_cache, block_table, tiles, sel, out, *, block_size, scale,
                       softcap=0.0, window=-1, tokens_per_tile) -> torch.Tensor:
    """Sparse paged prefill.

    q: [T, H, D] bf16/fp16, D in 64/128/256; k_cache, v_cache: [N, P, HK, D], P a multiple of 16;
    block_table: [R, max_pages] int32; tiles: the plan's prefill TileSet (each tile at most
    `tokens_per_tile` tokens); sel: Selection (tile lists [NT, HK, LW]); out: [T, H, D], written
    for the tiles' tokens.
    """
    check(sel.member_blocks is None, "the CUDA prefill takes tile lists only (token mode: use Triton)")
    if tiles.num:
        cuda_ext.ops().prefill(q, k_cache, v_cache, out, block_table, tiles.req, tiles.q0, tiles.length,
                               tiles.pos0, tiles.index, sel.tile_blocks, sel.tile_nblocks, block_size,
                               tokens_per_tile, scale, softcap, window)
    return out
