"""One vLLM engine run for the integration tests: `python -m tests.integrations.llm_job '<json>'`.

Job keys: model, prompts (strings) or prompt_token_ids, max_tokens, max_model_len,
max_num_batched_tokens, max_num_seqs, enable_prefix_caching, one_by_one (one generate call per
prompt, in order, so a later prompt can hit the prefix cache of an earlier one),
additional_config, out (result JSON path)."""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    job = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, seed=0,
              max_model_len=job.get("max_model_len", 2048),
              max_num_batched_tokens=job.get("max_num_batched_tokens"),
              max_num_seqs=job.get("max_num_seqs", 8),
              enable_prefix_caching=job.get("enable_prefix_caching", False),
              gpu_memory_utilization=job.get("gpu_memory_utilization", 0.3),
              additional_config=job.get("additional_config") or {})
    t1 = time.time()
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    if "prompt_token_ids" in job:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompt_token_ids"]]
    else:
        prompts = job["prompts"]
    if job.get("one_by_one"):
        outs = [o for p in prompts for o in llm.generate([p], params, use_tqdm=False)]
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    t2 = time.time()
    res = {"token_ids": [list(o.outputs[0].token_ids) for o in outs],
           "texts": [o.outputs[0].text for o in outs],
           "prompt_lens": [len(o.prompt_token_ids) for o in outs],
           "cached_tokens": [o.num_cached_tokens or 0 for o in outs],
           "startup_s": t1 - t0, "generate_s": t2 - t1}
    with open(job["out"], "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
