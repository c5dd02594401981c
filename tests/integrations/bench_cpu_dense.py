"""One layer of the vLLM plugin on CPU, dense: MoBA's torch path against vLLM's CPU attention (the
route dense steps take), through the same builder + impl the engine calls. SmolLM2-135M shapes
(9 query heads, 3 KV heads, head dim 64), page 128, float32; median of `--repeat` runs.

    python -m tests.integrations.bench_cpu_dense --context 3072 --decode-batch 1 4 16
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from moba_backend.integrations.vllm import backend
from tests.integrations.vllm_steps import Harness, Shape, Work

DENSE = {"moba_use_encoder_seq_limit": 1 << 20, "moba_use_decoder_seq_limit": 1 << 20}


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def time_step(route: bool, lengths: list[int], work: list[Work], repeat: int,
              force: bool = False) -> tuple[float, float, torch.Tensor]:
    """(build ms per step, forward ms per layer, output) with the dense route on or off; `force`
    lifts the plugin's staging caps."""
    os.environ["MOBA_CPU_DENSE_ATTN"] = "1" if route else "0"
    h = Harness(Shape(9, 3, 64, 128), DENSE, lengths, seed=0)
    for r, L in enumerate(lengths):                     # the context is already in the cache
        ctx = [Work(r, 0, L - (w.stop - w.start), L) for w in work if w.req == r]
        if ctx and ctx[0].stop > 0:
            _, q, k, v, slot, *_ = h._inputs(ctx, 0)
            h.impl.do_kv_cache_update(h.layer, k, v, h.kv_cache, slot)
    T, q, k, v, slot, qsl, seq, bt, prefilling = h._inputs(work, 0)
    from vllm.v1.attention.backend import CommonAttentionMetadata

    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=len(work),
        num_actual_tokens=T, max_query_len=int((qsl[1:] - qsl[:-1]).max()),
        max_seq_len=int(seq.max()), block_table_tensor=bt, slot_mapping=slot, is_prefilling=prefilling)
    h.impl.do_kv_cache_update(h.layer, k, v, h.kv_cache, slot)
    caps = backend.STAGING_CAP_BYTES, backend.DECODE_STAGING_CAP_BYTES
    if force:
        backend.STAGING_CAP_BYTES = backend.DECODE_STAGING_CAP_BYTES = 1 << 40
    try:
        md = h.builder.build(0, cm)
    finally:
        backend.STAGING_CAP_BYTES, backend.DECODE_STAGING_CAP_BYTES = caps
    assert (md.cpu_dense is not None) == route
    out = torch.empty(T, 9, 64)
    build_ms = median_ms(lambda: h.builder.build(0, cm), repeat)
    fwd_ms = median_ms(lambda: h.impl.forward(h.layer, q, k, v, h.kv_cache, md, out), repeat)
    return build_ms, fwd_ms, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=3072)
    ap.add_argument("--decode-batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads")
    L = args.context
    rows = [(f"prefill {L}", [L], [Work(0, 0, L, L)])]
    for b in args.decode_batch:
        rows.append((f"decode x{b} at {L}", [L] * b, [Work(r, L - 1, L, L - 1) for r in range(b)]))
    print("| step | staged MB | routed | MoBA torch path ms/layer | vLLM CPU attention ms/layer "
          "(staging included) | speedup | plan ms/step (MoBA / + vLLM metadata) | rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, lengths, work in rows:
        staged = sum(-(-L // 128) for L in lengths) * 3 * 128 * 128 * 4
        cap = backend.DECODE_STAGING_CAP_BYTES if "decode" in name else backend.STAGING_CAP_BYTES
        b0, f0, o0 = time_step(False, lengths, work, args.repeat)
        b1, f1, o1 = time_step(True, lengths, work, args.repeat, force=True)
        diff = ((o1 - o0).norm() / o0.norm()).item()
        print(f"| {name} | {staged / 2**20:.1f} | {'yes' if staged <= cap else 'no'} | {f0:.3f} | "
              f"{f1:.3f} | {f0 / f1:.1f}x | {b0:.2f} / {b1:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
