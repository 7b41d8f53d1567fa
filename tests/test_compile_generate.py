"""`generate` with a static KV cache and the decode step compiled by transformers (what runs under
CUDA graphs on a GPU, there with mode="reduce-overhead"), for a model loaded with a
`quantization_config`: the graph holds the quantized layers as ops, without breaks, and the tokens
equal eager decoding. On CPU the CPU kernels run; a second test runs the Triton kernels in Triton's
interpreter through the same compiled graph."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from transformers import AutoModelForCausalLM, CompileConfig

import hf_quant
from hf_quant.runtime.kernels import base as kernel_base

from .conftest import TINY_LLAMA, needs_triton_kernels


def _load(dtype, **config):
    cfg = hf_quant.QuantConfig(method="rtn", bits=4, group_size=128)
    return AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=cfg, dtype=dtype, **config).eval()


def _generate(model, compiled: bool, seen: list | None = None, new_tokens: int = 6):
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 7))
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, cache_implementation="static")
    if compiled:
        # fullgraph: a graph break at a quantized layer fails here. _compile_all_devices: transformers
        # compiles only on accelerators by default
        def backend(gm, example_inputs, **_):  # dynamo's capture, recorded, without inductor's compile time
            if seen is not None:
                seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward

        compile_config = CompileConfig(fullgraph=True, backend=backend)
        compile_config._compile_all_devices = True  # a test-only private switch, no public one exists
        kwargs["compile_config"] = compile_config
    else:
        kwargs["disable_compile"] = True
    return model.generate(ids, **kwargs)


def test_quantized_model_declares_itself_compileable_and_generate_compiles_the_decode_step():
    model = _load(torch.float32)
    assert model.hf_quantizer.is_compileable
    eager = _generate(model, compiled=False)
    torch._dynamo.reset()
    ops: list = []
    compiled = _generate(model, compiled=True, seen=ops)
    assert torch.equal(compiled, eager)
    n_linear = sum(isinstance(m, hf_quant.QuantLinear) for m in model.modules())
    assert ops.count(torch.ops.hf_quant.quant_linear) >= n_linear  # every layer captured as one op


def _triton_on_cpu():
    """The three Triton kernels registered for CPU (Triton's interpreter), same table, top priority."""
    from hf_quant.runtime.kernels.triton import qgemm

    made = []
    for base in (qgemm.TritonGemv, qgemm.TritonSplitK, qgemm.TritonDequant):
        real = base.name

        class OnCpu(base):
            name = f"test_cpu_{real}"
            priority = 100

            def supports(self, layer, device, dtype, _base=base):
                return device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and qgemm.L.fits(layer)

            def chosen(self, layer, rows, _real=real):
                return qgemm.table.kernel_for(rows, layer.spec.bits) == _real

        made.append(kernel_base.register_kernel(OnCpu()))
    return made


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA run is benchmarks/gpu_session.py's")
@needs_triton_kernels
def test_triton_kernels_under_compiled_generate_in_the_interpreter(monkeypatch):
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py without CUDA)")
    # one of tiny-llama's four blocks and three new tokens (the prompt, then two decode steps): every
    # kernel call runs in the interpreter, program by program
    model = _load(torch.float16, num_hidden_layers=1)
    with hf_quant.kernels.use_kernel("reference"):
        ref = _generate(model, compiled=False, new_tokens=3)
    made = _triton_on_cpu()
    try:
        calls = {k.name: 0 for k in made}
        for k in made:
            fwd = k.forward

            def counted(layer, x, prepared, _fwd=fwd, _name=k.name):
                calls[_name] += 1
                return _fwd(layer, x, prepared)

            monkeypatch.setattr(k, "forward", counted)
        compiled = _generate(model, compiled=True, new_tokens=3)
    finally:
        for k in made:
            kernel_base.unregister_kernel(k.name)
    assert calls["test_cpu_triton_gemv"] > 0 and calls["test_cpu_triton_splitk"] > 0, calls  # decode, prompt
    # fp16 sums in another order may flip a near-tie; the prompt's continuation must agree at its start
    assert torch.equal(compiled[:, :9], ref[:, :9]), (compiled, ref)
