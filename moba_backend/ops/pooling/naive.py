"""Block summaries (the gate keys), torch reference and CPU path.

Storage: `summary_cache [num_pages, SLOTS, S, HK, D]`, `SLOTS = max(1, P // B)`, `S = 2` for
`minmax` (max, min) else 1. The summary of MoBA block `j` of a request lives in the physical page
that holds the block's last position `(j + 1) * B - 1`, slot `((j + 1) * B - 1) % P // B`.

NOTE: only complete blocks carry a summary. The gate never scores a partial block: a block is a
candidate only for queries in a later block (SPEC.md, Selection step 2), and every query that
sees the partial last block has it among its own forced blocks. So a summary is written once,
in the step that writes the block's last token, by pooling the block's keys from the cache:
decode never re-reads the context, and because the page that ends a block is shared by prefix
caching only with the whole prefix before it, a shared or reused page never carries a summary
of other keys.
"""

from __future__ import annotations

import torch

from moba_backend.ops.common import check, check_cache, slots_per_page, summary_slots


def summary_location(block_table_row: torch.Tensor, j: int, block_size: int, page_size: int) -> tuple[int, int]:
    """(physical page, slot) where block `j`'s summary lives."""
    last = (j + 1) * block_size - 1
    page = int(block_table_row[last // page_size])
    slot = (last % page_size) // block_size if page_size > block_size else 0
    return page, slot


def gather_positions(cache: torch.Tensor, block_table_row: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Rows `start .. start+n-1` of one request from a paged cache: [n, HK, D]."""
    page_size = cache.shape[1]
    pos = torch.arange(start, start + n, device=cache.device)
    pages = block_table_row.to(cache.device).long()[pos // page_size]
    return cache[pages, pos % page_size]


def pool_block(keys: torch.Tensor, gate: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Summary of one complete block (SPEC.md, "Block summary").

    keys: [B, HK, D]; weight: [HK, B, D] for `learned`. Returns [S, HK, D] float32.
    """
    k = keys.float()
    if gate == "mean":
        return k.mean(0, keepdim=True)
    if gate == "max":
        return k.amax(0, keepdim=True)
    if gate == "minmax":
        return torch.stack([k.amax(0), k.amin(0)])
    if gate == "learned":
        check(weight is not None, "gate 'learned' needs weight [HK, B, D]")
        return (weight.float().transpose(0, 1) * k).sum(0, keepdim=True)
    raise ValueError(f"gate={gate!r}: expected mean, max, minmax or learned")


def completed_blocks(ctx_lens: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> list[tuple[int, int]]:
    """(request, block) pairs whose last token is written in this step: `ctx//B <= j < L//B`."""
    out = []
    for r, (c, L) in enumerate(zip(ctx_lens.tolist(), seq_lens.tolist())):
        out.extend((r, j) for j in range(c // block_size, L // block_size))
    return out


def update_block_summaries(
    k_cache: torch.Tensor,        # [N, P, HK, D]
    summary_cache: torch.Tensor,  # [N, SLOTS, S, HK, D]
    block_table: torch.Tensor,    # [R, max_pages] int32
    ctx_lens: torch.Tensor,       # [R] tokens cached before this step
    seq_lens: torch.Tensor,       # [R] tokens after this step
    block_size: int,
    gate: str,
    weight: torch.Tensor | None = None,  # [HK, B, D] (learned)
) -> None:
    """Write the summary of every block that completes in this step (after K is in the cache)."""
    check_cache(k_cache)
    page_size = k_cache.shape[1]
    check(summary_cache.shape[1] == slots_per_page(block_size, page_size)
          and summary_cache.shape[2] == summary_slots(gate),
          f"summary_cache must be [N, {slots_per_page(block_size, page_size)}, "
          f"{summary_slots(gate)}, HK, D], got {tuple(summary_cache.shape)}")
    for r, j in completed_blocks(ctx_lens, seq_lens, block_size):
        keys = gather_positions(k_cache, block_table[r], j * block_size, block_size)
        page, slot = summary_location(block_table[r], j, block_size, page_size)
        summary_cache[page, slot] = pool_block(keys, gate, weight).to(summary_cache.dtype)


def read_block_summaries(
    summary_cache: torch.Tensor,  # [N, SLOTS, S, HK, D]
    block_table: torch.Tensor,    # [R, max_pages]
    num_blocks: torch.Tensor,     # [R] complete blocks per request
    block_size: int,
    page_size: int,
) -> torch.Tensor:
    """Dense per-request summaries of complete blocks: [R, NB, S, HK, D] float32, NB = max,
    zero past each request's own count."""
    dev = summary_cache.device
    nb = int(num_blocks.max()) if num_blocks.numel() else 0
    last = (torch.arange(nb, device=dev) + 1) * block_size - 1                  # [NB]
    pages = block_table.to(dev).long()[:, last // page_size]                    # [R, NB]
    slot = (last % page_size) // block_size if page_size > block_size else torch.zeros_like(last)
    valid = torch.arange(nb, device=dev)[None, :] < num_blocks.to(dev)[:, None]  # [R, NB]
    out = summary_cache[torch.where(valid, pages, 0), slot[None, :].expand_as(pages)].float()
    return torch.where(valid[:, :, None, None, None], out, 0.0)
