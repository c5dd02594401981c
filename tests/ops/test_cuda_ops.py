"""The CUDA kernels (csrc/) against the torch references, on the cases of the Triton tests.

Fixed selections in (tile lists only: `shared`/`union` semantics, where every member of a tile
attends the tile's list, causally); bf16 and fp16; fresh random data each run.
"""

import pytest
import torch

from benchmarks.compare_impls import vllm_pages
from moba_backend.ops.common import slots_per_page, summary_slots
from moba_backend.ops.pooling import naive as pooling_naive
from moba_backend.ops.prefill.naive import sparse_attention
from moba_backend.ops.select.fast import Selection
from tests.helpers import HAS_CUDA, assert_close, make_batch, moba_cfg, random_selection
from tests.ops import test_decode, test_pooling, test_prefill


def _cuda_ready() -> bool:
    if not HAS_CUDA:
        return False
    from moba_backend.ops import cuda_ext
    return cuda_ext.available()


pytestmark = pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and the CUDA extension")
DTYPES = [torch.bfloat16, torch.float16]


def tile_selection(plan, H: int, HK: int, density: float):
    """A random selection as tile lists only, and the [T, H, NBV] mask it means per token."""
    _, sel = random_selection(plan, H, HK, density=density)
    lists, counts = sel.tile_blocks.cpu(), sel.tile_nblocks.cpu()
    nbv = max(plan.num_visible_blocks, 1)
    NT, _, LW = lists.shape
    valid = torch.arange(LW)[None, None, :] < counts[..., None]
    tile_mask = torch.zeros(NT, HK, nbv + 1, dtype=torch.bool)
    tile_mask.scatter_(2, torch.where(valid, lists.long(), nbv), True)
    mask = tile_mask[plan.token_tile.cpu(), :, :nbv].repeat_interleave(H // HK, dim=1)
    return mask, Selection(sel.tile_blocks, sel.tile_nblocks, None)


def on_hopper() -> bool:
    return torch.cuda.get_device_capability() == (9, 0)


def attention_case(reqs, H, HK, D, P, B, dtype, kind, splits=None, softcap=0.0, window=-1, layout="dense"):
    from moba_backend.ops.decode.cuda_impl import sparse_decode_fwd
    from moba_backend.ops.prefill.cuda_impl import sparse_prefill_fwd

    b = make_batch(reqs, H=H, HK=HK, D=D, P=P, dtype=dtype)
    b.write_new_kv()
    plan = b.plan(moba_cfg(moba_block_size=B, moba_tile_select="shared"), device="cuda")
    mask, sel = tile_selection(plan, H, HK, density=0.4 if kind == "prefill" else 0.3)
    ref = sparse_attention(b.q.double(), b.k_cache.double(), b.v_cache.double(), b.block_table,
                           plan.token_req.cpu(), plan.token_pos.cpu(), mask, B, D ** -0.5, softcap, window)
    dev = lambda x: x.to("cuda")  # noqa: E731
    out = torch.full_like(b.q, float("nan")).cuda()           # poisoned: every row must be written
    k_cache, v_cache = dev(b.k_cache), dev(b.v_cache)
    if layout == "vllm":
        k_cache, v_cache = vllm_pages(k_cache, v_cache)
    args = (dev(b.q), k_cache, v_cache, dev(b.block_table))
    common = dict(block_size=B, scale=D ** -0.5, softcap=softcap, window=window)
    if kind in ("prefill", "both"):
        sparse_prefill_fwd(*args, plan.prefill, sel, out, tokens_per_tile=plan.tokens_per_tile, **common)
    if kind in ("decode", "both"):
        sparse_decode_fwd(*args, plan.decode, sel, out, num_splits=splits, **common)
    torch.cuda.synchronize()
    assert_close(out.cpu(), ref, 1e-2, f"cuda {kind} {dtype}")


PREFILL = {**test_prefill.CASES, **test_prefill.GPU_CASES,
           "d256_g4_p32": ([(40, 300, False), (0, 97, False)], 8, 2, 256, 32, 64)}
DECODE = {**test_decode.CASES, **test_decode.GPU_CASES,
          "d256_g8_p16": ([(900, 1, True), (33, 1, True)], 16, 2, 256, 16, 32)}
MIXED = [(300, 1, True), (37, 90, False), (0, 45, False), (1000, 1, True), (200, 33, False)]


# The prefill launcher runs the Hopper kernel (wgmma + TMA, csrc/prefill_sm90.cuh) on SM90 devices
# for head dims 64, 128 and 256 and power-of-two pages, the mma.sync kernel otherwise and wherever
# MOBA_CUDA_WGMMA=0; MOBA_SM90_PERSISTENT=1 gives the Hopper kernel a persistent grid (one CTA an
# SM looping over the work items) instead of one CTA an item: all three are checked.
KERNELS = {"auto": {}, "mma": {"MOBA_CUDA_WGMMA": "0"}, "persistent": {"MOBA_SM90_PERSISTENT": "1"}}


@pytest.fixture(params=list(KERNELS), ids=list(KERNELS))
def prefill_kernel(request, monkeypatch):
    for key, value in KERNELS[request.param].items():
        monkeypatch.setenv(key, value)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(PREFILL), ids=list(PREFILL))
