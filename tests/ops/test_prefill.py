"""Sparse paged prefill kernel against the torch reference, with fixed (random) selections."""

import pytest
import torch

from moba_backend.ops.prefill.naive import sparse_attention
from moba_backend.ops.prefill.torch_impl import sparse_attention_plan
from moba_backend.ops.select.fast import Selection, selection_mask
from tests.helpers import (HAS_CUDA, assert_close, kernel_device, make_batch, moba_cfg,
                           random_selection, requires_triton)

# id: (requests (context, new tokens, decode?), H, HK, D, page, moba block)
CASES = {
    "odd_len_g4_p16_d64": ([(0, 77, False)], 8, 2, 64, 16, 16),
    "mixed_chunked_g4_p32": ([(37, 90, False), (0, 45, False), (200, 33, False)], 8, 2, 64, 32, 16),
    "g1_p64_d128": ([(19, 61, False), (0, 130, False)], 2, 2, 128, 64, 32),
    "g8_p128_block16": ([(130, 70, False)], 8, 1, 64, 128, 16),
    "g3_embedded_shape": ([(5, 150, False)], 9, 3, 64, 16, 32),
    "g4_block_spans_pages": ([(0, 200, False)], 4, 1, 64, 16, 64),
    "block128_two_key_steps": ([(70, 230, False)], 4, 1, 64, 16, 128),
}
GPU_CASES = {
    "gpu_long_g4_d128": ([(1000, 3000, False), (0, 2049, False)], 32, 8, 128, 16, 128),
    "gpu_g8_p64_d64": ([(4097, 1500, False)], 16, 2, 64, 64, 64),
    "gpu_g2_d256_b128": ([(300, 700, False), (0, 130, False)], 8, 4, 256, 16, 128),
}


def run_case(reqs, H, HK, D, P, B, dtype, dev, softcap=0.0, window=-1, tol=1e-4, kernel="tile",
             key_spread=0.0, tiles_only=False):
    """kernel `tile`: the per-tile kernel over the union; `by_block`: the `token` kernel
    organised by KV block (`token_prefill_fwd`); `torch`: the CPU path (`torch_impl`) with the
    members' own lists; `torch_tiles`: the CPU path with tile lists only (`union`, `shared`)."""
    b = make_batch(reqs, H=H, HK=HK, D=D, P=P, dtype=dtype)
    b.write_new_kv()
    if key_spread:  # keys of each page scaled by up to e^key_spread: running maxima jump by far more than 2^8
        b.k_cache.mul_(torch.exp(torch.rand(b.k_cache.shape[0], 1, 1, 1) * key_spread).to(b.k_cache.dtype))
    plan = b.plan(moba_cfg(moba_block_size=B, moba_tile_select="token"), device=dev)
    mask, sel = random_selection(plan, H, HK, density=0.4)
    if kernel == "torch_tiles" or tiles_only:   # no member masks: `union` / `shared` lists
        sel = Selection(sel.tile_blocks, sel.tile_nblocks, None)
        mask = selection_mask(sel, plan, H)
    ref = sparse_attention(b.q.double(), b.k_cache.double(), b.v_cache.double(), b.block_table,
                           plan.token_req.cpu(), plan.token_pos.cpu(), mask.cpu(), B, D ** -0.5, softcap, window)
    out = torch.full_like(b.q, float("nan")).to(dev)           # poisoned: every row must be written
    args = (b.q.to(dev), b.k_cache.to(dev), b.v_cache.to(dev), b.block_table.to(dev))
    common = dict(block_size=B, scale=D ** -0.5, softcap=softcap, window=window)
    if kernel in ("torch", "torch_tiles"):
        sparse_attention_plan(*args[:3], plan, sel, out, **common)
    elif kernel == "tile":
        from moba_backend.ops.prefill.triton_impl import sparse_prefill_fwd

        sparse_prefill_fwd(*args, plan.prefill, sel, out, tokens_per_tile=plan.tokens_per_tile,
                           block_m=plan.block_m, **common)
    else:
        from moba_backend.ops.prefill.triton_impl import token_prefill_fwd

        token_prefill_fwd(*args, plan.token_pos, plan.prefill, sel, out,
                          num_visible_blocks=plan.num_visible_blocks, **common)
        # a second layer of the same step reuses the spans kept on the plan's tiles
        again = torch.full_like(out, float("nan"))
        token_prefill_fwd(*args, plan.token_pos, plan.prefill, sel, again,
                          num_visible_blocks=plan.num_visible_blocks, **common)
        assert torch.equal(again, out)
    assert_close(out.cpu(), ref, tol, f"prefill[{kernel}]")


KERNELS = ["tile", "by_block"]
TORCH_PATHS = ["torch", "torch_tiles"]
MIXED_WITH_DECODES = ([(37, 90, False), (300, 1, True), (0, 45, False), (64, 1, True)], 8, 2, 64, 32, 16)


