"""vLLM end to end on CPU with the embedded model (float32, eager), each engine in its own process:
- MoBA with every block selected is token-identical to vLLM's own CPU attention (greedy), over
  mixed chunked-prefill + decode steps, both when its dense steps are handed to vLLM's CPU
  attention (the default on CPU) and when they run on MoBA's torch path;
- MoBA sparse on a long prompt really skips blocks (counted by the plugin's stats hook);
- MoBA sparse under prefix caching: a prompt whose long prefix (whole pages and MoBA blocks) is
  served from the cache gives the greedy output it gives with prefix caching off (the summaries
  of the cached pages are reused, not stale);
- without FD_ATTENTION_BACKEND the installed plugin leaves vLLM's CPU attention in place."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from tests.integrations.procs import child_env, read_stats, run_llm_job  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.\n" * 20,      # 180 tokens: several chunks of 64
    "1, 2, 3, 4,",
    "Question: why is the sky blue?\nAnswer:",
]
DENSE = {"moba_use_encoder_seq_limit": 1 << 20, "moba_use_decoder_seq_limit": 1 << 20}
# 64 MoBA blocks at the default length (4096 tokens, block 64), like an 8K prompt at block 128.
LONG_TOKENS = int(os.environ.get("MOBA_E2E_LONG_TOKENS", "4096"))
SPARSE = {"moba_block_size": 64 if LONG_TOKENS <= 4096 else 128,
          "moba_encoder_top_k_left": 8, "moba_encoder_top_k_right": 16,
          "moba_decoder_top_k_left": 8, "moba_decoder_top_k_right": 16}


def test_dense_moba_is_token_identical_to_cpu_attention(plugin_path, model_dir, tmp_path):
    job = dict(model=model_dir, prompts=PROMPTS, max_tokens=24, max_num_batched_tokens=64,
               max_model_len=1024)
    base = run_llm_job(dict(job, name="cpu_attn"), child_env(plugin_path), tmp_path, 600)
    # without the switch the plugin registered nothing
    assert "MoBA attention backend registered" not in (tmp_path / "cpu_attn.log").read_text()
    for name, route in (("moba_dense", "1"), ("moba_dense_torch", "0")):
        stats = tmp_path / f"{name}.jsonl"
        moba = run_llm_job(dict(job, name=name, additional_config={"moba_attention_config": DENSE}),
                           child_env(plugin_path, FD_ATTENTION_BACKEND="MOBA_ATTN",
                                     MOBA_STATS_FILE=str(stats), MOBA_CPU_DENSE_ATTN=route),
                           tmp_path, 600)
        counts = read_stats(stats)
        print(f"cpu_attn {base['generate_s']:.1f}s, {name} {moba['generate_s']:.1f}s, {counts}")
        assert "MoBA attention backend registered" in (tmp_path / f"{name}.log").read_text()
        assert counts["calls"] > 0, "MoBA did not run"
        # every step is dense: all on vLLM's CPU attention, or all on MoBA's path when switched off
        assert counts["calls_vllm_cpu" if route == "1" else "calls_moba"] == counts["calls"]
        assert counts["prefill_selected"] == counts["prefill_visible"]
        assert counts["decode_selected"] == counts["decode_visible"]
        assert moba["token_ids"] == base["token_ids"], name


def test_sparse_moba_skips_blocks_on_a_long_prompt(plugin_path, model_dir, haystack_ids, tmp_path):
    ids = haystack_ids[:LONG_TOKENS - 16]
    stats = tmp_path / "stats.jsonl"
    res = run_llm_job(
        dict(name="moba_sparse", model=model_dir, prompt_token_ids=[ids], max_tokens=8,
             max_model_len=LONG_TOKENS, additional_config={"plas_attention_config": SPARSE}),
        child_env(plugin_path, FD_ATTENTION_BACKEND="PLAS_ATTN", MOBA_STATS_FILE=str(stats)),
        tmp_path, 900)
    c = read_stats(stats)
    skipped_p = 1 - c["prefill_selected"] / c["prefill_visible"]
    skipped_d = 1 - c["decode_selected"] / max(c["decode_visible"], 1)
    print(f"{len(ids)} prompt tokens, {res['generate_s']:.1f}s: prefill skipped {skipped_p:.1%}, "
          f"decode skipped {skipped_d:.1%} of visible (token, head, block) pairs")
    assert len(res["token_ids"][0]) == 8
    assert skipped_p > 0.3 and skipped_d > 0.5


def test_sparse_moba_reuses_cached_prefix_pages(plugin_path, model_dir, haystack_ids, tmp_path):
    # Block 64, 4..8 blocks per query: dense below 256 tokens, so both prompts run sparse. The
    # shared prefix is 8 pages of 128 tokens = 16 MoBA blocks; the tails differ.
    cfg = {"moba_block_size": 64, "moba_encoder_top_k_left": 4, "moba_encoder_top_k_right": 8,
           "moba_decoder_top_k_left": 4, "moba_decoder_top_k_right": 8}
    prefix = haystack_ids[:1024]
    first = prefix + haystack_ids[1024:1424]
    second = prefix + haystack_ids[3000:3400]
    job = dict(model=model_dir, max_tokens=16, max_model_len=2048,
               additional_config={"moba_attention_config": cfg})
    stats = tmp_path / "stats.jsonl"
    env = child_env(plugin_path, FD_ATTENTION_BACKEND="MOBA_ATTN", MOBA_STATS_FILE=str(stats))
    cached = run_llm_job(dict(job, name="prefix_cache_on", prompt_token_ids=[first, second],
                              one_by_one=True, enable_prefix_caching=True), env, tmp_path, 900)
    c = read_stats(stats)
    env.pop("MOBA_STATS_FILE")
    fresh = run_llm_job(dict(job, name="prefix_cache_off", prompt_token_ids=[second],
                             enable_prefix_caching=False), env, tmp_path, 900)
    print(f"cached tokens {cached['cached_tokens']}, prefill skipped "
          f"{1 - c['prefill_selected'] / c['prefill_visible']:.1%}; with cache "
          f"{cached['token_ids'][1]}, without {fresh['token_ids'][0]}")
    assert cached["cached_tokens"][0] == 0
    assert cached["cached_tokens"][1] >= len(prefix), "the second prompt missed the prefix cache"
    assert c["prefill_selected"] < c["prefill_visible"], "no block was skipped"
    assert cached["token_ids"][1] == fresh["token_ids"][0]
