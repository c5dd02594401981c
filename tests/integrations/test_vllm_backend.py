"""The vLLM plugin without an engine: builder + impl on mixed batches against the core torch
reference, capability declarations, registration. CPU; skipped without vllm."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

from vllm.platforms import current_platform  # noqa: E402
from vllm.v1.attention.backend import AttentionType  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402

from moba_backend.config import MobaConfigError  # noqa: E402
from moba_backend.integrations.vllm import BACKEND_PATH, CPU_BACKEND_PATH, register  # noqa: E402
from moba_backend.integrations.vllm.backend import (CPU_DENSE_ENV,  # noqa: E402
                                                    MobaAttentionBackend, MobaAttentionImpl,
                                                    MobaCPUAttentionBackend, STATS_ENV,
                                                    layer_index, summary_bytes_per_page)
from moba_backend.workspace import decode_plan_buffers_bytes  # noqa: E402
from tests.helpers import assert_close, requires_gpu  # noqa: E402
from tests.integrations.vllm_steps import Harness, Shape, Work  # noqa: E402


# vLLM's CPU attention (the dense route on CPU) exists on the CPU platform only
requires_cpu_platform = pytest.mark.skipif(not current_platform.is_cpu(),
                                           reason="vLLM's CPU attention route: CPU platform only")


def sparse_cfg(B: int, **kw) -> dict:
    # Small windows so a few hundred tokens already skip blocks.
    return {"moba_block_size": B, "moba_query_tile": 16, "moba_encoder_top_k_left": 2,
            "moba_encoder_top_k_right": 4, "moba_decoder_top_k_left": 2,
            "moba_decoder_top_k_right": 4, **kw}


def dense_cfg(B: int) -> dict:
    return {"moba_block_size": B, "moba_use_encoder_seq_limit": 1 << 20,
            "moba_use_decoder_seq_limit": 1 << 20}


# (id, shape, block size, extra config): GQA 3/4/1/8, head dims 64/128, pages 16/32/64/128,
# pages smaller than, equal to and larger than MoBA blocks.
CASES = [
    ("gqa3-d64-p16-b16-token", Shape(9, 3, 64, 16), 16, {}),
    ("gqa4-d128-p32-b16-union-minmax", Shape(8, 2, 128, 32), 16,
     {"moba_tile_select": "union", "moba_gate": "minmax"}),
    ("gqa1-d64-p128-b32-shared-max", Shape(4, 4, 64, 128), 32,
     {"moba_tile_select": "shared", "moba_gate": "max"}),
    ("gqa8-d64-p64-b128-token", Shape(8, 1, 64, 64), 128, {}),
]


def two_steps(B: int) -> tuple[list[int], list[Work], list[Work]]:
    """Step 1: prefills and first chunks. Step 2 (decodes first, as vLLM reorders): decodes, a
    one-token prompt's decode, a last chunk, a one-token chunk that is still a prefill, a new
    prefill. Lengths in MoBA blocks plus odd offsets."""
    u = lambda x: int(x * B)  # noqa: E731
    p0, p1, p2, p4, p5 = u(9) + 3, u(8) + 5, u(12) + 7, u(5) - 3, u(6) + 2
    lengths = [p0 + 1, p1, p2 + 1, 2, p4, p5]
    step1 = [Work(0, 0, p0, p0), Work(1, 0, u(5) + 1, p1), Work(2, 0, p2, p2), Work(3, 0, 1, 1),
             Work(5, 0, p5 - 1, p5)]
    step2 = [Work(0, p0, p0 + 1, p0), Work(2, p2, p2 + 1, p2), Work(3, 1, 2, 1),
             Work(1, u(5) + 1, p1, p1), Work(5, p5 - 1, p5, p5), Work(4, 0, p4, p4)]
    return lengths, step1, step2


@pytest.mark.parametrize("name,shape,B,extra", CASES, ids=[c[0] for c in CASES])
def test_mixed_batch_matches_core(name, shape, B, extra, tmp_path, monkeypatch):
    stats = tmp_path / "stats.jsonl"
    monkeypatch.setenv(STATS_ENV, str(stats))
    lengths, step1, step2 = two_steps(B)
    h = Harness(shape, sparse_cfg(B, **extra), lengths, seed=hash(name) % 1000)
    for i, work in enumerate((step1, step2)):
        out = h.step_plugin(work)
        ref = h.step_reference(work)
        assert_close(out, ref, 1e-5, f"{name} step {i + 1}")
    rows = [json.loads(x) for x in stats.read_text().splitlines()]
    assert [r["layer"] for r in rows] == [3, 3]
    sel = sum(r["prefill_selected"] + r["decode_selected"] for r in rows)
    vis = sum(r["prefill_visible"] + r["decode_visible"] for r in rows)
    print(f"{name}: selected {sel} of {vis} (token, head, block) pairs")
    assert sel < vis, "the sparse config selected every block"
    assert rows[1]["decode_selected"] < rows[1]["decode_visible"]


@requires_gpu
@pytest.mark.parametrize("name,shape,B,extra", CASES, ids=[c[0] for c in CASES])
def test_mixed_batch_on_cuda_matches_core(name, shape, B, extra):
    """The impl's Triton path (the plugin on a CUDA device) against the core torch path on CPU."""
    lengths, step1, step2 = two_steps(B)
    h = Harness(shape, sparse_cfg(B, **extra), lengths, seed=hash(name) % 1000, device="cuda")
    d = Harness(shape, dense_cfg(B), lengths, seed=1, device="cuda")
    for i, work in enumerate((step1, step2)):
        assert_close(h.step_plugin(work), h.step_reference(work), 1e-4, f"{name} cuda step {i + 1}")
        assert_close(d.step_plugin(work), d.dense_reference(work), 1e-4, f"{name} cuda dense step {i + 1}")


