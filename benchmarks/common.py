"""Shared by the benchmark scripts (run as `python benchmarks/<script>.py`, so this imports as `common`)."""

from __future__ import annotations

import os
import threading
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_quant.core import devices
from hf_quant.core.devices import last_level_cache_bytes  # noqa: F401  (re-exported for the benchmarks)

CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_summary() -> str:
    """The CPU's model name and the features that decide the fast paths (AVX2, AVX-512, native bf16, AMX), from
    /proc/cpuinfo: the line every benchmark prints with its figures."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    flags = devices.cpu_flags()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{model}; " + " ".join(f"{w}={'yes' if w in flags else 'no'}" for w in CPU_FEATURES) + isa_caps()


def isa_caps() -> str:
    """Empty, or "; capped: ..." naming what narrows the ISA the kernels use below the CPU's: ATen's dispatch
    (ATEN_CPU_CAPABILITY), oneDNN's (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA), the native helpers' extra compiler
    flags (HF_QUANT_NATIVE_CFLAGS, e.g. -march=x86-64-v3 for an AVX2-only build). A run with all three at AVX2
    stands in for an AVX2-only CPU (fbgemm, which only the exact int8 kernels use, is not capped: those then
    leave the candidates, as without VNNI)."""
    import os

    names = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "HF_QUANT_NATIVE_CFLAGS")
    set_ = [f"{n}={os.environ[n]}" for n in names if os.environ.get(n)]
    return f"; capped: {' '.join(set_)} (torch capability {torch.backends.cpu.get_cpu_capability()})" if set_ else ""


def random_llama(hidden: int, intermediate: int, layers: int, device: str, vocab: int = 32000,
                 heads: int | None = None, kv_heads: int | None = None) -> LlamaForCausalLM:
    """A Llama-shaped bf16 model with N(0, 0.02) weights and unit norms, built straight on `device`
    (by default head dim 128, no grouped KV, untied lm_head), seeded."""
    heads = heads or max(hidden // 128, 1)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    # to_empty leaves non-persistent buffers uninitialised: the rotary frequencies are rebuilt as loading builds them
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg).to(device)
    return model.eval()


def cuda_graph_kwargs() -> dict:
    """`generate` keyword arguments for CUDA graphs: a static KV cache, and transformers compiling the
    decode step with `torch.compile(mode="reduce-overhead")` (the prompt's forward stays eager)."""
    try:
        from transformers import CompileConfig
    except ImportError:  # pragma: no cover - older transformers
        from transformers.generation.configuration_utils import CompileConfig
    return dict(cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead", fullgraph=False))


def tokens_per_s(model, ids: torch.Tensor, new_tokens: int, cuda_graphs: bool = False, runs: int | None = None) -> dict:
    """Greedy `generate` of exactly `new_tokens` tokens, `runs` times (default 2 eager, 3 with CUDA
    graphs): the first runs warm up (Triton compiles, layouts, torch.compile, graph capture), the
    fastest later run counts. Returns {"tokens_per_s", "seconds": every run's wall time}."""
    pad = model.config.pad_token_id
    if pad is None:
        eos = model.config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    if cuda_graphs:
        kw.update(cuda_graph_kwargs())
    runs = runs or (3 if cuda_graphs else 2)
    cuda = ids.is_cuda
    seconds = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, **kw)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
    return {"tokens_per_s": new_tokens / min(seconds[1:] or seconds), "seconds": [round(s, 4) for s in seconds]}


def cold_copies(nbytes: int, most: int = 8) -> int:
    """How many copies of a weight of `nbytes` to call in rotation so that each call finds its own
    weight evicted: together more than twice the last-level cache (at least 2, at most `most`).

    A model's layers each read their weights once per token, and the other layers' weights pass
    through the cache in between: a layer's weights are cold when it runs, its input is not. Timing one
    weight back to back instead keeps it in the cache if it fits (a 16 MiB int8 4096x4096 weight in a
    32 MiB L3) and flatters the smaller (quantized) formats; flushing the whole cache before each call
    also evicts the activations and the allocator's memory, and overstates every per-op overhead."""
    return max(2, min(most, -(-2 * last_level_cache_bytes() // max(nbytes, 1)) + 1))


class Rotation:
    """A callable that calls its functions in turn (one per weight copy): `rotation(*args)`. Rotations
    timed in interleaved rounds over the same copies share one `counter` (a one-element list): every
    call of any of them takes the next copy, so no call follows one on the same copy (which would find
    that weight in the cache)."""

    def __init__(self, fns: list, counter: list | None = None) -> None:
        self.fns = list(fns)
        self.counter = [0] if counter is None else counter

    def __call__(self, *args: object) -> object:
        i = self.counter[0]
        self.counter[0] = i + 1
        return self.fns[i % len(self.fns)](*args)


def core_sharing(seconds: float = 0.6, size: int = 1 << 14) -> str:
    """How two threads' compute scales on this machine now, as a line for a benchmark's header: the rate of a
    cache-resident elementwise power on two Python threads at once over one thread alone (`torch.pow(x, 2.4)` on
    64 KB, compute-bound, one thread inside torch; `torch.mm` does not scale over Python threads). 2.0: two cores
    of their own; about 1.0: the two run on one core's execution units (a VM's two vCPUs placed on SMT siblings of
    one host core, or a busy host). On cloud VMs this changes while a benchmark runs (measured on a 2-vCPU Zen 1 VM:
    the same register-bound loop at full speed on both vCPUs, then at half speed on each a second later):
    compute-bound kernels (the fp32 / int16 decode GEMVs, the int8 GEMMs) lose up to half their two-thread speed
    when it is ~1, the memory-bound float baselines much less."""
    if (os.cpu_count() or 1) < 2:
        return "core sharing: one CPU"
    x = torch.rand(size) + 0.5
    out = torch.empty_like(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def rate(n_threads: int) -> float:
            counts = [0] * n_threads
            stop = time.perf_counter() + seconds

            def work(i: int) -> None:
                with torch.inference_mode():  # a thread does not inherit the caller's: x may be an inference tensor
                    while time.perf_counter() < stop:
                        torch.pow(x, 2.4, out=out)
                        counts[i] += 1

            workers = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            return sum(counts) / (time.perf_counter() - start)

        rate(1)  # warm-up
        one = rate(1)
        two = rate(2)
    finally:
        torch.set_num_threads(threads)
    return (f"core sharing: two threads compute {two / one:.2f}x one thread's rate (2.0: separate cores; ~1.0: "
            "sharing one core's execution units now)")
