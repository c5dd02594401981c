"""Selection, tested apart from attention: fixed summaries in, selected blocks out."""

import pytest
import torch

from moba_backend.ops.common import slots_per_page, summary_slots
from moba_backend.ops.pooling.naive import read_block_summaries
from moba_backend.ops.select.fast import select, selection_mask
from moba_backend.ops.select.naive import SelectParams, select_blocks
from tests.helpers import kernel_device, make_batch, moba_cfg, requires_triton

BATCHES = {
    "mixed_decode_chunked_prefill": [(130, 1, True), (200, 1, True), (37, 90, False), (0, 77, False)],
    "long_prefill_chunk_at_odd_offset": [(45, 203, False)],
    "decodes_only": [(17, 1, True), (300, 1, True), (96, 1, True)],
}


def params(cfg, scale=0.125) -> SelectParams:
    return SelectParams(block_size=cfg.moba_block_size, query_tile=cfg.moba_query_tile,
                        mode=cfg.moba_tile_select, gate=cfg.moba_gate,
                        sink_blocks=cfg.moba_sink_blocks, local_blocks=cfg.moba_local_blocks,
                        enc_right=cfg.moba_encoder_top_k_right, dec_right=cfg.moba_decoder_top_k_right,
                        enc_limit=cfg.encoder_seq_limit, dec_limit=cfg.decoder_seq_limit, scale=scale)


def fixed_summaries(batch, cfg, dev="cpu"):
    P = batch.k_cache.shape[1]
    N, _, HK, D = batch.k_cache.shape
    sc = torch.randn(N, slots_per_page(cfg.moba_block_size, P), summary_slots(cfg.moba_gate), HK, D, device=dev)
    if cfg.moba_gate == "minmax":  # a real summary has max >= min channel-wise
        sc = torch.stack([sc.amax(2), sc.amin(2)], dim=2)
    return sc


def reference_mask(batch, cfg, sc, plan):
    summ = read_block_summaries(sc.cpu(), batch.block_table, batch.seq_lens.long() // cfg.moba_block_size,
                                cfg.moba_block_size, batch.k_cache.shape[1])
    return select_blocks(batch.q, summ, plan.token_req.cpu(), plan.token_pos.cpu(), plan.token_decode.cpu(),
                         params(cfg))


def test_reference_semantics_by_hand():
    """One decode token at block 9 (block 16): sink 0, local 8, own 9, plus the 2 best of 1..7."""
    cfg = moba_cfg(moba_gate="mean", moba_tile_select="token", moba_decoder_top_k_right=5)
    b = make_batch([(150, 1, True)], H=1, HK=1, D=4, P=16)
    summ = torch.zeros(1, 9, 1, 1, 4)
    summ[0, 3, 0, 0] = b.q[0, 0] * 5          # strongly aligned with the query
    summ[0, 6, 0, 0] = b.q[0, 0] * 3
    summ[0, 1, 0, 0] = -b.q[0, 0] * 5
    plan = b.plan(cfg)
    sel = select_blocks(b.q, summ, plan.token_req, plan.token_pos, plan.token_decode, params(cfg))
    assert sel[0, 0].nonzero().flatten().tolist() == [0, 3, 6, 8, 9]


