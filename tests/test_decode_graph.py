"""Decode steps planned by DecodePlanBuffers (static shapes): equal to build_plan's steps, padding
requests write nothing, and on a GPU one captured CUDA graph replays later steps correctly."""

import pytest
import torch

from moba_backend.attention import MobaAttention, write_kv
from moba_backend.config import MobaConfig
from moba_backend.ops.cache import naive as cache_naive
from moba_backend.plan import DecodePlanBuffers
from moba_backend.workspace import decode_plan_buffers_bytes
from tests.helpers import HAS_CUDA, assert_close, kernel_device, make_batch, moba_cfg, requires_gpu, \
    requires_triton
from tests.test_attention import context_summaries

IMPLS = ["torch"] + (["triton"] if kernel_device() else [])
B = 16
# (context, 1, decode): a step that completes a block (L = 3B), a first token (L = 1), long ones,
# and a one-token prompt chunk (not a decode: it selects with the encoder window)
DECODES = [(3 * B - 1, 1, True), (5 * B + 6, 1, True), (0, 1, True), (9 * B + 2, 1, True),
           (7 * B + 3, 1, False)]


def layer_for(cfg, impl, H=8, HK=2, D=64, layer_idx=0):
    w = torch.randn(HK, B, D) * 0.1 if cfg.moba_gate == "learned" else None
    return MobaAttention(cfg, H, HK, D, layer_idx=layer_idx, gate_weight=w, impl=impl)


def padded(batch, pads: int, seed: int = 0):
    """The batch as a graph batch: `pads` padding requests (no token of their own: sequence
    length 0, slot -1, a null block table row) after the real ones, one q/k/v row each."""
    g = torch.Generator().manual_seed(seed)
    H, D = batch.q.shape[1:]
    HK = batch.k.shape[1]
    rnd = lambda *s: torch.randn(*s, generator=g).to(batch.q.dtype)  # noqa: E731
    return (torch.cat([batch.q, rnd(pads, H, D)]), torch.cat([batch.k, rnd(pads, HK, D)]),
            torch.cat([batch.v, rnd(pads, HK, D)]),
            torch.cat([batch.seq_lens, torch.zeros(pads, dtype=torch.int32)]),
            torch.cat([batch.block_table, torch.zeros(pads, batch.block_table.shape[1], dtype=torch.int32)]),
            torch.cat([batch.slot_mapping, torch.full((pads,), -1)]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate,mode,dense_layers", [("mean", "shared", []), ("minmax", "token", []),
                                                    ("learned", "union", []), ("mean", "shared", [0])])
def test_static_decode_plan_matches_build_plan(gate, mode, dense_layers, impl):
    cfg = moba_cfg(moba_gate=gate, moba_tile_select=mode, moba_dense_layers=dense_layers)
    layer = layer_for(cfg, impl)
    dev = kernel_device() if impl == "triton" else "cpu"
    b = make_batch(DECODES, H=8, HK=2, D=64, P=16, seed=3)
    sc0 = context_summaries(layer, b)
    if layer.gate_weight is not None:
        layer.gate_weight = layer.gate_weight.to(dev)
    caches = lambda: (b.k_cache.clone().to(dev), b.v_cache.clone().to(dev), sc0.clone().to(dev))  # noqa: E731
    kc, vc, sc = caches()
    ref = layer.forward(b.q.to(dev), b.k.to(dev), b.v.to(dev), kc, vc, sc, b.plan(cfg, device=dev))

    bufs = DecodePlanBuffers(cfg, max_reqs=8, max_seq_len=16 * B, page_size=16, num_heads=8,
                             num_kv_heads=2, device=dev, head_dim=64)
    q, k, v, seq, bt, slot = (x.to(dev) for x in padded(b, pads=2))
    prefill = torch.cat([~b.is_decode, torch.zeros(2, dtype=torch.bool)])
    plan = bufs.plan(seq, bt, slot, prefill=prefill)
    n = len(DECODES)
    assert plan.static and plan.num_tokens == n + 2 and plan.num_visible_blocks == 16
    kc2, vc2, sc2 = caches()
    out = layer.forward(q, k, v, kc2, vc2, sc2, plan)
    assert_close(out[:n].cpu(), ref.cpu(), 1e-5, f"static plan {gate} {mode}")
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc), "padding requests wrote K/V"
    assert torch.equal(sc2, sc), "summaries differ (or padding requests wrote some)"
    assert not torch.equal(sc, sc0.to(dev)), "the step completing a block wrote no summary"


