"""Gate scoring and block selection: the torch reference, written from SPEC.md "Selection".

Readable first: one Python loop over query tiles. It returns the dense selection mask
`sel [T, H, NBV]` (NBV = blocks visible to the latest query): sel[t, h, j] is True when query
head h of token t attends block j. The fast path (`fast.py`) emits compact lists instead; tests
turn those into the same mask.

Choice left open by SPEC: a selection takes `n = min(right, forced + candidates)` blocks, i.e.
exactly `right` when there are more, every block otherwise (so `left` only bounds the dense
fallback limits, whose default is `left x block size`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SelectParams:
    """Ints and strings only: what selection needs from the config for one layer."""

    block_size: int
    query_tile: int
    mode: str                 # token | union | shared
    gate: str                 # mean | max | minmax | learned
    sink_blocks: int
    local_blocks: int
    enc_right: int
    dec_right: int
    enc_limit: int            # prefill tile: latest position + 1 below this -> dense
    dec_limit: int            # decode token: context length below this -> dense
    scale: float              # attention scale (used by `shared`)
    dense: bool = False       # a dense layer: every block for everyone


def gate_scores(q: torch.Tensor, summary: torch.Tensor, gate: str) -> torch.Tensor:
    """SPEC.md "Block score". q: [M, D]; summary: [NB, S, D] -> [M, NB] float32.

    A 16-bit query is scored against its summaries rounded to its own dtype, products and sums in
    float32: what a 16-bit tensor-core product computes, so the GPU kernels score at the 16-bit
    rate and still agree with this reference up to the order of the sums.
    """
    if q.dtype in (torch.float16, torch.bfloat16):
        summary = summary.to(q.dtype)
    q = q.float()
    summary = summary.float()
    if gate == "minmax":
        mx, mn = summary[:, 0], summary[:, 1]                     # [NB, D]
        return torch.maximum(q[:, None, :] * mx[None], q[:, None, :] * mn[None]).sum(-1)
    return q @ summary[:, 0].T


def _tiles(token_req: list[int], token_pos: list[int], token_decode: list[bool], p: SelectParams):
    """Group token indices into query tiles (SPEC.md "query tile")."""
    if p.mode == "token":
        return [[t] for t in range(len(token_req))]
    groups: dict[tuple, list[int]] = {}
    for t, (r, pos, dec) in enumerate(zip(token_req, token_pos, token_decode)):
        key = (r, "d", t) if dec else (r, "p", pos // p.query_tile)
        groups.setdefault(key, []).append(t)
    return list(groups.values())


def select_blocks(
    q: torch.Tensor,             # [T, H, D]
    summaries: torch.Tensor,     # [R, NB, S, HK, D] summaries of complete blocks
    token_req: torch.Tensor,     # [T] request of each token
    token_pos: torch.Tensor,     # [T] absolute position of each token
    token_decode: torch.Tensor,  # [T] bool: token is a decode step
    p: SelectParams,
) -> torch.Tensor:
    """Selection mask [T, H, NBV] bool (NBV = max(pos // B) + 1)."""
    T, H, _ = q.shape
    HK = summaries.shape[3]
    G = H // HK
    B = p.block_size
    req, pos, dec = token_req.tolist(), token_pos.tolist(), token_decode.tolist()
    nbv = max(pos) // B + 1 if T else 0
    sel = torch.zeros(T, H, nbv, dtype=torch.bool)
    for idx in _tiles(req, pos, dec, p):
        r = req[idx[0]]
        c0 = min(pos[t] for t in idx) // B
        c1 = max(pos[t] for t in idx) // B
        decode = dec[idx[0]]
        right = p.dec_right if decode else p.enc_right
        limit = p.dec_limit if decode else p.enc_limit
        if p.dense or max(pos[t] for t in idx) + 1 < limit:
            sel[idx, :, : c1 + 1] = True                       # dense fallback
            continue
        forced = set(range(min(p.sink_blocks, c1 + 1))) | set(range(max(0, c0 - p.local_blocks), c1 + 1))
        cands = [j for j in range(c0) if j not in forced]
        if len(forced) + len(cands) <= right:
            sel[idx, :, : c1 + 1] = True
            continue
        k = right - len(forced)
        forced_l = sorted(forced)
        for hk in range(HK):
            heads = list(range(hk * G, (hk + 1) * G))
            qm = q[idx][:, heads].reshape(len(idx) * G, -1)                      # members [M, D]
            s = gate_scores(qm, summaries[r, cands, :, hk], p.gate)              # [M, C]
            if p.mode == "shared":
                group = torch.softmax(s * p.scale, dim=-1).amax(0)               # [C]
                chosen = [cands[i] for i in group.topk(k).indices.tolist()]
                for t in idx:
                    for h in heads:
                        sel[t, h, forced_l + chosen] = True
                continue
            picks = s.topk(k, dim=-1).indices                                    # [M, k]
            if p.mode == "union":
                chosen = sorted({cands[i] for i in picks.flatten().tolist()})
                for t in idx:
                    for h in heads:
                        sel[t, h, forced_l + chosen] = True
            else:  # token
                for m, (t, h) in enumerate((t, h) for t in idx for h in heads):
                    sel[t, h, forced_l + [cands[i] for i in picks[m].tolist()]] = True
    return sel