def test_cuda_prefill(case, dtype, prefill_kernel):
    attention_case(*PREFILL[case], dtype=dtype, kind="prefill")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["d128_g4_p16_b128", "d128_g8_p32_b16", "d64_g16_p128_b128", "d128_g1_p16_b16"])
def test_cuda_prefill_hopper_shapes(case, dtype, prefill_kernel):
    """Shapes that reach the Hopper kernel's edges: many 64-key stages (more than it holds at
    once) with a partial last one, TMA boxes of 16 and 64 keys (32 in the prefill cases above),
    16 query heads a KV head, chunked prefill at odd offsets."""
    shapes = {
        "d128_g4_p16_b128": ([(333, 1111, False), (0, 129, False)], 16, 4, 128, 16, 128),
        "d128_g8_p32_b16": ([(517, 700, False)], 16, 2, 128, 32, 16),
        "d64_g16_p128_b128": ([(250, 390, False), (0, 17, False)], 32, 2, 64, 128, 128),
        "d128_g1_p16_b16": ([(1, 513, False)], 4, 4, 128, 16, 16),
    }
    attention_case(*shapes[case], dtype=dtype, kind="prefill")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["d128_g4_p16_b128", "d64_g3_p32_b16", "d256_g2_p64_b64"])
def test_cuda_prefill_vllm_page_layout(case, dtype, monkeypatch):
    """vLLM's pages (`[N, HK, P, 2 D]`, padded) through the prefill; on Hopper the Hopper kernel
    must take them (MOBA_CUDA_WGMMA=require makes a fallback to `mma.sync` an error)."""
    shapes = {
        "d128_g4_p16_b128": ([(333, 700, False), (0, 129, False)], 16, 4, 128, 16, 128),
        "d64_g3_p32_b16": ([(100, 333, False), (0, 50, False)], 9, 3, 64, 32, 16),
        "d256_g2_p64_b64": ([(65, 300, False)], 8, 4, 256, 64, 64),
    }
    if on_hopper():
        monkeypatch.setenv("MOBA_CUDA_WGMMA", "require")
    attention_case(*shapes[case], dtype=dtype, kind="prefill", layout="vllm")


def test_cuda_prefill_require_hopper_names_the_reason(monkeypatch):
    """MOBA_CUDA_WGMMA=require: a call the Hopper kernel cannot take (pages of 48) is an error."""
    monkeypatch.setenv("MOBA_CUDA_WGMMA", "require")
    with pytest.raises(RuntimeError, match="MOBA_CUDA_WGMMA=require: the Hopper prefill kernel cannot take"):
        attention_case([(20, 40, False)], 4, 2, 128, 48, 16, torch.bfloat16, "prefill")


