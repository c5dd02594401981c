"""Block summaries: the Triton kernel against the torch reference, on fresh random caches."""

import pytest
import torch

from moba_backend.ops.common import slots_per_page, summary_slots
from moba_backend.ops.pooling import naive
from tests.helpers import assert_close, kernel_device, make_batch, moba_cfg, requires_triton

CASES = {
    "b16_p16_mixed": (16, 16, [(130, 1, True), (37, 90, False), (0, 77, False)]),
    "b32_p16_chunk_mid_block": (32, 16, [(45, 83, False), (95, 1, True)]),
    "b16_p64_many_blocks_per_page": (16, 64, [(0, 150, False), (63, 1, True)]),
    "b64_p128": (64, 128, [(10, 300, False)]),
    "b128_p32": (128, 32, [(100, 200, False), (255, 1, True)]),
}


def _reference_summaries(batch, B, gate, weight):
    P = batch.k_cache.shape[1]
    sc = torch.randn(batch.k_cache.shape[0], slots_per_page(B, P), summary_slots(gate),
                     batch.k_cache.shape[2], batch.k_cache.shape[3])
    ctx = batch.seq_lens - (batch.query_start_loc[1:] - batch.query_start_loc[:-1])
    ref = sc.clone()
    naive.update_block_summaries(batch.k_cache, ref, batch.block_table, ctx, batch.seq_lens, B, gate, weight)
    return sc, ref


def test_reference_pools_the_right_keys():
    """mean/max of a block written through a permuted table equal a direct computation."""
    b = make_batch([(0, 64, False)], H=2, HK=1, D=8, P=16)
    b.write_new_kv()
    sc, ref = _reference_summaries(b, 32, "max", None)
    page, slot = naive.summary_location(b.block_table[0], 1, 32, 16)
    assert torch.equal(ref[page, slot, 0], b.k[32:64].amax(0))
    sc, ref = _reference_summaries(b, 32, "mean", None)
    page, slot = naive.summary_location(b.block_table[0], 0, 32, 16)
    assert torch.allclose(ref[page, slot, 0], b.k[:32].mean(0), atol=1e-6)


@requires_triton
@pytest.mark.parametrize("gate", ["mean", "max", "minmax", "learned"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_pooling_kernel_matches_reference(case, gate):
    from moba_backend.ops.pooling.triton_impl import update_block_summaries_fwd

    B, P, reqs = CASES[case]
    b = make_batch(reqs, H=4, HK=2, D=64, P=P)
    b.write_new_kv()
    weight = torch.randn(2, B, 64) if gate == "learned" else None
    sc, ref = _reference_summaries(b, B, gate, weight)
    dev = kernel_device()
    plan = b.plan(moba_cfg(moba_block_size=B, moba_gate=gate), device=dev)
    out = sc.to(dev)
    update_block_summaries_fwd(b.k_cache.to(dev), out, plan, gate,
                               weight.to(dev) if weight is not None else None)
    assert_close(out.cpu(), ref, 1e-5, f"pool {gate} {case}")