@requires_gpu
@pytest.mark.parametrize("name,shape,B,extra", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_decode_steps_on_cuda_are_planned_for_cuda_graphs(name, shape, B, extra):
    """Steps of one token per request padded as vLLM pads a CUDA graph's batch (the padding
    requests after the real ones, one token row each) take the static plan, into the same buffers
    every step, and match the core torch path. vLLM replays its decode graphs for any such batch,
    so a request whose prompt ends with a one-token chunk (still a prefill: encoder window) is
    planned the same way."""
    lengths = [int(9.5 * B), 3 * B - 2, 5, 14 * B + 3]
    steps = 4
    h = Harness(shape, sparse_cfg(B, **extra), [L + steps for L in lengths] + [11 * B + 3],
                seed=hash(name) % 1000, device="cuda")
    prompt4 = 11 * B + 3
    prefill = [Work(r, 0, L, L) for r, L in enumerate(lengths)] + [Work(4, 0, prompt4 - 1, prompt4)]
    assert_close(h.step_plugin(prefill), h.step_reference(prefill), 1e-4, f"{name} prefill")
    assert not h.last_metadata.plan.static
    ptrs = None
    for i in range(steps):
        work = [Work(r, L + i, L + i + 1, L) for r, L in enumerate(lengths)]
        if i == 0:   # the last token of request 4's prompt, batched with the decodes
            work.append(Work(4, prompt4 - 1, prompt4, prompt4))
        out = h.step_plugin(work, pad=2, pad_reqs=2)
        plan = h.last_metadata.plan
        assert plan.static and plan.num_tokens == len(work) + 2
        assert h.last_metadata.num_prefills == (1 if i == 0 else 0)
        now = (plan.seq_lens.data_ptr(), plan.group_c1.data_ptr(), plan.block_table.data_ptr(),
               plan.slot_mapping.data_ptr(), plan.pool_blk.data_ptr())
        assert ptrs is None or now == ptrs, "the static plan moved to new buffers"
        ptrs = now
        assert_close(out, h.step_reference(work), 1e-4, f"{name} decode step {i}")


@pytest.mark.parametrize("host", [True, False], ids=["host-seq-lens", "device-seq-lens-only"])
def test_builder_plans_from_host_seq_lens_when_exact(host):
    """Without speculative decoding vLLM's host copy of seq_lens is exact: the builder plans from
    it (no read-back from the device, which here cannot even be read); without it, it reads the
    device tensor."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    lengths, step1, _ = two_steps(16)
    h = Harness(Shape(8, 2, 64, 16), sparse_cfg(16), lengths, seed=4, host_seq_lens=host)
    ref = h.step_reference(step1)
    if host:
        T, q, k, v, slot, qsl, seq, bt, prefilling = h._inputs(step1, 0)
        cm = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.empty(len(step1), device="meta"),
            num_reqs=len(step1), num_actual_tokens=T, max_query_len=int((qsl[1:] - qsl[:-1]).max()),
            max_seq_len=int(seq.max()), block_table_tensor=bt, slot_mapping=slot,
            is_prefilling=prefilling, seq_lens_cpu_upper_bound=seq)
        assert torch.equal(h.builder.build(0, cm).plan.seq_lens, seq)
    assert_close(h.step_plugin(step1), ref, 1e-5, "host seq lens" if host else "device seq lens")


def test_profiling_run_reserves_nothing_on_cpu(monkeypatch):
    """vLLM's profiling forward (no metadata) on CPU returns the output untouched and neither
    sizes nor allocates a workspace (GPU memory is what vLLM profiles)."""
    from moba_backend.integrations.vllm import backend

    monkeypatch.setattr(backend, "_workspace_reserved", False)
    monkeypatch.setattr(backend, "step_workspace_bytes",
                        lambda *a, **kw: pytest.fail("sized a workspace on CPU"))
    h = Harness(Shape(8, 2, 64, 16), sparse_cfg(16), [40], seed=2)
    assert h.impl._engine_limits == (1 << 16, 32, 16)      # the stub's max_model_len, max_num_seqs
    q, k, v = torch.randn(40, 8, 64), torch.randn(40, 2, 64), torch.randn(40, 2, 64)
    out = torch.full_like(q, 7.0)
    assert h.impl.forward(h.layer, q, k, v, h.kv_cache, None, out) is out
    assert bool((out == 7.0).all()) and not backend._workspace_reserved


@requires_gpu
@pytest.mark.parametrize("mode", ["token", "shared"])
def test_profiling_run_reserves_the_step_workspace_once(mode, monkeypatch):
    """On a GPU the profiling forward allocates and frees the workspace bound of a real step of
    its token count (contexts up to max_model_len, max_num_seqs requests), once per process."""
    from moba_backend.integrations.vllm import backend

    monkeypatch.setattr(backend, "_workspace_reserved", False)
    h = Harness(Shape(8, 2, 64, 16), sparse_cfg(16, moba_tile_select=mode), [40], seed=2, device="cuda")
    T = 2048
    q = torch.randn(T, 8, 64, device="cuda")
    k, v = torch.randn(T, 2, 64, device="cuda"), torch.randn(T, 2, 64, device="cuda")
    out = torch.empty_like(q)
    # the step workspace, and the builder's decode-graph plan buffers (made after the profile)
    want = (h.impl._layer(h.layer, q.device).workspace_bytes(T, 1 << 16, 32, 16, q.dtype)
            + decode_plan_buffers_bytes(32, 1 << 16, 16))
    for first in (True, False):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        h.impl.forward(h.layer, q, k, v, h.kv_cache, None, out)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == base, "the workspace was not released"
        rise = torch.cuda.max_memory_allocated() - base
        assert rise >= want if first else rise == 0, (first, rise, want)
    assert backend._workspace_reserved


def test_cudagraph_support_is_declared_for_gpus_only():
    from vllm.v1.attention.backend import AttentionCGSupport
    from moba_backend.integrations.vllm.backend import MobaMetadataBuilder
    from tests.integrations.vllm_steps import stub_vllm_config

    get = MobaMetadataBuilder.get_cudagraph_support
    assert get(stub_vllm_config({}, 4, device="cpu"), None) == AttentionCGSupport.NEVER
    assert get(stub_vllm_config({}, 4, device="cuda"), None) == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    # the torch ops read shapes back from the device: no graphs
    torch_impl = stub_vllm_config({"moba_impl": "torch"}, 4, device="cuda")
    assert get(torch_impl, None) == AttentionCGSupport.NEVER


@pytest.mark.parametrize("name,shape,B,extra", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_every_block_selected_is_dense_attention(name, shape, B, extra):
    lengths, step1, step2 = two_steps(B)
    h = Harness(shape, dense_cfg(B), lengths, seed=1)
    for i, work in enumerate((step1, step2)):
        assert_close(h.step_plugin(work), h.dense_reference(work), 1e-4, f"{name} dense step {i + 1}")


def routes(stats) -> list[str]:
    return [json.loads(x)["route"] for x in stats.read_text().splitlines()]


# Dense steps on CPU: vLLM's CPU attention over staged pages (vec and vec16 layouts: pages of 64
# and 16 tokens) against MoBA's torch path and plain attention.
DENSE_CASES = [CASES[0], CASES[3]]


@requires_cpu_platform
@pytest.mark.parametrize("name,shape,B,extra", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_dense_steps_run_vllm_cpu_attention(name, shape, B, extra, tmp_path, monkeypatch):
    stats = tmp_path / "stats.jsonl"
    monkeypatch.setenv(STATS_ENV, str(stats))
    lengths, step1, step2 = two_steps(B)
    h = Harness(shape, dense_cfg(B), lengths, seed=5)
    for i, work in enumerate((step1, step2)):
        out = h.step_plugin(work)
        assert_close(out, h.step_reference(work), 1e-5, f"{name} routed vs MoBA torch, step {i + 1}")
        assert_close(out, h.dense_reference(work), 1e-5, f"{name} routed vs dense, step {i + 1}")
    assert routes(stats) == ["vllm_cpu", "vllm_cpu"]
    # switched off, the same steps run on MoBA's path
    stats.unlink()
    monkeypatch.setenv(CPU_DENSE_ENV, "0")
    h = Harness(shape, dense_cfg(B), lengths, seed=5)
    h.step_plugin(step1)
    assert routes(stats) == ["moba"]


def test_staging_through_vllm_writer(monkeypatch):
    """Where vLLM's CPU page layout is not plain K^T / V (AMX), pages are staged by vLLM's writer."""
    from moba_backend.integrations.vllm import backend

    monkeypatch.setattr(backend, "_vllm_cpu_layout_is_plain", lambda *a: False)
    shape, B = Shape(9, 3, 64, 32), 16
    lengths, step1, _ = two_steps(B)
    h = Harness(shape, dense_cfg(B), lengths, seed=8)
    assert_close(h.step_plugin(step1), h.dense_reference(step1), 1e-5, "staged by vLLM's writer")


@requires_cpu_platform
def test_dense_layer_runs_vllm_cpu_attention_in_sparse_steps(tmp_path, monkeypatch):
    stats = tmp_path / "stats.jsonl"
    monkeypatch.setenv(STATS_ENV, str(stats))
    shape, B = Shape(9, 3, 64, 32), 16
    lengths, step1, step2 = two_steps(B)
    h = Harness(shape, sparse_cfg(B, moba_dense_layers=[3]), lengths, seed=6)   # the harness layer
    for i, work in enumerate((step1, step2)):
        out = h.step_plugin(work)
        assert_close(out, h.step_reference(work), 1e-5, f"dense layer, step {i + 1}")
        assert_close(out, h.dense_reference(work), 1e-5, f"dense layer vs dense, step {i + 1}")
    assert routes(stats) == ["vllm_cpu", "vllm_cpu"]


@requires_cpu_platform
def test_routed_dense_step_writes_the_summaries_later_sparse_steps_read(tmp_path, monkeypatch):
    """Step 1 (prompts, all dense by the encoder limit) runs on vLLM's CPU attention, yet must pool
    the blocks it completes: step 2's decodes are sparse and select by those summaries."""
    stats = tmp_path / "stats.jsonl"
    monkeypatch.setenv(STATS_ENV, str(stats))
    shape, B = Shape(9, 3, 64, 16), 16
    lengths, step1, step2 = two_steps(B)
    h = Harness(shape, sparse_cfg(B, moba_use_encoder_seq_limit=1 << 20), lengths, seed=7)
    for i, work in enumerate((step1, step2)):
        assert_close(h.step_plugin(work), h.step_reference(work), 1e-5, f"step {i + 1}")
    rows = [json.loads(x) for x in stats.read_text().splitlines()]
    assert [r["route"] for r in rows] == ["vllm_cpu", "moba"]
    assert rows[1]["decode_selected"] < rows[1]["decode_visible"]


def test_learned_gate_weights_are_loaded_per_layer(tmp_path):
    gate = pytest.importorskip("moba_backend.gate")
    shape, B = Shape(9, 3, 64, 16), 16
    path = tmp_path / "gate.safetensors"
    # W = 1/B reproduces the mean gate; layer 3 (the harness's layer) must be the one applied
    weights = gate.mean_gate(5, shape.HK, B, shape.D)
    weights[2] = torch.randn_like(weights[2])
    gate.save_gate_weights(path, weights)
    lengths, step1, step2 = two_steps(B)
    learned = Harness(shape, sparse_cfg(B, moba_gate="learned", moba_gate_weights=str(path)), lengths, seed=3)
    out_l = [learned.step_plugin(w) for w in (step1, step2)]
    ref_l = [learned.step_reference(w) for w in (step1, step2)]
    mean = Harness(shape, sparse_cfg(B, moba_gate="mean"), lengths, seed=3)
    out_m = [mean.step_plugin(w) for w in (step1, step2)]
    for i in range(2):
        assert_close(out_l[i], ref_l[i], 1e-5, f"learned vs core, step {i + 1}")
        assert_close(out_l[i], out_m[i], 1e-5, f"learned 1/B vs mean, step {i + 1}")


def test_summaries_live_in_the_counted_page():
    shape, B = Shape(9, 3, 64, 32), 16
    lengths, step1, _ = two_steps(B)
    h = Harness(shape, sparse_cfg(B, moba_gate="minmax"), lengths)
    spec = h.spec
    extra = summary_bytes_per_page(h.cfg, shape.P, shape.HK, shape.D)
    assert extra == 2 * 2 * shape.HK * shape.D * 4                   # 2 slots x (max, min) x f32
    assert spec.page_size_bytes >= spec.unpadded_page_size_bytes + extra
    assert spec.page_size_bytes - spec.unpadded_page_size_bytes - extra < 64
    h.step_plugin(step1)
    # the summaries were written inside the allocation vLLM accounts for, after each page's K/V
    page = spec.page_size_bytes
    tails = h.raw.view(h.num_pages, page)[:, spec.unpadded_page_size_bytes:]
    assert tails.ne(0).any(dim=1).sum() > 0
    assert tails[0].eq(0).all(), "the null page got a summary"


def test_validation_names_the_reason():
    reasons = MobaAttentionBackend.validate_configuration(
        head_size=48, dtype=torch.float32, kv_cache_dtype="fp8", block_size=24, use_mla=False,
        has_sink=True, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
        device_capability=None, attn_type=AttentionType.ENCODER_ONLY, has_sliding_window=True)
    text = "; ".join(reasons)
    for want in ("head_size", "kv_cache_dtype", "block_size", "sinks", "attention type",
                 "sliding window"):
        assert want in text, text
    assert MobaAttentionBackend.validate_configuration(
        head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=128, use_mla=False,
        has_sink=False, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
        device_capability=None, attn_type=AttentionType.DECODER) == []
    assert MobaCPUAttentionBackend.get_name() == "CPU_ATTN"
    assert MobaAttentionBackend.get_name() == "CUSTOM"


@pytest.mark.parametrize("kw,reason", [
    (dict(head_size=48), "head_size 48"),
    (dict(sliding_window=256), "sliding window"),
    (dict(alibi_slopes=[0.5] * 4), "ALiBi"),
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype"),
    (dict(attn_type=AttentionType.ENCODER_ONLY), "attention type"),
], ids=["head48", "window", "alibi", "fp8", "encoder"])
def test_impl_rejects_unsupported(kw, reason):
    args = dict(num_heads=4, head_size=64, scale=0.125, num_kv_heads=4, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype="auto")
    args.update(kw)
    with pytest.raises(NotImplementedError, match=reason):
        MobaAttentionImpl(**args)


def test_layer_index():
    assert layer_index("model.layers.7.self_attn.attn") == 7
    assert layer_index("language_model.model.layers.12.attn") == 12
    assert layer_index("attn") == 0


def test_register_only_when_switched_on(monkeypatch):
    """CPU: MoBA takes vLLM's CPU_ATTN member (the CPU platform resolves it whatever is asked);
    GPUs: the CUSTOM member, which moba-serve asks for."""
    cpu = current_platform.is_cpu()
    member = AttentionBackendEnum.CPU_ATTN if cpu else AttentionBackendEnum.CUSTOM
    path, cls = (CPU_BACKEND_PATH, MobaCPUAttentionBackend) if cpu else (BACKEND_PATH, MobaAttentionBackend)
    member.clear_override()
    try:
        monkeypatch.delenv("FD_ATTENTION_BACKEND", raising=False)
        register()
        assert not member.is_overridden(), "the plugin changed vLLM with MoBA off"
        monkeypatch.setenv("FD_ATTENTION_BACKEND", "PLAS_ATTN")
        register()
        assert member.get_path() == path
        assert member.get_class() is cls
        monkeypatch.setenv("FD_ATTENTION_BACKEND", "MOBA_ATTEN")
        with pytest.raises(MobaConfigError, match="MOBA_ATTN"):
            register()
    finally:
        member.clear_override()


# --- dense steps on vLLM's FlashAttention (GPUs) -----------------------------------------------
# vLLM's kernel is not installed here (nor on the lent GPU): a torch stand-in with its documented
# semantics (paged K/V through the block table, seqused_k, causal aligned to the bottom right,
# GQA) takes its place, on CPU and on CUDA, to test the route's plumbing and its start-up check.


def fake_flash_attn(*, q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k,
                    softmax_scale, causal, block_table, softcap=0.0, fa_version=None, **unused):
    assert causal and not unused and q.dtype in (torch.float16, torch.bfloat16)
    assert k.stride(-1) == 1 and v.stride(-1) == 1
    P, HK, D = k.shape[1:]
    G = q.shape[1] // HK
    qsl, lens = cu_seqlens_q.tolist(), seqused_k.tolist()
    assert max_seqlen_q >= max(b - a for a, b in zip(qsl, qsl[1:])) and max_seqlen_k >= max(lens)
    for r, L in enumerate(lens):
        n = qsl[r + 1] - qsl[r]
        pages = block_table[r, : -(-L // P)].long()
        kr = k[pages].reshape(-1, HK, D)[:L].float().repeat_interleave(G, 1)
        vr = v[pages].reshape(-1, HK, D)[:L].float().repeat_interleave(G, 1)
        s = torch.einsum("thd,lhd->thl", q[qsl[r]: qsl[r + 1]].float(), kr) * softmax_scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        pos = torch.arange(L - n, L, device=q.device)
        s = s.masked_fill(torch.arange(L, device=q.device)[None, None, :] > pos[:, None, None], float("-inf"))
        out[qsl[r]: qsl[r + 1]] = torch.einsum("thl,lhd->thd", torch.softmax(s, -1), vr).to(out.dtype)


@pytest.fixture
def flash(monkeypatch, tmp_path):
    """The stand-in installed as vLLM's FlashAttention; vLLM's CPU route off; stats on."""
    from moba_backend.integrations.vllm import backend

    stats = tmp_path / "stats.jsonl"
    monkeypatch.setenv(STATS_ENV, str(stats))
    monkeypatch.setenv(CPU_DENSE_ENV, "0")

    def install(fn=fake_flash_attn):
        monkeypatch.setattr(backend, "_flash", backend.VllmFlash(fn, version=3))
        return backend._flash
    return install, stats


FLASH_DEVICES = ["cpu", pytest.param("cuda", marks=requires_gpu)]


@pytest.mark.parametrize("device", FLASH_DEVICES)
@pytest.mark.parametrize("name,shape,B,extra", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_dense_steps_run_vllm_flash_attention(name, shape, B, extra, device, flash):
    install, stats = flash
    install()
    lengths, step1, step2 = two_steps(B)
    h = Harness(shape, dense_cfg(B), lengths, seed=5, dtype=torch.bfloat16, device=device)
    for i, work in enumerate((step1, step2)):
        out = h.step_plugin(work)
        assert h.last_metadata.flash is not None
        assert_close(out, h.dense_reference(work), 2e-2, f"{name} routed vs dense, step {i + 1}")
    assert routes(stats) == ["vllm_flash", "vllm_flash"]


@pytest.mark.parametrize("device", FLASH_DEVICES)
def test_flash_route_dense_layer_and_the_summaries_it_pools(device, flash):
    """A `moba_dense_layers` layer runs on the route in sparse steps; a routed all-dense step
    still pools the blocks it completes, which the next (sparse) step selects by."""
    install, stats = flash
    install()
    shape, B = Shape(9, 3, 64, 16), 16
    lengths, step1, step2 = two_steps(B)
    h = Harness(shape, sparse_cfg(B, moba_dense_layers=[3]), lengths, seed=6, dtype=torch.bfloat16,
                device=device)
    for i, work in enumerate((step1, step2)):
        assert_close(h.step_plugin(work), h.dense_reference(work), 2e-2, f"dense layer, step {i + 1}")
    assert routes(stats) == ["vllm_flash", "vllm_flash"]
    stats.unlink()
    h = Harness(shape, sparse_cfg(B, moba_use_encoder_seq_limit=1 << 20), lengths, seed=7,
                dtype=torch.bfloat16, device=device)
    for i, work in enumerate((step1, step2)):
        assert_close(h.step_plugin(work), h.step_reference(work), 2e-2, f"pooled by a routed step, step {i + 1}")
    rows = [json.loads(x) for x in stats.read_text().splitlines()]
    assert [r["route"] for r in rows] == ["vllm_flash", "moba"]
    assert rows[1]["decode_selected"] < rows[1]["decode_visible"]


@pytest.mark.parametrize("broken", ["wrong", "raises"])
def test_flash_route_off_when_its_check_fails(broken, flash, caplog):
    """A kernel that disagrees with plain attention, or raises, is never used: MoBA's path runs
    the dense steps, and the reason is logged once."""
    install, stats = flash

    def wrong(**kw):
        fake_flash_attn(**kw)
        kw["out"].mul_(1.5)

    def raises(**kw):
        raise RuntimeError("no kernel image is available")
    route = install(wrong if broken == "wrong" else raises)
    lengths, step1, step2 = two_steps(16)
    h = Harness(Shape(9, 3, 64, 16), dense_cfg(16), lengths, seed=5, dtype=torch.bfloat16)
    with caplog.at_level("WARNING"):
        for i, work in enumerate((step1, step2)):
            assert_close(h.step_plugin(work), h.dense_reference(work), 2e-2, f"step {i + 1}")
    assert routes(stats) == ["moba", "moba"]
    warned = [r for r in caplog.records if "FlashAttention" in r.getMessage()]
    assert len(warned) == 1 and ("relative error" in warned[0].getMessage()) == (broken == "wrong")
    assert list(route._ok.values()) == [False]


def test_flash_route_float32_and_switch(flash, monkeypatch):
    """float32 (no vLLM FlashAttention kernel) stays on MoBA's path; without vLLM's kernel on a
    CUDA platform (CPU here, or $MOBA_VLLM_FLASH_ATTN=0) the builder plans no route at all."""
    from moba_backend.integrations.vllm import backend

    install, stats = flash
    install()
    lengths, step1, _ = two_steps(16)
    h = Harness(Shape(9, 3, 64, 16), dense_cfg(16), lengths, seed=5, dtype=torch.float32)
    assert_close(h.step_plugin(step1), h.dense_reference(step1), 1e-4, "float32")
    assert routes(stats) == ["moba"]
    monkeypatch.setattr(backend, "_flash", backend.VllmFlash())
    assert not backend._flash.available("cpu")
    monkeypatch.setenv(backend.FLASH_ENV, "0")
    monkeypatch.setattr(backend, "_flash", backend.VllmFlash())
    assert not backend._flash.available("cuda")


@requires_gpu
def test_flash_route_leaves_graph_decode_steps_alone(flash):
    """Decode steps planned for CUDA graphs (static plans) never take the route, even in a dense
    layer: vLLM captures them."""
    install, stats = flash
    install()
    shape, B = Shape(8, 2, 128, 32), 16
    lengths = [9 * B + 3, 5 * B]
    h = Harness(shape, sparse_cfg(B, moba_dense_layers=[3]), [L + 1 for L in lengths], seed=2,
                dtype=torch.bfloat16, device="cuda")
    h.step_plugin([Work(r, 0, L, L) for r, L in enumerate(lengths)])
    work = [Work(r, L, L + 1, L) for r, L in enumerate(lengths)]
    out = h.step_plugin(work, pad=1, pad_reqs=1)
    assert h.last_metadata.plan.static and h.last_metadata.flash is None
    assert_close(out, h.dense_reference(work), 2e-2, "graph decode step of a dense layer")
    assert routes(stats) == ["vllm_flash", "moba"]