@pytest.mark.parametrize("layout", ["dense", "vllm"])
def test_auto_runs_the_hopper_prefill(layout):
    """`moba_impl: auto` hands the prefill (only) to the CUDA kernels where the Hopper kernel takes
    it, and the layer's output equals Triton's."""
    from moba_backend.attention import MobaAttention, auto_cuda_ops

    H, HK, D, P = 32, 8, 128, 16
    b = make_batch(MIXED, H=H, HK=HK, D=D, P=P, dtype=torch.bfloat16, device="cuda")
    cfg = moba_cfg(moba_tile_select="shared")
    plan = b.plan(cfg, device="cuda")
    # fresh caches for each layer (a clone of vLLM's padded views would not keep their strides)
    fresh = lambda: ((b.k_cache.clone(), b.v_cache.clone()) if layout == "dense"  # noqa: E731
                     else vllm_pages(b.k_cache, b.v_cache))
    k_cache, v_cache = fresh()
    assert auto_cuda_ops(b.q, k_cache, v_cache) == (frozenset({"prefill"}) if on_hopper() else frozenset())
    assert auto_cuda_ops(b.q.float(), k_cache.float(), v_cache.float()) == frozenset()
    q256, kc256 = torch.empty(4, 8, 256, device="cuda", dtype=torch.bfloat16), torch.empty(
        3, 16, 2, 256, device="cuda", dtype=torch.bfloat16)
    assert auto_cuda_ops(q256, kc256, kc256) == frozenset()  # Triton is the faster at head dim 256
    outs = {}
    for impl in ("triton", "auto"):
        attn = MobaAttention(cfg, H, HK, D, impl=impl)
        summ = torch.zeros(attn.summary_shape(b.k_cache.shape[0], P), device="cuda")
        outs[impl] = attn.forward(b.q, b.k, b.v, *fresh(), summ, plan)
    assert_close(outs["auto"].float(), outs["triton"].float(), 1e-2, f"auto layer {layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_prefill_softcap_and_window(dtype, D, prefill_kernel):
    attention_case([(21, 100, False)], 4, 2, D, 16, 16, dtype, "prefill", softcap=5.0, window=40)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 3, None], ids=["nosplit", "split3", "auto"])
