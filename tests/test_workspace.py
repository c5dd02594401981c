"""The bound of a step's device workspace (`moba_backend/workspace.py`): its shape on CPU (every
mode, monotone, the budgets inside it), real steps under it (on CPU through the Triton
interpreter, allocations counted by torch's profiler; on a GPU, torch.cuda's peak)."""

from __future__ import annotations

import pytest
import torch

from moba_backend import workspace
from moba_backend.attention import MobaAttention
from moba_backend.config import MobaConfig
from moba_backend.ops.prefill import triton_impl as prefill_triton
from moba_backend.ops.select import fast
from moba_backend.ops.select import triton_impl as select_triton
from tests.helpers import INTERPRET, make_batch, moba_cfg, requires_gpu

MODES = ("token", "union", "shared")
MiB = 1 << 20


def bound(cfg: MobaConfig, T: int, L: int, R: int = 8, H: int = 32, HK: int = 8, D: int = 128,
          P: int = 16, dtype=torch.bfloat16, dense: bool = False) -> int:
    return workspace.step_workspace_bytes(cfg, T, L, R, H, HK, D, dtype, P, dense=dense)


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense-layer"])
@pytest.mark.parametrize("gate", ["mean", "minmax"])
@pytest.mark.parametrize("mode", MODES)
def test_bound_grows_with_tokens_and_context(mode, gate, dense):
    cfg = MobaConfig(moba_tile_select=mode, moba_gate=gate)
    tokens = [0, 1, 2, 17, 128, 1000, 4096, 8192, 16384, 65536]
    for L in (4096, 131072, 1 << 20):
        got = [bound(cfg, T, L, R=256, dense=dense) for T in tokens]
        assert got[0] == 0 and got[1] > 0
        assert got == sorted(got), f"{mode} L={L}: {got}"
    for T in (1, 2048, 32768):
        got = [bound(cfg, T, L, R=64, dense=dense) for L in (1, 512, 8192, 65536, 262144, 1 << 20)]
        assert got == sorted(got), f"{mode} T={T}: {got}"


def test_bound_counts_the_budgets(monkeypatch):
    """Long steps reach each budget, read where it is defined: two score chunks (token, union),
    a pass of partials (token), the 16-bit summary copy (shared, 16-bit queries, at least
    COMPACT_MIN_BLOCKS blocks)."""
    long = {"T": 32768, "L": 131072, "R": 8}
    for mode in ("token", "union"):
        cfg = MobaConfig(moba_tile_select=mode)
        assert bound(cfg, **long) >= 2 * fast.SCORE_BUDGET_BYTES
        monkeypatch.setattr(fast, "SCORE_BUDGET_BYTES", 4 * fast.SCORE_BUDGET_BYTES)
        assert bound(cfg, **long) >= 2 * fast.SCORE_BUDGET_BYTES, mode
        monkeypatch.undo()
    token = MobaConfig(moba_tile_select="token")
    assert bound(token, **long) >= prefill_triton.PARTIAL_BUDGET_BYTES
    monkeypatch.setattr(prefill_triton, "PARTIAL_BUDGET_BYTES", 4 * prefill_triton.PARTIAL_BUDGET_BYTES)
    assert bound(token, **long) >= prefill_triton.PARTIAL_BUDGET_BYTES
    monkeypatch.undo()

    # a short step over long contexts, where the copy is the largest piece: 8192 blocks at 128K,
    # 32 requests (512 MiB of summaries: a step of fewer requests copies up to the budget)
    shared = MobaConfig(moba_tile_select="shared", moba_block_size=16)
    short = {"T": 256, "L": 131072, "R": 32}
    b = bound(shared, **short)
    assert b >= select_triton.COMPACT_BUDGET_BYTES
    assert bound(shared, dtype=torch.float32, **short) < b - 64 * MiB, "float32 queries: no copy"
    monkeypatch.setattr(select_triton, "COMPACT_BUDGET_BYTES", 0)
    assert bound(shared, **short) < b - 128 * MiB


def test_layer_method_uses_its_shape():
    cfg = MobaConfig(moba_tile_select="token", moba_dense_layers=[1])
    sparse = MobaAttention(cfg, 32, 8, 128, layer_idx=0, impl="triton")
    dense = MobaAttention(cfg, 32, 8, 128, layer_idx=1, impl="triton")
    assert sparse.workspace_bytes(8192, 65536, 16, 16, torch.bfloat16) == bound(cfg, 8192, 65536, R=16)
    assert dense.workspace_bytes(8192, 65536, 16, 16, torch.bfloat16) == bound(cfg, 8192, 65536, R=16,
                                                                            dense=True)


# --- real steps under the bound -----------------------------------------------------------------

