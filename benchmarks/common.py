"""Shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so this imports as `common`)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def random_llama(hidden: int, intermediate: int, layers: int, device: str, vocab: int = 32000) -> LlamaForCausalLM:
    """A Llama-shaped bf16 model with N(0, 0.02) weights and unit norms, built straight on `device`
    (head dim 128, no grouped KV, untied lm_head), seeded."""
    heads = max(hidden // 128, 1)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    return model.eval()