def test_static_plan_rejects_bad_shapes():
    cfg = moba_cfg()
    bufs = DecodePlanBuffers(cfg, max_reqs=2, max_seq_len=64, page_size=16, num_heads=4,
                             num_kv_heads=2, device="cpu")
    with pytest.raises(ValueError, match="decode requests"):
        bufs.plan(torch.ones(3, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32),
                  torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="slot_mapping"):
        bufs.plan(torch.ones(2, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int32),
                  torch.zeros(3, dtype=torch.int64))
    bufs.plan(torch.ones(2, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int32),
              torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="pages per request"):   # a captured graph holds the buffer
        bufs.plan(torch.ones(2, dtype=torch.int32), torch.zeros(2, 5, dtype=torch.int32),
                  torch.zeros(2, dtype=torch.int64))


@requires_triton
def test_triton_kv_write_matches_reference():
    """One launch per token, padding slots (-1) skipped, strided K/V rows (a fused qkv split)."""
    from moba_backend.ops.cache.triton_impl import write_kv_fwd

    dev = kernel_device()
    HK, D, P, N = 3, 64, 16, 9
    qkv = torch.randn(7, (4 + 2 * HK) * D)
    k = qkv[:, 4 * D:(4 + HK) * D].view(7, HK, D)
    v = qkv[:, (4 + HK) * D:].view(7, HK, D)
    slots = torch.tensor([17, 3, -1, 140, 64, -1])
    kc, vc = torch.randn(N, P, HK, D), torch.randn(N, P, HK, D)
    kr, vr = kc.clone(), vc.clone()
    cache_naive.write_kv(k, v, kr, vr, slots)
    kc, vc = kc.to(dev), vc.to(dev)
    write_kv_fwd(k.to(dev), v.to(dev), kc, vc, slots.to(dev))
    assert torch.equal(kc.cpu(), kr) and torch.equal(vc.cpu(), vr)


@requires_gpu
@pytest.mark.parametrize("gate,mode,dense_layers", [("mean", "shared", []), ("minmax", "token", []),
                                                    ("mean", "shared", [0])])