@pytest.mark.parametrize("case", list(DECODE), ids=list(DECODE))
def test_cuda_decode(case, splits, dtype):
    attention_case(*DECODE[case], dtype=dtype, kind="decode", splits=splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_decode_softcap_and_window(dtype):
    attention_case([(300, 1, True), (77, 1, True)], 8, 2, 128, 16, 16, dtype, "decode", splits=4,
                   softcap=5.0, window=100)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_mixed_batch(dtype):
    """Prefills, chunked prefills and decodes in one step: both kernels write their rows."""
    attention_case(MIXED, 32, 8, 128, 16, 16, dtype, "both")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("gate", ["mean", "max", "minmax", "learned"])
@pytest.mark.parametrize("case", list(test_pooling.CASES), ids=list(test_pooling.CASES))
def test_cuda_pooling(case, gate, dtype):
    from moba_backend.ops.pooling.cuda_impl import update_block_summaries_fwd

    B, P, reqs = test_pooling.CASES[case]
    b = make_batch(reqs, H=4, HK=2, D=128, P=P, dtype=dtype)
    b.write_new_kv()
    weight = torch.randn(2, B, 128) if gate == "learned" else None
    sc = torch.randn(b.k_cache.shape[0], slots_per_page(B, P), summary_slots(gate), 2, 128)
    ref = sc.clone()
    ctx = b.seq_lens - (b.query_start_loc[1:] - b.query_start_loc[:-1])
    pooling_naive.update_block_summaries(b.k_cache.float(), ref, b.block_table, ctx, b.seq_lens, B, gate, weight)
    plan = b.plan(moba_cfg(moba_block_size=B, moba_gate=gate), device="cuda")
    out = sc.cuda()
    update_block_summaries_fwd(b.k_cache.cuda(), out, plan, gate, weight.cuda() if weight is not None else None)
    assert_close(out.cpu(), ref, 1e-5, f"cuda pool {gate} {case}")


def test_cuda_path_refuses_what_it_does_not_take():
    """Shapes outside the kernels (head dim 96, float32) stay on Triton under `auto`."""
    from moba_backend.ops import cuda_ext

    q = torch.empty(4, 8, 96, device="cuda", dtype=torch.bfloat16)
    assert not cuda_ext.supports_attention(q, torch.empty(3, 16, 2, 96, device="cuda", dtype=torch.bfloat16))
    q = torch.empty(4, 8, 128, device="cuda", dtype=torch.float32)
    assert not cuda_ext.supports_attention(q, torch.empty(3, 16, 2, 128, device="cuda", dtype=torch.float32))


@pytest.mark.parametrize("mode", ["shared", "union"])
def test_cuda_layer_matches_triton(mode):
    """MobaAttention end to end (pooling, selection, attention) on a mixed batch: cuda == triton."""
    from moba_backend.attention import MobaAttention

    H, HK, D, P = 32, 8, 128, 16
    b = make_batch(MIXED, H=H, HK=HK, D=D, P=P, dtype=torch.bfloat16, device="cuda")
    cfg = moba_cfg(moba_tile_select=mode)
    plan = b.plan(cfg, device="cuda")
    outs = {}
    for impl in ("triton", "cuda"):
        attn = MobaAttention(cfg, H, HK, D, impl=impl)
        summ = torch.zeros(attn.summary_shape(b.k_cache.shape[0], P), device="cuda")
        outs[impl] = attn.forward(b.q, b.k, b.v, b.k_cache.clone(), b.v_cache.clone(), summ, plan)
    assert_close(outs["cuda"].float(), outs["triton"].float(), 1e-2, f"layer {mode}")


@pytest.mark.parametrize("bad, message", [
    (dict(D=96), "head dim must be 64, 128 or 256, got 96"),
    (dict(P=8), "page size must be a multiple of 16, got 8"),
    (dict(block_size=48), "block_size must be a power of two >= 16, got 48"),
    (dict(v_pages=5), "v_cache shape [5, 16, 2, 128] != k_cache shape [4, 16, 2, 128]"),
], ids=["head_dim_96", "page_8", "block_48", "v_shape"])
def test_cuda_launchers_raise_clear_errors(bad, message):
    """A bad input to the decode launcher raises with the value named (it once crashed the
    process: messages with numbers went through c10::str; see csrc/checks.h)."""
    from moba_backend.ops import cuda_ext

    D, P, T, H, HK = bad.get("D", 128), bad.get("P", 16), 2, 8, 2
    dev, i32 = "cuda", dict(dtype=torch.int32, device="cuda")
    q = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(4, P, HK, D, device=dev, dtype=torch.bfloat16)
    vc = torch.randn(bad.get("v_pages", 4), P, HK, D, device=dev, dtype=torch.bfloat16)
    blocks = torch.zeros(T, HK, 1, **i32)
    with pytest.raises(RuntimeError) as e:
        cuda_ext.ops().decode(q, kc, vc, torch.empty_like(q), torch.zeros(T, 4, **i32), torch.arange(T, **i32),
                              torch.arange(T, **i32), torch.ones(T, **i32), torch.zeros(T, **i32),
                              torch.arange(T, device=dev), blocks, torch.ones(T, HK, **i32),
                              bad.get("block_size", 32), 1, 0.1, 0.0, -1)
    assert message in str(e.value)
