"""The MoBA attention layer end to end (write K/V, pool, select, attend), held to SPEC.md's
properties: equal to the composed references, dense when every block is selected, unchanged by
chunking, decode equal to a one-token prefill."""

import pytest
import torch

from moba_backend.attention import MobaAttention
from moba_backend.ops.pooling import naive as pool_ref
from moba_backend.ops.prefill.naive import sparse_attention
from moba_backend.ops.select.naive import select_blocks
from moba_backend.plan import build_plan
from tests.helpers import HAS_CUDA, INTERPRET, assert_close, kernel_device, make_batch, moba_cfg

IMPLS = ["torch"] + (["triton"] if kernel_device() else [])
MIXED = [(130, 1, True), (200, 1, True), (37, 90, False), (0, 77, False)]


def make_layer(cfg, H, HK, D, impl, layer_idx=0):
    w = torch.randn(HK, cfg.moba_block_size, D) * 0.1 if cfg.moba_gate == "learned" else None
    return MobaAttention(cfg, H, HK, D, layer_idx=layer_idx, gate_weight=w, impl=impl)


def device_for(impl):
    return kernel_device() if impl == "triton" else "cpu"


def context_summaries(layer, batch, dtype=torch.float32):
    """The summary cache as earlier steps left it: every complete block of the cached context."""
    P = batch.k_cache.shape[1]
    sc = torch.zeros(layer.summary_shape(batch.k_cache.shape[0], P), dtype=dtype)
    ctx = batch.seq_lens - (batch.query_start_loc[1:] - batch.query_start_loc[:-1])
    pool_ref.update_block_summaries(batch.k_cache.to(dtype), sc, batch.block_table, torch.zeros_like(ctx),
                                    ctx, layer.cfg.moba_block_size, layer.cfg.moba_gate, layer.gate_weight)
    return sc


def run_layer(layer, batch, cfg, dev):
    """One step through the layer on fresh caches copied from the batch; returns out (cpu)."""
    kc, vc = batch.k_cache.clone().to(dev), batch.v_cache.clone().to(dev)
    sc = context_summaries(layer, batch).to(dev)
    plan = batch.plan(cfg, device=dev)
    w = layer.gate_weight
    if w is not None:
        layer.gate_weight = w.to(dev)
    out = layer.forward(batch.q.to(dev), batch.k.to(dev), batch.v.to(dev), kc, vc, sc, plan)
    layer.gate_weight = w
    return out.cpu()