MIXED = [(130, 1, True), (200, 1, True), (37, 90, False), (0, 77, False), (300, 40, False)]
# (id, mode, requests (context, new tokens, decode?), dense layer)
CPU_STEPS = [
    ("token-mixed", "token", MIXED, False),
    ("token-decodes", "token", [(300, 1, True), (450, 1, True), (17, 1, True)], False),
    ("union-mixed", "union", MIXED, False),
    ("union-prefill", "union", [(0, 480, False)], False),
    ("shared-mixed", "shared", MIXED, False),
    ("dense-layer-mixed", "union", MIXED, True),
]


def cpu_peak_bytes(fn) -> int:
    """Peak of the bytes torch allocates on the CPU while `fn` runs (the profiler's memory
    events, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.skipif(not INTERPRET, reason="Triton kernels on the CPU need TRITON_INTERPRET=1")
@pytest.mark.parametrize("name,mode,reqs,dense", CPU_STEPS, ids=[c[0] for c in CPU_STEPS])
def test_cpu_step_allocates_within_the_bound(name, mode, reqs, dense, monkeypatch):
    """The kernels' path on the CPU (Triton interpreter) with small budgets, so that scores come
    in several chunks and partials in several passes; the bound's allocator allowances are set
    to the CPU's (64-byte alignment, no unsplit blocks, no cub buffers) so that it stays close."""
    monkeypatch.setattr(workspace, "ALLOC_ROUND", 64)
    monkeypatch.setattr(workspace, "LARGE_SLACK", 0)
    monkeypatch.setattr(workspace, "CUB_AUX_BYTES", 0)
    monkeypatch.setattr(fast, "SCORE_BUDGET_BYTES", 8 << 10)
    monkeypatch.setattr(prefill_triton, "PARTIAL_BUDGET_BYTES", 64 << 10)
    H, HK, D, P = 8, 2, 64, 16
    cfg = moba_cfg(moba_tile_select=mode, moba_dense_layers=[0] if dense else [])
    layer = MobaAttention(cfg, H, HK, D, impl="triton")
    b = make_batch(reqs, H, HK, D, P, seed=0)
    b.write_new_kv()                                     # vLLM writes K/V before the layer
    sc = torch.randn(layer.summary_shape(b.k_cache.shape[0], P))
    out = torch.empty_like(b.q)
    used = cpu_peak_bytes(lambda: layer.forward(b.q, None, None, b.k_cache, b.v_cache, sc,
                                                b.plan(cfg), out=out))
    want = layer.workspace_bytes(b.q.shape[0], int(b.seq_lens.max()), len(reqs), P, b.q.dtype)
    print(f"{name}: step allocated {used} bytes, bound {want} ({want / used:.2f}x)")
    assert used <= want


# (id, mode, block size, requests, dense layer): H=32, HK=8, D=128, bf16, pages of 16
GPU_STEPS = [
    ("shared-prefill-32k", "shared", 128, [(0, 32768, False)], False),
    ("token-prefill-16k", "token", 128, [(0, 16384, False)], False),
    ("union-prefill-16k", "union", 128, [(0, 16384, False)], False),
    ("shared-b16-compact-32k", "shared", 16, [(0, 32768, False)], False),
    ("union-dense-layer-16k", "union", 128, [(0, 16384, False)], True),
] + [
    (f"{mode}-mixed", mode, 128,
     [(24576, 4096, False), (6000, 2048, False)] + [(20000 + 131 * i, 1, True) for i in range(8)], False)
    for mode in MODES
] + [
    (f"{mode}-decodes", mode, 128, [(16000 + 977 * i, 1, True) for i in range(16)], False)
    for mode in MODES
]


@requires_gpu
@pytest.mark.parametrize("name,mode,B,reqs,dense", GPU_STEPS, ids=[c[0] for c in GPU_STEPS])
def test_gpu_step_allocates_within_the_bound(name, mode, B, reqs, dense):
    """A real step (plan + forward, on the default windows) on the GPU: the rise of
    torch.cuda.max_memory_allocated over the inputs and caches stays under the bound."""
    H, HK, D, P = 32, 8, 128, 16
    cfg = MobaConfig(moba_block_size=B, moba_tile_select=mode, moba_dense_layers=[0] if dense else [])
    layer = MobaAttention(cfg, H, HK, D)
    b = make_batch(reqs, H, HK, D, P, dtype=torch.bfloat16, device="cuda", seed=0)
    b.write_new_kv()
    sc = torch.randn(layer.summary_shape(b.k_cache.shape[0], P), device="cuda")
    out = torch.empty_like(b.q)

    def step():
        layer.forward(b.q, None, None, b.k_cache, b.v_cache, sc, b.plan(cfg, device="cuda"), out=out)

    step()                                                # compile the kernels
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - base
    want = layer.workspace_bytes(b.q.shape[0], int(b.seq_lens.max()), len(reqs), P, torch.bfloat16)
    print(f"{name}: step allocated {used / MiB:.1f} MiB, bound {want / MiB:.1f} MiB "
          f"({want / max(used, 1):.2f}x)")
    assert used <= want
