"""A tiny randomly initialized Llama (no hub): 2 layers, hidden 64, 4 heads, 2 KV heads, vocab 256."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, max_positions: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()
