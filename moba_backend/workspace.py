"""An upper bound of the device memory one MoBA step allocates beyond its inputs.

An engine that sizes its KV cache from a profiling run (vLLM measures the peak of torch's
allocated bytes during a dummy forward) must count this workspace: MoBA allocates it through
torch's caching allocator inside each layer's forward, and frees it before the next layer.

The bound mirrors what the GPU path (`MobaAttention.forward` on the Triton / CUDA kernels)
allocates, phase by phase, for a step of `num_tokens` query tokens whose contexts are at most
`max_seq_len` tokens, in a batch of at most `max_reqs` requests:
- the plan's tensors (`build_plan`, made once per step and read by every layer);
- selection: the gate score chunks (`SCORE_BUDGET_BYTES` each, two alive while the next is
  made), the 16-bit summary copy of `shared` mode (`COMPACT_BUDGET_BYTES`), the `[rows, HK, NBV]`
  block masks and their sort into lists, the member lists `[T, H, W]` of `token` mode, the fused
  decode selection's scratch (and, for small batches, its raw scores);
- attention: `token` prefill's per-pass partials and bucket entries (`PARTIAL_BUDGET_BYTES`),
  bucket counts and offsets, and the split-K decode partials.
Phases that run one after the other take the larger of their peaks; what one phase hands to the
next (the Selection) counts in both. Each tensor is rounded as the allocator rounds it (512
bytes; a block above 1 MiB may be handed over up to 1 MiB larger, unsplit), and torch's own
sort / top-k buffers are counted (`_sort_bytes`, `_topk_bytes`).

NOTE: this mirrors the ops as they are; a change to what they allocate must change it too
(tests/test_workspace.py measures real steps against it, on CPU and on a GPU).

Not counted: the caller's `out` (vLLM passes its own), the engine's block table and slot
mapping (used in place: int32 / int64 on the device), the torch path (`impl="torch"`: batches
of tiles within `torch_impl.WORK_BUDGET_BYTES` plus SDPA's own buffers, and the dense score
chunks of its selection), and the `$MOBA_STATS_FILE` statistics.
"""

from __future__ import annotations

import torch

from moba_backend.config import MobaConfig
from moba_backend.ops.common import summary_slots
from moba_backend.plan import max_select_for, tokens_per_tile_for

ALLOC_ROUND = 512           # torch's CUDA caching allocator rounds every block to this
LARGE_SLACK = 1 << 20       # and may hand a request above 1 MiB a block up to 1 MiB larger
CUB_AUX_BYTES = 1 << 20     # cub's fixed bookkeeping in a sort or scan (histograms, tile states)
SMALL_SORT = 4096           # torch.sort sorts rows up to this long in place (aten `Sort.h`)
# 0-d results of reductions (`int(counts.max())`, ...), aranges over a few hundred entries and
# the like: far fewer than this many minimum-size blocks live at once in any phase
SMALL_ALLOCS = 64