def composed_reference(layer, batch, cfg):
    """Naive pooling -> naive selection -> naive attention, in float64."""
    b = batch
    b.write_new_kv()
    P = b.k_cache.shape[1]
    B = cfg.moba_block_size
    sc = context_summaries(layer, b, torch.float64)
    ctx = b.seq_lens - (b.query_start_loc[1:] - b.query_start_loc[:-1])
    pool_ref.update_block_summaries(b.k_cache.double(), sc, b.block_table, ctx, b.seq_lens, B,
                                    cfg.moba_gate, layer.gate_weight)
    summ = pool_ref.read_block_summaries(sc, b.block_table, b.seq_lens.long() // B, B, P)
    plan = b.plan(cfg)
    mask = select_blocks(b.q, summ, plan.token_req, plan.token_pos, plan.token_decode, layer.params)
    return sparse_attention(b.q.double(), b.k_cache.double(), b.v_cache.double(), b.block_table,
                            plan.token_req, plan.token_pos, mask, B, layer.scale), mask


def dense_reference(batch):
    """Plain causal attention per request with torch SDPA over the gathered K/V, float64."""
    b = batch
    b.write_new_kv()
    H, HK = b.q.shape[1], b.k_cache.shape[2]
    out = torch.empty(b.q.shape, dtype=torch.float64)
    qsl = b.query_start_loc.tolist()
    for r, L in enumerate(b.seq_lens.tolist()):
        lo, hi = qsl[r], qsl[r + 1]
        k = pool_ref.gather_positions(b.k_cache, b.block_table[r], 0, L).double()
        v = pool_ref.gather_positions(b.v_cache, b.block_table[r], 0, L).double()
        q = b.q[lo:hi].double()
        mask = torch.arange(L)[None, :] <= torch.arange(L - (hi - lo), L)[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(H // HK, 0),
            v.transpose(0, 1).repeat_interleave(H // HK, 0), attn_mask=mask)
        out[lo:hi] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["token", "union", "shared"])
@pytest.mark.parametrize("gate", ["mean", "max", "minmax", "learned"])
def test_layer_matches_composed_reference(gate, mode, impl):
    cfg = moba_cfg(moba_gate=gate, moba_tile_select=mode)
    layer = make_layer(cfg, 8, 2, 64, impl)
    b = make_batch(MIXED, H=8, HK=2, D=64, P=16)
    out = run_layer(layer, b, cfg, device_for(impl))
    ref, mask = composed_reference(layer, b, cfg)
    assert mask.float().mean() < 0.6, "the case must actually be sparse"
    assert_close(out, ref, 1e-4, f"{impl} {gate} {mode}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["shared", "token"])
@pytest.mark.parametrize("case", ["all_blocks_window", "dense_layer"])
def test_every_block_selected_equals_dense(case, mode, impl):
    if case == "dense_layer":
        cfg, layer_idx = moba_cfg(moba_dense_layers=[2], moba_tile_select=mode), 2
    else:
        cfg, layer_idx = moba_cfg(moba_encoder_top_k_right=100, moba_decoder_top_k_right=100,
                                  moba_tile_select=mode), 0
        assert make_batch(MIXED + [(0, 33, False)], H=8, HK=2, D=64, P=32).plan(cfg).all_dense
    layer = make_layer(cfg, 8, 2, 64, impl, layer_idx)
    b = make_batch(MIXED + [(0, 33, False)], H=8, HK=2, D=64, P=32)
    out = run_layer(layer, b, cfg, device_for(impl))
    assert_close(out, dense_reference(b), 1e-4, f"dense {case} {mode} {impl}")


@pytest.mark.skipif(not kernel_device(), reason="the dense route belongs to the kernel path")
@pytest.mark.parametrize("case", ["fresh_dense", "dense_layer", "too_many", "cached_prefix", "sparse"])
def test_dense_route_of_fresh_prompts(case, monkeypatch):
    """A step of fresh prompts that runs dense goes to SDPA over its own keys and values (few
    requests), and equals dense attention; too many requests, a cached prefix or a sparse group
    keeps the step on the kernels, with the same result."""
    import moba_backend.attention as attention_mod

    big = dict(moba_encoder_top_k_left=200, moba_encoder_top_k_right=200)
    reqs = [(0, 150, False), (0, 97, False)]
    cfg, layer_idx, routed = moba_cfg(**big), 0, True
    if case == "dense_layer":
        cfg, layer_idx = moba_cfg(moba_dense_layers=[1]), 1
    elif case == "too_many":
        reqs = [(0, 40 + i, False) for i in range(attention_mod.DENSE_ROUTE_MAX_REQS + 1)]
        routed = False
    elif case == "cached_prefix":
        reqs = [(0, 150, False), (30, 97, False)]
        routed = False
    elif case == "sparse":
        cfg, routed = moba_cfg(), False
    layer = make_layer(cfg, 8, 2, 64, "triton", layer_idx)
    b = make_batch(reqs, H=8, HK=2, D=64, P=16)
    calls = []
    real = attention_mod.F.scaled_dot_product_attention
    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = run_layer(layer, b, cfg, kernel_device())
    assert (len(calls) == len(reqs)) == routed and (len(calls) == 0) != routed, (case, len(calls))
    assert_close(out, dense_reference(b) if case != "sparse" else composed_reference(layer, b, cfg)[0],
                 1e-4, f"dense route {case}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode,right", [("shared", 100), ("union", 12)], ids=["shared-all-blocks", "union-sparse"])
def test_query_tile_wider_than_kernel_tile(mode, right, impl):
    """A 128-token query tile over 16-token blocks is run as kernel tiles of 64 tokens (256 rows
    = 64 tokens x a group of 4): a kernel tile's list, made for the whole query tile, also holds
    blocks after its own last query, which must stay causally masked."""
    cfg = moba_cfg(moba_tile_select=mode, moba_query_tile=128, moba_encoder_top_k_right=right,
                   moba_decoder_top_k_right=right)
    layer = make_layer(cfg, 8, 2, 64, impl)
    b = make_batch([(0, 300, False), (21, 150, False), (200, 1, True)], H=8, HK=2, D=64, P=16)
    assert b.plan(cfg).tokens_per_tile < cfg.moba_query_tile
    out = run_layer(layer, b, cfg, device_for(impl))
    ref, mask = composed_reference(layer, b, cfg)
    assert_close(out, ref, 1e-4, f"{impl} {mode} wide tile")
    if right == 100:
        assert_close(out, dense_reference(b), 1e-4, f"{impl} {mode} wide tile dense")


def run_chunks(layer, cfg, batch, cuts, dev):
    """Prefill one request in chunks ending at `cuts`; returns the outputs of all its tokens."""
    P = batch.k_cache.shape[1]
    kc, vc = batch.k_cache.clone().to(dev), batch.v_cache.clone().to(dev)
    sc = torch.zeros(layer.summary_shape(kc.shape[0], P), device=dev)
    outs, start = [], 0
    for end in cuts:
        plan = build_plan(cfg, torch.tensor([0, end - start]), torch.tensor([end]), batch.block_table,
                          batch.slot_mapping[start:end], torch.tensor([False]), P, layer.num_heads,
                          layer.num_kv_heads, device=dev)
        outs.append(layer.forward(batch.q[start:end].to(dev), batch.k[start:end].to(dev),
                                  batch.v[start:end].to(dev), kc, vc, sc, plan).cpu())
        start = end
    return torch.cat(outs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode,cuts", [
    ("token", [37, 100, 211, 300]),        # token mode: any split point
    ("union", [64, 96, 224, 300]),         # tile modes: multiples of the query tile (32)
    ("shared", [32, 160, 300]),
])
def test_chunked_prefill_equals_one_shot(mode, cuts, impl):
    cfg = moba_cfg(moba_tile_select=mode, moba_gate="minmax")
    layer = make_layer(cfg, 8, 2, 64, impl)
    b = make_batch([(0, 300, False)], H=8, HK=2, D=64, P=16)
    dev = device_for(impl)
    one = run_chunks(layer, cfg, b, [300], dev)
    chunked = run_chunks(layer, cfg, b, cuts, dev)
    assert_close(chunked, one, 1e-5, f"chunked {mode}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["token", "union", "shared"])
def test_decode_equals_one_token_prefill(mode, impl):
    cfg = moba_cfg(moba_tile_select=mode, moba_decoder_top_k_right=6, moba_encoder_top_k_right=6)
    layer = make_layer(cfg, 8, 2, 64, impl)
    reqs = [(180, 1, True), (250, 1, True), (97, 1, True)]
    b = make_batch(reqs, H=8, HK=2, D=64, P=16)
    dev = device_for(impl)
    as_decode = run_layer(layer, b, cfg, dev)
    b.is_decode = torch.tensor([False] * len(reqs))
    as_prefill = run_layer(layer, b, cfg, dev)
    assert_close(as_decode, as_prefill, 1e-5, "decode vs prefill")


def test_padding_slots_and_longer_key_are_ignored():
    """Engines pad slot_mapping with -1 and may pass more key rows than slots."""
    cfg = moba_cfg()
    layer = make_layer(cfg, 4, 2, 64, "torch")
    b = make_batch([(40, 20, False)], H=4, HK=2, D=64, P=16)
    ref = run_layer(layer, b, cfg, "cpu")
    k_pad = torch.cat([b.k, torch.randn(3, 2, 64)])
    v_pad = torch.cat([b.v, torch.randn(3, 2, 64)])
    kc, vc = b.k_cache.clone(), b.v_cache.clone()
    sc = torch.zeros(layer.summary_shape(kc.shape[0], 16))
    before = kc.clone()
    out = layer.forward(torch.cat([b.q, torch.randn(3, 4, 64)]), k_pad, v_pad, kc, vc, sc, b.plan(cfg))
    assert torch.equal(out[:20], ref)
    written = (kc != before).any(-1).any(-1).sum()
    assert written <= 20


def test_bad_inputs_raise_clear_errors():
    cfg = moba_cfg()
    layer = make_layer(cfg, 4, 2, 64, "torch")
    b = make_batch([(0, 20, False)], H=4, HK=2, D=64, P=16)
    sc = torch.zeros(layer.summary_shape(b.k_cache.shape[0], 16))
    with pytest.raises(ValueError, match="q must be"):
        layer.forward(b.q[:, :3], b.k, b.v, b.k_cache, b.v_cache, sc, b.plan(cfg))
    with pytest.raises(ValueError, match="summary_cache must be"):
        layer.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, sc[:, :, :, :1], b.plan(cfg))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        MobaAttention(cfg, 5, 2, 64)
    with pytest.raises(ValueError, match="needs gate weights"):
        MobaAttention(moba_cfg(moba_gate="learned"), 4, 2, 64)
    with pytest.raises(ValueError, match="a decode request has one query token"):
        build_plan(cfg, torch.tensor([0, 2]), torch.tensor([5]), b.block_table, b.slot_mapping[:2],
                   torch.tensor([True]), 16, 4, 2)


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA device")
def test_cache_beyond_2_pow_31_elements():
    """Pages past element 2^31 of a bf16 cache are addressed right (64-bit offsets)."""
    free, _ = torch.cuda.mem_get_info()
    P, HK, D = 16, 8, 128
    N = (2**31) // (P * HK * D) + 64
    if 2 * N * P * HK * D * 2 > free * 0.8:
        pytest.skip("not enough GPU memory for a >2^31-element cache")
    cfg = moba_cfg(moba_block_size=16)
    layer = make_layer(cfg, 32, 8, 128, "triton")
    kc = torch.empty(N, P, HK, D, dtype=torch.bfloat16, device="cuda")
    vc = torch.empty_like(kc)
    b = make_batch([(300, 1, True), (100, 60, False)], H=32, HK=8, D=128, P=16, dtype=torch.bfloat16)
    hi = torch.arange(N - 40, N, dtype=torch.int32)      # the last pages of the cache
    remap = torch.zeros(b.k_cache.shape[0], dtype=torch.int32)
    remap[1:] = hi[: b.k_cache.shape[0] - 1]
    kc[remap.long().cuda()] = b.k_cache.cuda()
    vc[remap.long().cuda()] = b.v_cache.cuda()
    bt, slots = remap[b.block_table.long()], b.slot_mapping
    slots = remap[(slots // P).long()].long() * P + slots % P
    plan = build_plan(cfg, b.query_start_loc, b.seq_lens, bt, slots, b.is_decode, P, 32, 8, device="cuda")
    sc = torch.zeros(layer.summary_shape(N, P), device="cuda")
    sc[remap.long().cuda()] = context_summaries(layer, b).cuda()
    out = layer.forward(b.q.cuda(), b.k.cuda(), b.v.cuda(), kc, vc, sc, plan).float().cpu()
    ref = run_layer(make_layer(cfg, 32, 8, 128, "torch"), b, cfg, "cpu")
    assert_close(out, ref.float(), 2e-2, "beyond 2^31")