def test_dense_fallback_below_seq_limit():
    cfg = moba_cfg(moba_use_encoder_seq_limit=10_000, moba_tile_select="shared")
    b = make_batch([(0, 200, False)], H=2, HK=1, D=8, P=16)
    plan = b.plan(cfg)
    sel = reference_mask(b, cfg, fixed_summaries(b, cfg), plan)
    causal_blocks = torch.arange(sel.shape[-1])[None, :] <= (plan.token_pos.long() // 16)[:, None]
    assert (sel | ~causal_blocks[:, None, :]).all()     # every block a token can see


@pytest.mark.parametrize("mode", ["token", "union", "shared"])
@pytest.mark.parametrize("gate", ["mean", "minmax"])
@pytest.mark.parametrize("batch", list(BATCHES), ids=list(BATCHES))
def test_torch_fast_path_matches_reference(batch, gate, mode):
    cfg = moba_cfg(moba_gate=gate, moba_tile_select=mode)
    b = make_batch(BATCHES[batch], H=8, HK=2, D=32, P=16)
    plan = b.plan(cfg)
    sc = fixed_summaries(b, cfg)
    ref = reference_mask(b, cfg, sc, plan)
    got = selection_mask(select(b.q, sc, plan, params(cfg)), plan, 8)
    assert torch.equal(got, ref)
    if mode == "token":  # every member selects exactly n blocks
        n = plan.group_n[plan.token_group].long()
        assert torch.equal(got.sum(-1), n[:, None].expand(-1, 8))


@requires_triton
@pytest.mark.parametrize("mode", ["token", "union", "shared"])
@pytest.mark.parametrize("gate,H,HK,D,P", [("mean", 8, 2, 64, 16), ("minmax", 4, 1, 64, 32),
                                            ("max", 8, 1, 128, 64), ("learned", 4, 4, 64, 128)],
                         ids=["mean-g4", "minmax-g4", "max-g8", "learned-g1"])
def test_triton_scorer_matches_reference(gate, H, HK, D, P, mode):

    dev = kernel_device()
    cfg = moba_cfg(moba_gate=gate, moba_tile_select=mode)
    b = make_batch(BATCHES["mixed_decode_chunked_prefill"], H=H, HK=HK, D=D, P=P)
    plan = b.plan(cfg, device=dev)
    sc = fixed_summaries(b, cfg)
    ref = reference_mask(b, cfg, sc, plan)
    got = selection_mask(select(b.q.to(dev), sc.to(dev), plan, params(cfg), backend="triton"),
                         plan, H).cpu()
    # float32 scores may order near-ties differently (SPEC: ties any): allow a sliver of rows
    rows_differ = (got != ref).any(-1).float().mean().item()
    print(f"rows differing: {rows_differ:.4%}")
    assert rows_differ <= 0.005


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["token", "union", "shared"])
@pytest.mark.parametrize("gate", ["mean", "minmax"])
def test_triton_scorer_16bit_queries_match_reference(gate, mode, dtype):
    """16-bit queries: every Triton path (per-token scores, fused group scores, fused decode)
    scores against summaries rounded to the query dtype with float32 sums, as the reference does,
    so the lists agree but for near-ties."""
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter computes no bf16 dot (Triton 3.9); fp16 runs the same code")
    dev = kernel_device()
    cfg = moba_cfg(moba_gate=gate, moba_tile_select=mode)
    b = make_batch(BATCHES["mixed_decode_chunked_prefill"] + [(230, 1, True)], H=8, HK=2, D=64, P=16,
                   dtype=dtype)
    plan = b.plan(cfg, device=dev)
    sc = fixed_summaries(b, cfg)
    ref = reference_mask(b, cfg, sc, plan)
    got = selection_mask(select(b.q.to(dev), sc.to(dev), plan, params(cfg), backend="triton"),
                         plan, 8).cpu()
    rows_differ = (got != ref).any(-1).float().mean().item()
    print(f"rows differing: {rows_differ:.4%}")
    assert rows_differ <= 0.005


@requires_triton
@pytest.mark.parametrize("gate,P,dtype", [("mean", 16, torch.float16), ("minmax", 64, torch.bfloat16),
                                         ("max", 128, torch.float32)], ids=str)