@pytest.mark.parametrize("kernel", TORCH_PATHS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_cpu_path_fixed_selection(case, kernel):
    run_case(*CASES[case], dtype=torch.float32, dev="cpu", kernel=kernel)


@pytest.mark.parametrize("kernel", TORCH_PATHS)
def test_cpu_path_mixed_decodes_softcap_window_bf16(kernel):
    run_case(*MIXED_WITH_DECODES, dtype=torch.float32, dev="cpu", kernel=kernel)
    run_case([(21, 100, False), (50, 1, True)], 4, 2, 64, 16, 16, torch.float32, "cpu", softcap=5.0,
             window=40, kernel=kernel)
    run_case(*CASES["g3_embedded_shape"], dtype=torch.bfloat16, dev="cpu", tol=1e-2, kernel=kernel)
    # head dim 80, group 5, pages of 48 (not a multiple of the block of 32, nor of it a divisor)
    run_case([(37, 90, False), (100, 1, True), (0, 61, False)], 10, 2, 80, 48, 32, torch.float32, "cpu",
             kernel=kernel)


def test_cpu_path_batches_within_budget(monkeypatch):
    """Tiles cut into many batches by the work budget give the same result."""
    from moba_backend.ops.prefill import torch_impl

    monkeypatch.setattr(torch_impl, "WORK_BUDGET_BYTES", 1)
    run_case(*CASES["mixed_chunked_g4_p32"], dtype=torch.float32, dev="cpu", kernel="torch")


@requires_triton
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_prefill_kernel_fixed_selection(case, kernel):
    run_case(*CASES[case], dtype=torch.float32, dev=kernel_device(), kernel=kernel)


@requires_triton
@pytest.mark.parametrize("kernel", KERNELS)
def test_prefill_kernel_softcap_and_window(kernel):
    run_case([(21, 100, False)], 4, 2, 64, 16, 16, torch.float32, kernel_device(), softcap=5.0, window=40,
             kernel=kernel)


@requires_triton
@pytest.mark.parametrize("dtype,spread,tol", [(torch.float32, 4.0, 1e-4), (torch.float16, 1.5, 1e-2)],
                         ids=["fp32_spread4", "fp16_spread1.5"])
@pytest.mark.parametrize("tiles_only", [True, False], ids=["tile_lists", "member_lists_masked_steps"])
def test_prefill_kernel_scores_that_jump(tiles_only, dtype, spread, tol):
    """Keys whose scale varies from page to page (up to e^spread): rows' maxima jump past 2^8
    between steps. Tile lists (`union` / `shared`) run the unmasked steps' lazy running max (moved,
    with the accumulator rescaled, only when a row's max grows by more than 2^8; p up to 2^8 in
    the 16-bit P @ V product); member lists (`token`) run the masked steps, which rescale every
    step. Both equal the float64 reference."""
    run_case([(300, 200, False), (0, 150, False)], 8, 2, 64, 16, 16, dtype=dtype,
             dev=kernel_device(), kernel="tile", key_spread=spread, tiles_only=tiles_only, tol=tol)


@requires_triton
@pytest.mark.parametrize("budget", [100_000, 3_000_000], ids=["budget_cut_spans", "spans_share_a_pass"])
def test_by_block_kernel_many_spans_and_passes(monkeypatch, budget):
    """Spans cut inside requests (by SPAN_TOKENS, or shorter where a span's partials would pass
    the budget), one or several to a pass, give the same result."""
    from moba_backend.ops.prefill import triton_impl

    monkeypatch.setattr(triton_impl, "SPAN_TOKENS", 24)
    monkeypatch.setattr(triton_impl, "PARTIAL_BUDGET_BYTES", budget)
    run_case(*CASES["mixed_chunked_g4_p32"], dtype=torch.float32, dev=kernel_device(), kernel="by_block")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(CASES) + list(GPU_CASES), ids=list(CASES) + list(GPU_CASES))
def test_prefill_kernel_gpu(case, dtype, kernel):
    spec = {**CASES, **GPU_CASES}[case]
    run_case(*spec, dtype=dtype, dev="cuda", tol=1e-2 if dtype != torch.float32 else 1e-4, kernel=kernel)


@requires_triton
def test_launch_rejects_unknown_prefetch():
    from moba_backend.ops.prefill.triton_impl import sparse_attn_launch

    dev = kernel_device()
    b = make_batch([(0, 40, False)], H=4, HK=2, D=64, P=16, dtype=torch.float32)
    plan = b.plan(moba_cfg(moba_block_size=16), device=dev)
    _, sel = random_selection(plan, 4, 2)
    out = torch.empty_like(b.q).to(dev)
    with pytest.raises(ValueError, match="prefetch=2"):
        sparse_attn_launch(b.q.to(dev), b.k_cache.to(dev), b.v_cache.to(dev), b.block_table.to(dev), plan.prefill,
                           sel, out, None, block_size=16, scale=0.125, softcap=0.0, window=-1,
                           block_m=plan.block_m, num_splits=1, prefetch=2)