def _alloc(nbytes: int) -> int:
    """Bytes the caching allocator counts for one tensor of `nbytes`."""
    if nbytes <= 0:
        return 0
    rounded = -(-nbytes // ALLOC_ROUND) * ALLOC_ROUND
    return rounded + (LARGE_SLACK if nbytes > LARGE_SLACK else 0)


def decode_plan_buffers_bytes(max_reqs: int, max_seq_len: int, page_size: int) -> int:
    """Device bytes `DecodePlanBuffers` holds once planned (persistent, beside the per-step
    workspace): eight int32, two int64 and two bool vectors of `max_reqs`, and the block table
    `[max_reqs, max_seq_len / page]` int32, as wide as an engine's."""
    pages = -(-max_seq_len // page_size)
    return (8 * _alloc(4 * max_reqs) + 2 * _alloc(8 * max_reqs) + 2 * _alloc(max_reqs)
            + _alloc(4 * max_reqs * pages))


def _sort_bytes(n: int, key: int, nsort: int) -> int:
    """`torch.sort` on CUDA of `n` elements of `key` bytes in rows of `nsort` (last dim): values
    and int64 indices; rows up to SMALL_SORT sort in place (an arange of the row's indices), longer
    ones run cub (aten `SortStable.cu`): index/segment pairs, 16 bytes an element, and the radix
    sort's second copy of keys and values and its bookkeeping, key + 9 bytes an element."""
    out = _alloc(n * key) + _alloc(8 * n)
    if nsort <= SMALL_SORT:
        return out + _alloc(8 * nsort)
    return out + _alloc(16 * n) + _alloc(n * (key + 9) + CUB_AUX_BYTES)


def _topk_bytes(slices: int, n_in: int, k: int, key: int) -> int:
    """`torch.topk(k)` (sorted) over `slices` rows of `n_in` elements in all: values and int64
    indices, the radix select's per-block digit counts (at most 2 bytes an input element and
    1 KiB a slice), then the sort of the results (and, past SMALL_SORT, its gather)."""
    n_out = slices * k
    return (_alloc(n_out * key) + _alloc(8 * n_out) + _alloc(2 * n_in + 1024 * slices)
            + _sort_bytes(n_out, key, k) + _alloc(8 * n_out))


def _lists_from_mask(rows: int, hk: int, nbv: int, width: int) -> tuple[int, int]:
    """`fast._lists_from_mask` of a mask [rows, HK, NBV] (counted by the caller): (peak, what
    it returns). It sorts `where(mask, j, SENTINEL)` int32, then keeps the first `width`
    columns and the counts."""
    n = rows * hk * nbv
    out = _alloc(rows * hk * width * 4) + _alloc(rows * hk * 4)
    peak = _alloc(4 * n) + max(_sort_bytes(n, 4, nbv), out)
    return peak, out


def step_workspace_bytes(cfg: MobaConfig, num_tokens: int, max_seq_len: int, max_reqs: int,
                         num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                         page_size: int, dense: bool = False, impl: str = "auto") -> int:
    """Upper bound of the bytes one `MobaAttention.forward` step allocates (and frees) on the
    device, the step's plan included, for any step of at most `num_tokens` query tokens
    (prefills, chunks, decodes) over contexts of at most `max_seq_len` tokens in a batch of at
    most `max_reqs` requests. `dense`: a layer of `moba_dense_layers`; `impl`: the layer's
    resolved implementation (`cuda` sizes the CUDA decode's splits)."""
    T = int(num_tokens)
    if T <= 0:
        return 0
    # the budgets live beside their kernels (modules that import Triton): read at call time
    from moba_backend.ops.decode import triton_impl as decode_triton
    from moba_backend.ops.prefill import triton_impl as prefill_triton
    from moba_backend.ops.select import fast
    from moba_backend.ops.select import triton_impl as select_triton

    H, HK, D = num_heads, num_kv_heads, head_dim
    G = H // HK
    e = dtype.itemsize
    B, Tq, mode = cfg.moba_block_size, cfg.moba_query_tile, cfg.moba_tile_select
    # requests of the step: a request has at least one query token (an engine's padding
    # requests come only in static decode steps, whose tokens are one per request)
    R = max(1, min(int(max_reqs), T))
    nbv = max(1, -(-int(max_seq_len) // B))                 # plan.num_visible_blocks
    W = max_select_for(cfg, nbv)                            # plan.max_select
    tpt, _ = tokens_per_tile_for(H, HK, mode, Tq, D)
    Nd = min(T, R)                                          # decode tokens: one per request
    # kernel tiles and groups: a request's tokens cut at multiples of the tile adds at most two
    # pieces beyond tokens / tile (a misaligned first piece, a partial last one)
    NT = min(T, T // tpt + 2 * R)
    NG = T if mode == "token" else min(T, T // Tq + 2 * R)
    small = SMALL_ALLOCS * ALLOC_ROUND

    # --- the plan (build_plan): per token 5 tensors, per group 7, per tile set 4 columns, an
    # index and the [tiles, 4] staging copy, tile groups, pooling work (blocks the step completes)
    plan = (2 * _alloc(4 * T) + _alloc(T) + 2 * _alloc(8 * T)
            + 6 * _alloc(4 * NG) + _alloc(NG)
            + 2 * (4 * _alloc(4 * NT) + _alloc(8 * NT) + _alloc(16 * NT)) + _alloc(8 * NT)
            + 2 * _alloc(4 * (T // B + R)) + _alloc(4 * R))
    if mode == "token" and not dense:
        # token prefill's spans, made by the first layer and kept on the plan (`_span_passes`):
        # the tile arrays stacked for the host read, rows and spans as int64 in one copy, then
        # int32 copies of three of its parts
        plan += _alloc(16 * NT) + _alloc(8 * (2 * T + 2 * NT)) + _alloc(4 * T) + 2 * _alloc(4 * NT)
    gate_copy = _alloc(HK * B * D * 4) if cfg.moba_gate == "learned" else 0   # CUDA pooling's float()

    # --- split-K decode partials [tokens, H, S, D] + lse [tokens, H, S] float32: the launchers
    # aim at `programs` (token, KV head, split) programs, so tokens x S <= tokens + programs / HK,
    # and give a split at least two blocks of the list (`lw` entries wide)
    programs, max_splits = decode_triton.TARGET_PROGRAMS, decode_triton.MAX_SPLITS
    if impl == "cuda" and mode != "token" and torch.cuda.is_available():
        from moba_backend.ops.decode import cuda_impl as decode_cuda
        sms = decode_cuda._num_sms(torch.cuda.current_device())
        programs = max(programs, decode_cuda.CTAS_PER_SM * sms)
        max_splits = max(max_splits, decode_cuda.MAX_SPLITS)

    def decode_attn(lw: int) -> int:
        rows = min(min(max_splits, (lw + 1) // 2) * Nd, Nd + -(-programs // HK))
        return _alloc(rows * H * D * 4) + _alloc(rows * H * 4) if rows > Nd else 0

    # --- a decode-only step (Nd tokens): the fused selection, or a dense layer's full lists
    if dense:
        LW = nbv
        dec_sel, dec_out = _dense_selection(Nd, HK, nbv)
    else:
        LW = W if mode == "shared" else min(nbv, G * W)
        nbv_p = -(-nbv // 64) * 64
        dec_out = (_alloc(Nd * HK * LW * 4) + _alloc(Nd * HK * 4)
                   + (_alloc(Nd * H * W * 4) if mode == "token" else 0))
        dec_sel = _alloc(Nd * HK * (G + (mode == "shared")) * nbv_p * 4) + dec_out
        # small batches (fewer than DECODE_SCORE_SPLIT_BELOW token x KV-head programs) make raw
        # scores [tokens, H, NBV] first: those of the largest such batch of at most Nd tokens
        n_split = min(Nd, (select_triton.DECODE_SCORE_SPLIT_BELOW - 1) // HK)
        if n_split > 0:
            dec_sel += _alloc(n_split * H * nbv * 4)
    decode_step = max(dec_sel, dec_out + decode_attn(LW))

    # --- a step with prefill tiles (any mix): selection, then prefill, then decode attention
    if dense:
        sel, sel_out = _dense_selection(NT, HK, nbv)
    elif mode == "shared":
        sel, sel_out = _shared_selection(HK, D, e, NG, NT, R, nbv, W, cfg.moba_gate, select_triton)
    else:
        sel, sel_out = _member_selection(T, H, HK, G, NT, NG, Nd, nbv, W, mode, fast)
    prefill_attn = 0
    if mode == "token" and not dense:
        prefill_attn = _token_prefill(T, H, HK, D, e, R, nbv, W, tpt, prefill_triton)
    # list width: `shared` takes n blocks, `token` decode tiles a group's members' picks
    if dense or mode == "union":
        LW = nbv
    else:
        LW = W if mode == "shared" else min(nbv, G * W)
    mixed_step = max(sel, sel_out + max(prefill_attn, decode_attn(LW)))
    # --- or the dense route of fresh prompts (`MobaAttention._dense_route`), instead of selection
    # and attention: SDPA per request, its inputs possibly copied contiguous (K/V repeated over
    # the group where the backend takes no GQA), its output and log-sum-exp, a backend workspace
    route = 4 * _alloc(T * H * D * e) + _alloc(T * H * 4) + LARGE_SLACK
    mixed_step = max(mixed_step, route)

    return plan + gate_copy + max(decode_step, mixed_step) + small


def _dense_selection(NT: int, HK: int, nbv: int) -> tuple[int, int]:
    """`fast.dense_selection`: every visible block of each tile. The static (CUDA-graph) plan's
    `where` + expand copy is smaller than this, the general path: tile arrays and last blocks,
    the mask [NT, NBV] bool, then the lists at full width."""
    tiles = 4 * _alloc(4 * NT) + 3 * _alloc(4 * NT) + _alloc(8 * NT) + _alloc(8 * nbv)
    peak, out = _lists_from_mask(NT, HK, nbv, nbv)
    return tiles + _alloc(NT * nbv) + peak, out


def _shared_selection(HK, D, e, NG, NT, R, nbv, W, gate, select_triton) -> tuple[int, int]:
    """`shared` mode with prefill tiles: `group_scores_fwd` (group scores [NG, HK, NBV] float32,
    the compact summary copy [R, HK, S, NBV, D] in the query's dtype), then `_shared_lists` (the
    top k of the group scores, sorted into lists, gathered per kernel tile)."""
    scores = _alloc(NG * HK * nbv * 4)
    copy = 0
    per_block = summary_slots(gate) * HK * D                    # summary elements of one block
    if e < 4 and nbv >= select_triton.COMPACT_MIN_BLOCKS:
        # made only within the budget: a step of fewer or shorter requests may make one that
        # the budget holds
        copy = _alloc(min(R * nbv * per_block * e, select_triton.COMPACT_BUDGET_BYTES))
    group = scores + copy
    # `_shared_lists`: the top k of the group scores (its values dropped, its int64 indices cast
    # to int32), keep [NG, 1, k] bool and n as int64, the where [NG, HK, k] int32 and its sort,
    # the counts, then the lists gathered per kernel tile (`group_topn_fwd`, which serves up to
    # GROUP_TOPN_MAX_BLOCKS blocks, makes only the lists, the counts and their gathers)
    k = min(W, nbv)
    n_out = NG * HK * k
    out = _alloc(NT * HK * k * 4) + _alloc(NT * HK * 4)
    shared_lists = (scores + _topk_bytes(NG * HK, NG * HK * nbv, k, 4) + _alloc(4 * n_out)
                    + _alloc(NG * k) + _alloc(8 * NG) + _alloc(4 * n_out) + _sort_bytes(n_out, 4, k)
                    + _alloc(4 * NG * HK) + out)
    return max(group, shared_lists), out


def _member_selection(T, H, HK, G, NT, NG, Nd, nbv, W, mode, fast) -> tuple[int, int]:
    """`token` / `union` mode with prefill tiles (`fast._member_select_triton`): the union marks
    acc [NA, HK, NBV] int8 (decode tiles in `token` mode, groups in `union`), the member lists
    [T, H, W] int32 (`token`), the raw scores by chunks of SCORE_BUDGET_BYTES (the next chunk is
    made while the last is still held), then the lists of the marks."""
    token = mode == "token"
    NA = Nd if token else NG
    acc = _alloc(NA * HK * nbv) + (_alloc(8 * T) if token else 0)    # and the rows of acc per token
    members = _alloc(T * H * W * 4) if token else 0
    # one chunk: SCORE_BUDGET_BYTES, or one token's row when that alone passes it (a step with
    # shorter contexts takes more tokens a chunk, within the same budget)
    chunk = max(1, fast.SCORE_BUDGET_BYTES // (H * nbv * 4))
    score = _alloc(min(T * H * nbv * 4, max(fast.SCORE_BUDGET_BYTES, H * nbv * 4)))
    live_chunks = 2 if T > chunk else 1
    width = min(nbv, G * W) if token else nbv
    out = _alloc(NT * HK * width * 4) + _alloc(NT * HK * 4) + members
    lists_peak, lists_out = _lists_from_mask(NA, HK, nbv, width)
    # after the loop the last chunk is still bound; acc.bool(), the lists of the marks; `token`
    # pads the prefill tiles' rows in front (a full + cat), `union` gathers per tile
    tail = score + _alloc(NA * HK * nbv) + max(lists_peak, lists_out + 2 * (out - members))
    return acc + members + max(live_chunks * score, tail), out


def _token_prefill(T, H, HK, D, e, R, nbv, W, tpt, prefill_triton) -> int:
    """`token_prefill_fwd`: per pass of spans, partial outputs + log-sum-exp + bucket entries of
    every (token, head, pick) (PARTIAL_BUDGET_BYTES, or one kernel tile when a tile alone
    passes it) and the bucket counts / cursors / offsets [spans, HK, NBV]."""
    budget = prefill_triton.PARTIAL_BUDGET_BYTES
    per_pick = D * e + 8                                    # partials are in the query's dtype
    # picks of one pass: tokens x H x (this step's W <= W); a pass stops before passing the
    # budget unless its first span alone does, and a span passes it only as one kernel tile
    picks = min(T * H * W, max(-(-budget // per_pick), tpt * H * W))
    partials = _alloc(picks * D * e) + _alloc(4 * picks) + _alloc(4 * picks)
    # spans of a pass: a request's spans but its last are cut only when the next tile would pass
    # span_tokens (so they hold > span_tokens - tpt tokens); tokens of a pass <= picks / H
    span_tokens = max(1, min(prefill_triton.SPAN_TOKENS, budget // (H * W * per_pick)))
    min_span = max(1, span_tokens - tpt + 1)
    pass_tokens = min(T, -(-picks // H))
    spans = min(pass_tokens, min(R, pass_tokens) + pass_tokens // min_span)
    keys = spans * HK * nbv
    # count + cursor int32; the offsets (int64): the old pass's, the counts cast for the cumsum,
    # the cumsum, the new; the scan's buffer; two passes' row spans
    counts = (2 * _alloc(4 * keys) + 4 * _alloc(8 * keys) + _alloc(CUB_AUX_BYTES)
              + 2 * _alloc(4 * pass_tokens))
    return partials + counts
