"""Shared fixtures: tiny random Llama / GPT-2 checkpoints and the bundled tiny-llama asset."""

from __future__ import annotations

from pathlib import Path

import os

import pytest
import torch

# Kernel choices by fixed thresholds, as the tests expect; tests/test_cpu_dispatch.py tests measuring.
os.environ["HF_QUANT_CPU_DISPATCH"] = "fixed"
if not torch.cuda.is_available():  # run the Triton kernels' code on CPU tensors (before hf_quant imports Triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

import hf_quant  # noqa: F401  (registers the quantizer)

ASSETS = Path(__file__).parent / "assets"
TINY_LLAMA = ASSETS / "tiny-llama"
SHARED = Path(__file__).resolve().parents[2] / "shared"
REF_LLAMA = SHARED / "models" / "ref-llama"
# Why the Triton kernels cannot run here (not installed, or older than 3.5), or None: the Triton tests skip with it.
from hf_quant.runtime.kernels import triton as _triton_kernels  # noqa: E402

TRITON_KERNELS_UNAVAILABLE = _triton_kernels.UNAVAILABLE_REASON
needs_triton_kernels = pytest.mark.skipif(TRITON_KERNELS_UNAVAILABLE is not None,
                                          reason=f"Triton kernels: {TRITON_KERNELS_UNAVAILABLE}")


def pytest_configure(config):
    """With pytest-xdist workers (the suite's default, `-n auto` in pyproject.toml), each worker computes with one
    thread: the tests are small and mostly single-threaded already, and two workers with two OpenMP threads each
    on two cores spend their time waiting for each other. Set before the workers start, so their torch and the
    native kernels' OpenMP read it. A test that needs threads sets them itself."""
    if getattr(config.option, "numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


# The files whose tests take longest in all (minutes each on a slow 2-core CPU), handed out first: with
# `--dist loadfile` xdist gives the workers whole files in collection order, and a long file started last runs
# alone on one worker while the others wait (alphabetical order put test_streaming.py, the longest, near the end).
LONGEST_FIRST = ("test_streaming.py", "test_onnx.py", "test_awq.py", "test_activations.py", "test_golden.py",
                 "test_gptq.py", "test_peft.py", "test_triton.py", "test_cli.py", "test_gpu_session.py")


def pytest_collection_modifyitems(config, items):
    """LONGEST_FIRST's files first, the rest after in their order (a stable sort: each file's tests keep theirs)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def tiny_llama_config(**kw) -> LlamaConfig:
    cfg = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaConfig(**cfg)


def tiny_gpt2_config(**kw) -> GPT2Config:
    cfg = dict(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=128)
    cfg.update(kw)
    return GPT2Config(**cfg)


def tiny_qwen2_config(**kw) -> Qwen2Config:
    """Qwen2: Llama-like blocks with biased q/k/v projections."""
    cfg = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(kw)
    return Qwen2Config(**cfg)


def tiny_opt_config(**kw) -> OPTConfig:
    """OPT: blocks under model.decoder.layers, biased projections, fc1/fc2 MLP."""
    cfg = dict(vocab_size=256, hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128, word_embed_proj_dim=128)
    cfg.update(kw)
    return OPTConfig(**cfg)


def tiny_family_config(model_type: str, **kw):
    """A tiny config of another model family by its model_type, sized like the others (test_model_families.py):
    Qwen3 (q/k norms), Gemma 2 ((1 + weight) norms, four norms per block), GPT-NeoX (its lm_head saved as `embed_out`), Falcon
    (in-place adds on linear outputs), Cohere (LayerNorm without bias, parallel attention and MLP), Mixtral
    (experts stacked in 3-D tensors); GPT-J (a rotary table computed while the model is built)."""
    from transformers import AutoConfig

    cfg = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
    cfg.update({"gemma2": dict(head_dim=32), "qwen3": dict(head_dim=128), "gpt_neox": dict(num_key_value_heads=None),
                "falcon": dict(num_key_value_heads=None), "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
                "gptj": dict(n_embd=128, n_head=4, n_layer=2, rotary_dim=16, n_positions=128, num_key_value_heads=None,
                             hidden_size=None, num_hidden_layers=None, num_attention_heads=None,
                             max_position_embeddings=None, intermediate_size=None),
                }.get(model_type, {}))
    cfg.update(kw)
    return AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if v is not None})


_ARCHS = {"llama": (LlamaForCausalLM, tiny_llama_config), "gpt2": (GPT2LMHeadModel, tiny_gpt2_config),
          "qwen2": (Qwen2ForCausalLM, tiny_qwen2_config), "opt": (OPTForCausalLM, tiny_opt_config)}
FAMILIES = ("qwen3", "gemma2", "gpt_neox", "falcon", "cohere", "mixtral")


def save_random_model(path: Path, arch: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, **kw) -> Path:
    torch.manual_seed(seed)
    if arch not in _ARCHS:  # another family by its model_type (tiny_family_config)
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_config(tiny_family_config(arch, **kw)).to(dtype).save_pretrained(path)
        return path
    cls, config = _ARCHS[arch]
    cls(config(**kw)).to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Float checkpoints of tiny random models, by name."""
    root = tmp_path_factory.mktemp("float_models")
    return {
        "llama": save_random_model(root / "llama", "llama"),
        "gpt2": save_random_model(root / "gpt2", "gpt2"),
        "qwen2": save_random_model(root / "qwen2", "qwen2"),
        "opt": save_random_model(root / "opt", "opt"),
        "llama-fp32": save_random_model(root / "llama-fp32", "llama", dtype=torch.float32),
        **{arch: save_random_model(root / arch, arch) for arch in FAMILIES},
    }


def train_steps(model, params, ids: torch.Tensor, steps: int, lr: float) -> list[float]:
    """AdamW on `params` for `steps` steps of one fixed batch (labels = inputs); the losses."""
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture()
def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 24), generator=g)
