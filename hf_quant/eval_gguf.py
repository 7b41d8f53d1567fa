"""llama.cpp as the judge of an exported GGUF file (through the `llama-cpp-python` binding).

`compare_with_llama_cpp` runs the same token windows through the hf_quant model and through llama.cpp
(teacher-forced), and reports tokenization equality, top-1 agreement of the logits, both perplexities
and greedy continuations. llama.cpp quantizes activations to 8 bits in its dot products, so the
logits agree closely but are not bit-equal.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .eval import bundled_text


def load_llama_cpp(path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None) -> Any:
    """A `llama_cpp.Llama` for `path` that keeps the logits of every position."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError("comparing with llama.cpp needs its Python binding: pip install llama-cpp-python "
                          "(README: GGUF)") from e
    return llama_cpp.Llama(model_path=os.fspath(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                           n_threads=n_threads or torch.get_num_threads())


def llama_cpp_logits(llm: Any, ids: list[int]) -> np.ndarray:
    """Teacher-forced logits (len(ids), vocab) of one window, from a fresh context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


@dataclass
class Agreement:
    tokenization_equal: bool
    first_token_mismatch: int | None
    top1_agreement: float
    ppl_hf_quant: float
    ppl_llama_cpp: float
    greedy: list[dict] = field(default_factory=list)

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_llama_cpp / self.ppl_hf_quant


@torch.no_grad()
def compare_with_llama_cpp(model: torch.nn.Module, tokenizer: Any, gguf_path: str | os.PathLike, text: str | None = None,
                           seq_len: int = 256, max_windows: int = 4, prompts: tuple[str, ...] = (),
                           new_tokens: int = 32, llm: Any = None) -> Agreement:
    """The hf_quant `model` against llama.cpp running `gguf_path`, on the same windows of `text` (default: the
    bundled held-out text): tokenization, top-1 agreement, perplexities, greedy continuations of `prompts`."""
    text = bundled_text() if text is None else text
    llm = llm or load_llama_cpp(gguf_path, n_ctx=max(seq_len, 64 + new_tokens))
    hf_ids = tokenizer(text, add_special_tokens=False).input_ids
    lc_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    mismatch = next((i for i, (a, b) in enumerate(zip(hf_ids, lc_ids)) if a != b),
                    None if len(hf_ids) == len(lc_ids) else min(len(hf_ids), len(lc_ids)))
    n = min(max_windows, len(hf_ids) // seq_len)
    if n == 0:
        raise ValueError(f"compare_with_llama_cpp: the text has {len(hf_ids)} tokens, fewer than seq_len={seq_len}.")
    agree = total = 0
    nll_hf = nll_lc = 0.0
    device = next(model.parameters()).device
    for w in range(n):
        ids = hf_ids[w * seq_len:(w + 1) * seq_len]
        lc = llama_cpp_logits(llm, ids)
        hq = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu().numpy()
        agree += int((lc.argmax(-1) == hq.argmax(-1)).sum())
        total += len(ids)
        nll_hf += _nll(hq, ids)
        nll_lc += _nll(lc, ids)
    greedy = []
    for prompt in prompts:
        p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        out = model.generate(torch.tensor([p_ids], device=device), max_new_tokens=new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(p_ids), dtype=torch.long, device=device))
        ours = out[0, len(p_ids):].tolist()
        llm.reset()
        theirs = []
        for tok in llm.generate(p_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            theirs.append(int(tok))
            if len(theirs) == len(ours):
                break
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        greedy.append({"prompt": prompt, "match": first is None and len(ours) == len(theirs),
                       "first_divergence": first, "hf_quant": ours, "llama_cpp": theirs})
    count = n * (seq_len - 1)
    return Agreement(mismatch is None, mismatch, agree / total, math.exp(nll_hf / count), math.exp(nll_lc / count),
                     greedy)


def llama_cpp_perplexity(path: str | os.PathLike, ids: list[int], seq_len: int = 256, max_windows: int | None = None,
                         llm: Any = None) -> float:
    """llama.cpp's perplexity of a GGUF file on windows of `ids` (each from a fresh context)."""
    llm = llm or load_llama_cpp(path, n_ctx=seq_len)
    n = len(ids) // seq_len if max_windows is None else min(max_windows, len(ids) // seq_len)
    nll = sum(_nll(llama_cpp_logits(llm, ids[w * seq_len:(w + 1) * seq_len]), ids[w * seq_len:(w + 1) * seq_len])
              for w in range(n))
    return math.exp(nll / (n * (seq_len - 1)))


__all__ = ["Agreement", "compare_with_llama_cpp", "llama_cpp_logits", "llama_cpp_perplexity", "load_llama_cpp"]
