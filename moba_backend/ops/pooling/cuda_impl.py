"""Block summaries, CUDA kernel (`csrc/pooling.cuh`): same contract as `triton_impl.py`."""

from __future__ import annotations

import torch

from moba_backend.ops import cuda_ext
from moba_backend.ops.pooling.triton_impl import GATE_IDS, check_pool_inputs


def update_block_summaries_fwd(k_cache: torch.Tensor, summary_cache: torch.Tensor, plan, gate: str,
                               weight: torch.Tensor | None = None) -> None:
    """Write the summaries of the blocks completed in this step (the plan's pooling work).

    k_cache: [N, P, HK, D]; summary_cache: [N, SLOTS, S, HK, D]; weight: [HK, B, D] (learned).
    """
    check_pool_inputs(k_cache, summary_cache, plan, gate, weight)
    B = plan.block_size
    if gate == "learned":
        weight = weight.float().contiguous()
    else:
        weight = None
    if plan.pool_req.numel() == 0:
        return
    cuda_ext.ops().pool(k_cache, summary_cache, weight, plan.block_table, plan.pool_req, plan.pool_blk,
                        B, GATE_IDS[gate])
