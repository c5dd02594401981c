"""Sparse paged decode (split-K + merge) against the torch reference, fixed selections."""

import pytest
import torch

from moba_backend.ops.prefill.naive import sparse_attention
from tests.helpers import (HAS_CUDA, assert_close, kernel_device, make_batch, moba_cfg,
                           random_selection, requires_triton)

CASES = {
    "batch_of_lengths_g4_p16": ([(17, 1, True), (300, 1, True), (96, 1, True), (1, 1, True)], 8, 2, 64, 16, 16),
    "g8_p128_d128": ([(700, 1, True), (129, 1, True)], 8, 1, 128, 128, 32),
    "g1_p32": ([(250, 1, True)], 2, 2, 64, 32, 16),
    "g3_p64": ([(333, 1, True), (64, 1, True)], 9, 3, 64, 64, 64),
}
GPU_CASES = {
    "gpu_long_batch": ([(32767, 1, True), (5000, 1, True), (129, 1, True)] * 3, 32, 8, 128, 16, 128),
}


def run_case(reqs, H, HK, D, P, B, dtype, dev, splits=None, tol=1e-4):
    from moba_backend.ops.decode.triton_impl import sparse_decode_fwd

    b = make_batch(reqs, H=H, HK=HK, D=D, P=P, dtype=dtype)
    b.write_new_kv()
    plan = b.plan(moba_cfg(moba_block_size=B, moba_tile_select="token"), device=dev)
    mask, sel = random_selection(plan, H, HK, density=0.3)
    ref = sparse_attention(b.q.double(), b.k_cache.double(), b.v_cache.double(), b.block_table,
                           plan.token_req.cpu(), plan.token_pos.cpu(), mask.cpu(), B, D ** -0.5)
    out = torch.full_like(b.q, float("nan")).to(dev)
    sparse_decode_fwd(b.q.to(dev), b.k_cache.to(dev), b.v_cache.to(dev), b.block_table.to(dev),
                      plan.decode, sel, out, block_size=B, scale=D ** -0.5, num_splits=splits)
    assert_close(out.cpu(), ref, tol, f"decode splits={splits}")


@requires_triton
@pytest.mark.parametrize("splits", [1, 3, None], ids=["nosplit", "split3", "auto"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_decode_kernel_fixed_selection(case, splits):
    run_case(*CASES[case], dtype=torch.float32, dev=kernel_device(), splits=splits)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CASES) + list(GPU_CASES), ids=list(CASES) + list(GPU_CASES))
def test_decode_kernel_gpu(case, dtype):
    run_case(*{**CASES, **GPU_CASES}[case], dtype=dtype, dev="cuda", tol=1e-2)


@requires_triton
def test_merge_kernel_matches_torch_merge():
    """The fused split merge equals `merge_splits`, empty splits (lse -inf) included, and writes
    only the named rows."""
    from moba_backend.ops.decode.triton_impl import merge_splits, merge_splits_fwd

    dev = kernel_device()
    NT, H, S, D = 5, 6, 3, 80
    o_part = torch.randn(NT, H, S, D, device=dev)
    lse = torch.randn(NT, H, S, device=dev) * 4
    lse[0, :, 1] = float("-inf")
    lse[2, 3, :] = float("-inf")        # every split empty: zeros, as the torch merge gives
    rows = torch.tensor([7, 1, 4, 0, 9], dtype=torch.int32, device=dev)
    out = torch.full((10, H, D), float("nan"), device=dev)
    merge_splits_fwd(o_part, lse, rows, out)
    ref = merge_splits(o_part, lse)
    assert_close(out[rows.long()].cpu(), ref.cpu(), 1e-5, "merge")
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[rows.long().cpu()] = False
    assert out.cpu()[untouched].isnan().all()