def test_group_scores_from_compact_summaries_are_identical(gate, P, dtype):
    """`shared` group scores read from the compact copy (in the query's dtype) equal those read
    through the paged float32 cache (the kernels round summaries to the query dtype either way);
    the copy holds each request's block summaries in order, also where a page holds several
    blocks (P 64 and 128, blocks of 16)."""
    from moba_backend.ops.select.triton_impl import compact_summaries, group_scores_fwd

    dev = kernel_device()
    cfg = moba_cfg(moba_gate=gate, moba_tile_select="shared")
    b = make_batch(BATCHES["mixed_decode_chunked_prefill"] + [(0, 5, False)], H=8, HK=2, D=64, P=P,
                   dtype=dtype)
    plan = b.plan(cfg, device=dev)
    sc = fixed_summaries(b, cfg, dev)
    paged = group_scores_fwd(b.q.to(dev), sc, plan, gate, 1, 0.125, compact=False)
    compact = group_scores_fwd(b.q.to(dev), sc, plan, gate, 1, 0.125, compact=True)
    assert torch.isfinite(paged).any()
    assert torch.equal(paged, compact)
    # the layout, exactly: a float32 copy (the interpreter's 16-bit casts may round otherwise)
    copy = compact_summaries(sc, plan, torch.float32).cpu()          # [R, HK, S, NBV, D]
    B, bt, sc = plan.block_size, plan.block_table.cpu(), sc.cpu()
    for r, L in enumerate(plan.seq_lens.cpu().tolist()):
        for j in range(L // B):                                      # complete blocks
            last = j * B + B - 1
            want = sc[bt[r, last // P], (last % P) // B].transpose(0, 1)   # [HK, S, D]
            assert torch.equal(copy[r, :, :, j], want), (r, j)
    with pytest.raises(ValueError, match="one-launch"):
        group_scores_fwd(b.q.to(dev), sc.to(dev), plan, gate, 1, 0.125, compact=True, fused=False)


@requires_triton
@pytest.mark.parametrize("gate,P,block_m,block_j", [("mean", 16, 64, 16), ("minmax", 32, 16, 64),
                                                   ("mean", 128, 32, 32)])
def test_group_scores_one_launch_equals_two(gate, P, block_m, block_j):
    """The one-launch `shared` group score (per-member normalisers, then an atomic max over the
    members of each block) equals the two-launch one on a mixed batch: same forced/-inf entries
    and the same candidate values to float32 rounding (their sums may be ordered differently).
    Candidate runs span whole steps of `block_j` blocks (swept unmasked) and a partial one."""
    from moba_backend.ops.select.triton_impl import group_scores_fwd

    dev = kernel_device()
    cfg = moba_cfg(moba_gate=gate, moba_tile_select="shared")
    b = make_batch(BATCHES["mixed_decode_chunked_prefill"] + [(0, 300, False), (1100, 130, False)], H=8, HK=2,
                   D=64, P=P, dtype=torch.float16)
    plan = b.plan(cfg, device=dev)
    sc = fixed_summaries(b, cfg, dev)
    one = group_scores_fwd(b.q.to(dev), sc, plan, gate, 1, 0.125, block_m=block_m, block_j=block_j, fused=True)
    two = group_scores_fwd(b.q.to(dev), sc, plan, gate, 1, 0.125, block_m=block_m, fused=False)
    finite = torch.isfinite(two)
    assert finite.any() and (two == float("inf")).any()
    assert torch.equal(finite, torch.isfinite(one))
    assert torch.equal(one[~finite], two[~finite])
    torch.testing.assert_close(one[finite], two[finite], rtol=1e-5, atol=0)


DECODES = [(17, 1, True), (300, 1, True), (96, 1, True), (1000, 1, True), (160, 1, True)]


@requires_triton
@pytest.mark.parametrize("mode", ["token", "union", "shared"])
@pytest.mark.parametrize("gate", ["mean", "minmax"])
@pytest.mark.parametrize("rows_in", ["registers", "scratch"])
def test_fused_decode_select_exact_window(gate, mode, rows_in, monkeypatch):
    """left == right: the fused decode kernel must pick exactly the reference's blocks, with
    its score rows held in registers after a separate score launch (small batches), and
    (past DECODE_REG_BLOCKS, large batches) bisected in scratch after its own products."""
    from moba_backend.ops.select import triton_impl

    if rows_in == "scratch":
        monkeypatch.setattr(triton_impl, "DECODE_REG_BLOCKS", 0)
        monkeypatch.setattr(triton_impl, "DECODE_SCORE_SPLIT_BELOW", 0)   # and scores in-kernel
    dev = kernel_device()
    cfg = moba_cfg(moba_gate=gate, moba_tile_select=mode, moba_decoder_top_k_left=5, moba_decoder_top_k_right=5)
    b = make_batch(DECODES, H=8, HK=2, D=64, P=16)
    plan = b.plan(cfg, device=dev)
    sc = fixed_summaries(b, cfg)
    ref = reference_mask(b, cfg, sc, plan)
    got = selection_mask(select(b.q.to(dev), sc.to(dev), plan, params(cfg), backend="triton"), plan, 8).cpu()
    rows_differ = (got != ref).any(-1).float().mean().item()
    print(f"rows differing: {rows_differ:.4%}")
    assert rows_differ <= 0.005


@requires_triton
@pytest.mark.parametrize("ties", [False, True], ids=["random", "all_scores_tied"])
@pytest.mark.parametrize("rows_in", ["registers", "scratch"])
def test_fused_decode_select_window_and_top_set(ties, rows_in, monkeypatch):
    """left < right: every head keeps its forced blocks, takes `right` blocks (the prefill path's
    choice, so decode equals a one-token prefill), and no unselected candidate outscores a
    selected one, also when every score ties."""
    from moba_backend.ops.select import triton_impl
    from moba_backend.ops.select.naive import gate_scores

    if rows_in == "scratch":
        monkeypatch.setattr(triton_impl, "DECODE_REG_BLOCKS", 0)
    dev = kernel_device()
    cfg = moba_cfg(moba_tile_select="token", moba_decoder_top_k_left=4, moba_decoder_top_k_right=9)
    b = make_batch(DECODES, H=8, HK=2, D=64, P=16)
    plan = b.plan(cfg, device=dev)
    sc = torch.zeros(fixed_summaries(b, cfg).shape) if ties else fixed_summaries(b, cfg)
    got = selection_mask(select(b.q.to(dev), sc.to(dev), plan, params(cfg), backend="triton"), plan, 8).cpu()
    summ = read_block_summaries(sc, b.block_table, b.seq_lens.long() // 16, 16, 16)
    for t in range(plan.num_tokens):
        c = int(plan.token_pos[t]) // 16
        r = int(plan.token_req[t])
        for h in range(8):
            sel = got[t, h, : c + 1]
            n = int(sel.sum())
            if c + 1 <= 9:
                assert n == c + 1
                continue
            assert n == 9, (t, h, n)
            assert sel[0] and sel[c] and sel[c - 1], "sink, own and local blocks are forced"
            s = gate_scores(b.q[t, h][None], summ[r, : c - 1, :, h // 4], "mean")[0]
            cand = torch.zeros(c + 1, dtype=torch.bool)
            cand[1: c - 1] = True
            chosen, left_out = s[(sel & cand)[: c - 1]], s[(~sel & cand)[: c - 1]]
            if chosen.numel() and left_out.numel():
                assert chosen.min() >= left_out.max() - 1e-4 * s.abs().max()


@requires_triton
@pytest.mark.parametrize("mode", ["token", "union"])
def test_member_topk_exact_n_under_ties(mode):
    """Every block scoring the same: each member still takes exactly n blocks, forced ones in,
    ties going to the lower block index (SPEC: ties any)."""
    dev = kernel_device()
    cfg = moba_cfg(moba_gate="mean", moba_tile_select=mode)
    b = make_batch([(40, 300, False), (250, 1, True)], H=4, HK=2, D=32, P=16)
    plan = b.plan(cfg, device=dev)
    sc = fixed_summaries(b, cfg)
    # one-hot summaries: every score is q[..., 0] exactly, whatever order a product sums in (a
    # copied random summary ties only up to rounding, which differs between BLAS builds under
    # the Triton interpreter)
    sc.zero_()
    sc[..., 0] = 1.0
    sel = select(b.q.to(dev), sc.to(dev), plan, params(cfg), backend="triton")
    got = selection_mask(sel, plan, 4).cpu()
    pos = plan.token_pos.cpu().long()
    j = torch.arange(got.shape[-1])
    c1, flo = (pos // 16)[:, None], plan.group_flo[plan.token_group].cpu().long()[:, None]
    forced = (j[None, :] <= c1) & ((j[None, :] < 1) | (j[None, :] >= flo))
    if mode == "token":
        n = plan.group_n[plan.token_group].cpu().long()
        assert torch.equal(got.sum(-1), n[:, None].expand(-1, 4))
        assert (got | ~forced[:, None, :]).all()
        # the lowest-index candidates fill the rest
        cand_taken = got & ~forced[:, None, :]
        n_cand = cand_taken.sum(-1, keepdim=True)
        first = (j[None, None, :] >= 1) & (j[None, None, :] < 1 + n_cand)
        assert torch.equal(cand_taken, first & ~forced[:, None, :])
    else:
        assert (got | ~forced[:, None, :]).all()


@requires_triton
@pytest.mark.parametrize("rounding", [None, 1.0], ids=["distinct", "many_ties"])
def test_member_topk_kernel_matches_sorted_reference(rounding):
    """The top-k kernel on given scores against a stable sort: forced blocks, then candidates by
    score descending, ties to the lower block index."""
    from moba_backend.ops.common import SENTINEL
    from moba_backend.ops.select import triton_impl

    dev = kernel_device()
    cfg = moba_cfg(moba_gate="mean", moba_tile_select="token")
    b = make_batch([(600, 260, False), (130, 1, True)], H=4, HK=2, D=32, P=16)
    plan = b.plan(cfg, device=dev)
    T, nbv = plan.num_tokens, plan.num_visible_blocks
    s = torch.randn(T, 4, nbv) * 3
    if rounding:
        s = torch.round(s / rounding) * rounding
        s[..., 1::5] = -0.0   # equal to 0.0 as a value, not as bits
        s[..., 3::5] = 0.0
    k = plan.max_select
    members = torch.full((T, 4, k), SENTINEL, dtype=torch.int32, device=dev)
    acc = torch.zeros(plan.num_tiles, 2, nbv, dtype=torch.int8, device=dev)
    triton_impl.member_topk_fwd(s.to(dev), plan, 0, T, 1, plan.token_tile, acc, members)
    grp = plan.token_group.cpu()
    c1, flo, n = (plan.group_c1.cpu()[grp].long(), plan.group_flo.cpu()[grp].long(),
                  plan.group_n.cpu()[grp].long())
    j = torch.arange(nbv)
    for t in range(T):
        visible = j <= c1[t]
        forced = visible & ((j < 1) | (j >= flo[t]))
        cand = visible & ~forced
        for h in range(4):
            order = torch.argsort(torch.where(cand, -s[t, h], float("inf")), stable=True)
            take = int(min(n[t], visible.sum())) - int(forced.sum())
            want = sorted(j[forced].tolist() + order[:max(take, 0)].tolist())
            got = [x for x in members[t, h].cpu().tolist() if x != SENTINEL]
            assert got == want, (t, h)


@requires_triton
@pytest.mark.parametrize("rounding", [None, 1.0], ids=["distinct", "many_ties"])
def test_group_topn_kernel_matches_sorted_reference(rounding):
    """`shared` mode's top n of the group scores (forced +inf, past the tile -inf) against a
    stable sort: forced blocks, then candidates by score descending, ties to the lower index."""
    from moba_backend.ops.common import SENTINEL
    from moba_backend.ops.select import triton_impl

    dev = kernel_device()
    NG, HK, nbv, width = 9, 3, 77, 12
    s = torch.rand(NG, HK, nbv) + 0.01
    if rounding:
        s = torch.round(s * 4) / 4
    c1 = torch.randint(0, nbv, (NG,))
    c1[0], c1[1] = 3, nbv - 1                      # fewer blocks than n; every block visible
    j = torch.arange(nbv)
    forced = (j[None, :] <= c1[:, None]) & ((j[None, :] < 1) | (j[None, :] >= (c1 - 1)[:, None]))
    s = torch.where(forced[:, None, :], float("inf"), torch.where((j[None, :] <= c1[:, None])[:, None, :], s,
                                                                   float("-inf")))
    n = torch.randint(3, width + 1, (NG,)).int()
    lists, counts = triton_impl.group_topn_fwd(s.to(dev), n.to(dev), width)
    for i in range(NG):
        for h in range(HK):
            order = torch.argsort(-s[i, h], stable=True)
            take = min(int(n[i]), int(c1[i]) + 1)
            want = sorted(order[:take].tolist())
            got = lists[i, h].cpu().tolist()
            assert got == want + [SENTINEL] * (width - take), (i, h)
            assert int(counts[i, h]) == take