def test_decode_steps_replay_in_a_cuda_graph(gate, mode, dense_layers):
    """Capture one decode step (K/V write, pooling, selection, attention) for a padded batch,
    then replay it for later steps with only the plan buffers and the inputs updated: each
    replay equals that step run eagerly from build_plan."""
    cfg = moba_cfg(moba_gate=gate, moba_tile_select=mode, moba_dense_layers=dense_layers)
    H, HK, D, P, pads = 8, 2, 128, 16, 3
    layer = layer_for(cfg, "auto", H, HK, D)
    ctx = [3 * B - 3, 5 * B + 6, 0, 9 * B + 2, 14 * B]
    steps = 4
    b = make_batch([(c + steps - 1, 1, True) for c in ctx], H=H, HK=HK, D=D, P=P, seed=5,
                   dtype=torch.bfloat16)
    dev = "cuda"
    k_all = torch.randn(len(ctx), steps, HK, D, dtype=torch.bfloat16)
    v_all = torch.randn_like(k_all)
    q_all = torch.randn(len(ctx), steps, H, D, dtype=torch.bfloat16)
    sc0 = context_summaries(layer, b)
    kc, vc, sc = b.k_cache.to(dev), b.v_cache.to(dev), sc0.to(dev)
    kr, vr, sr = kc.clone(), vc.clone(), sc.clone()
    bt = b.block_table.to(dev)
    R = len(ctx) + pads
    bufs = DecodePlanBuffers(cfg, max_reqs=16, max_seq_len=32 * B, page_size=P, num_heads=H,
                             num_kv_heads=HK, device=dev, head_dim=D)
    q_in = torch.zeros(R, H, D, dtype=torch.bfloat16, device=dev)
    k_in = torch.zeros(R, HK, D, dtype=torch.bfloat16, device=dev)
    v_in = torch.zeros_like(k_in)
    out = torch.zeros(R, H, D, dtype=torch.bfloat16, device=dev)
    bt_pad = torch.cat([bt, torch.zeros(pads, bt.shape[1], dtype=torch.int32, device=dev)])
    graph = None

    def step_inputs(i):
        pos = torch.tensor(ctx) + i
        seq = torch.cat([pos + 1, torch.zeros(pads, dtype=torch.int64)]).int()
        slot = b.block_table[torch.arange(len(ctx)), pos // P].long() * P + pos % P
        return seq, torch.cat([slot, torch.full((pads,), -1)])

    for i in range(steps):
        seq, slot = step_inputs(i)
        n = len(ctx)
        # eager reference: build_plan over the real requests
        from moba_backend.plan import build_plan
        qsl = torch.arange(n + 1, dtype=torch.int32)
        ref_plan = build_plan(cfg, qsl, seq[:n], bt, slot[:n].to(dev), torch.ones(n, dtype=torch.bool),
                              P, H, HK, device=dev, head_dim=D)
        ref = layer.forward(q_all[:, i].to(dev), k_all[:, i].to(dev), v_all[:, i].to(dev), kr, vr, sr, ref_plan)
        # graph side
        plan = bufs.plan(seq.to(dev), bt_pad, slot.to(dev))
        q_in[:n].copy_(q_all[:, i])
        k_in[:n].copy_(k_all[:, i])
        v_in[:n].copy_(v_all[:, i])
        if graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (compiles the kernels): writes are idempotent
                layer.forward(q_in, k_in, v_in, kc, vc, sc, plan, out=out)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                layer.forward(q_in, k_in, v_in, kc, vc, sc, plan, out=out)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out[:n].float().cpu(), ref.float().cpu(), 2e-2, f"replay step {i}")
        assert torch.equal(kc, kr) and torch.equal(vc, vr), f"step {i}: K/V caches differ"
        assert_close(sc.cpu(), sr.cpu(), 1e-6, f"step {i} summaries")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_build_plan_under_capture_is_refused():
    cfg = moba_cfg()
    layer = layer_for(cfg, "auto")
    b = make_batch([(40, 1, True)], H=8, HK=2, D=64, P=16, device="cuda")
    sc = torch.zeros(layer.summary_shape(b.k_cache.shape[0], 16), device="cuda")
    plan = b.plan(cfg, device="cuda")
    layer.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, sc, plan)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="DecodePlanBuffers"):
        with torch.cuda.graph(graph):
            layer.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, sc, plan)


def test_write_kv_dispatch_on_cpu():
    k = torch.randn(2, 1, 16)
    kc = torch.zeros(2, 4, 1, 16)
    vc = torch.zeros_like(kc)
    write_kv(k, k, kc, vc, torch.tensor([5, -1]))
    assert torch.equal(kc[1, 1], k[0]) and kc.abs().sum() == k[0].abs().sum()


@pytest.mark.parametrize("max_reqs,max_len,page", [(1, 100, 16), (7, 4096, 16), (256, 1 << 17, 64)])
def test_plan_buffers_nbytes_bounds_what_they_hold(max_reqs, max_len, page):
    """`decode_plan_buffers_bytes` (what the vLLM plugin adds to its memory-profile reservation)
    covers every buffer, planned once, the block table as wide as the engine's."""
    bufs = DecodePlanBuffers(MobaConfig(), max_reqs, max_len, page, 8, 2, "cpu", head_dim=64)
    pages = -(-max_len // page)
    R = min(max_reqs, 3)
    bufs.plan(torch.full((R,), min(max_len, 40), dtype=torch.int32),
              torch.arange(R * pages, dtype=torch.int32).view(R, pages) + 1,
              torch.arange(R, dtype=torch.int64))
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in vars(bufs).values() if isinstance(t, torch.Tensor)}
    assert sum(-(-n // 512) * 512 for n in held.values()) <= decode_plan_buffers_bytes(max_reqs, max_len, page)
