"""Plain vLLM (no MoBA) on the embedded model, one dtype per process: the time of one greedy
request over a ~6.5K-token prompt. What `moba-serve`'s CPU dtype default rests on.

    python benchmarks/bench_cpu_dtype.py float32
    python benchmarks/bench_cpu_dtype.py bfloat16
"""

from __future__ import annotations

import sys
import time


def main() -> None:
    dtype = sys.argv[1]
    from vllm import LLM, SamplingParams

    from moba_backend.models import embedded_model_dir

    llm = LLM(model=str(embedded_model_dir()), dtype=dtype, enforce_eager=True, seed=0, max_model_len=8192,
              max_num_seqs=4, enable_prefix_caching=False)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    prompt = " ".join(words[i % len(words)] + str(i % 97) for i in range(2200))
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    llm.generate([prompt[:200]], params, use_tqdm=False)          # warm-up
    t0 = time.time()
    out = llm.generate([prompt], params, use_tqdm=False)
    print(f"{dtype}: {len(out[0].prompt_token_ids)} prompt tokens + 32 generated: {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
