"""Attention given a selection (SPEC.md), torch reference and CPU path.

Each query head at position t attends, causally, exactly the tokens of the blocks selected for
it, with ordinary softmax attention (scale, GQA, optional sliding window and soft cap).
"""

from __future__ import annotations

import torch



def sparse_attention(
    q: torch.Tensor,            # [T, H, D]
    k_cache: torch.Tensor,      # [N, P, HK, D]
    v_cache: torch.Tensor,      # [N, P, HK, D]
    block_table: torch.Tensor,  # [R, max_pages]
    token_req: torch.Tensor,    # [T]
    token_pos: torch.Tensor,    # [T]
    sel: torch.Tensor,          # [T, H, NBV] bool: blocks each query head attends
    block_size: int,
    scale: float,
    softcap: float = 0.0,
    window: int = -1,           # sliding window in tokens (keys with t - pos < window), -1: none
    q_chunk: int = 256,
) -> torch.Tensor:
    """Output [T, H, D] in q's dtype, computed in float32."""
    T, H, D = q.shape
    HK = k_cache.shape[2]
    G = H // HK
    out = torch.empty_like(q)
    dev = q.device
    req = token_req.to(dev)
    pos_all = token_pos.to(dev).long()
    page_size = k_cache.shape[1]
    for r in torch.unique(req).tolist():
        idx = (req == r).nonzero().flatten()
        pages_r = block_table[r].to(dev).long()
        for i in range(0, idx.numel(), q_chunk):
            ti = idx[i:i + q_chunk]
            t = ti.numel()
            pos = pos_all[ti]                                                   # [t]
            blk = sel[ti.cpu() if sel.device.type == "cpu" else ti].to(dev)    # [t, H, NBV]
            # only the keys of blocks some query of the chunk selected (the rest are masked anyway)
            blocks = blk.any(0).any(0).nonzero().flatten()
            key_pos = (blocks[:, None] * block_size + torch.arange(block_size, device=dev)).flatten()
            key_pos = key_pos[key_pos <= pos.max()]                             # [l]
            pages, slots = pages_r[key_pos // page_size], key_pos % page_size
            kc = k_cache[pages, slots].float()                                  # [l, HK, D]
            vc = v_cache[pages, slots].float()
            qg = q[ti].float().view(t, HK, G, D)
            s = torch.einsum("tkgd,lkd->tkgl", qg, kc).reshape(t, H, -1) * scale  # [t, H, l]
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            allowed = key_pos[None, :] <= pos[:, None]                          # causal [t, l]
            if window > 0:
                allowed &= pos[:, None] - key_pos[None, :] < window
            allowed = allowed[:, None, :] & blk[:, :, key_pos // block_size]
            p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
            o = torch.einsum("tkgl,lkd->tkgd", p.view(t, HK, G, -1), vc)
            out[ti] = o.reshape(t, H, D).to(q.dtype)
    return out
