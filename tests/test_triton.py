"""Triton kernels against the reference kernel on random shapes, bits, groups and act-order, and the
CUDA dispatch table.

With CUDA the kernels run on the GPU through the dispatcher. Without it, conftest.py turns on
Triton's interpreter (TRITON_INTERPRET=1), which runs the same kernel code on CPU tensors, so the
kernels' indexing and arithmetic are checked on every machine. Speed is measured only in benchmarks/
(budgets offline: benchmarks/kernel_budget.py, tests/test_kernel_budget.py).
"""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import TRITON_KERNELS_UNAVAILABLE  # noqa: E402

if TRITON_KERNELS_UNAVAILABLE:
    pytest.skip(TRITON_KERNELS_UNAVAILABLE, allow_module_level=True)

from hf_quant import kernels  # noqa: E402
from hf_quant.config import LayerSpec  # noqa: E402
from hf_quant.core import codes_by_group  # noqa: E402
from hf_quant.runtime.kernels.base import KERNELS, choose  # noqa: E402
from hf_quant.runtime.kernels.triton import layout as L  # noqa: E402
from hf_quant.runtime.kernels.triton import qgemm, table  # noqa: E402

from .test_kernels import make_layer, rel_err  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON = {"triton_gemv": qgemm.GEMV, "triton_splitk": qgemm.SPLITK, "triton_dequant": qgemm.DEQUANT}


def run_kernel(layer, x, name):
    if CUDA:
        with kernels.use_kernel(name):
            return layer(x)
    kernel = TRITON[name]
    return kernel.forward(layer, x, layer.prepared(kernel, x.device, x.dtype))  # interpreter: call it directly


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_block_layout_word_w_code_j_holds_channel_b_kb_plus_j_bw_plus_w(bits):
    per, bw = L.per_word(bits), 16
    kb = per * bw
    codes = torch.randint(0, 2**bits, (5, 2 * kb), dtype=torch.uint8)
    words = L.interleave(codes, bits, bw).to(torch.int64) & 0xFFFFFFFF  # (5, 2 * BW)
    for b in range(2):
        for j in range(per):
            for w in (0, 7, bw - 1):
                got = (words[:, b * bw + w] >> (bits * j)) & (2**bits - 1)
                assert torch.equal(got, codes[:, b * kb + j * bw + w].to(torch.int64))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("group", [None, 16, 32, 64, 128, 256])
def test_every_slice_lies_in_one_group(bits, group):
    bw = L.block_words(bits, group)
    assert bw is not None and bw >= 16  # tensor-core dots need K >= 16
    kb = L.per_word(bits) * bw
    if group is not None:
        assert group % kb == 0 or (kb % group == 0 and group % bw == 0)
    P = L.magic_position(bits)
    assert P % bits == 0 and P + bits <= 23  # one code per word needs no shift; codes stay in the mantissa


def test_group_that_fits_no_block_is_left_to_other_kernels():
    assert L.block_words(3, 48) is None
    layer, _ = make_layer(8, 96, LayerSpec(3, 48, False), bias=False, dtype=torch.float16)
    assert not L.fits(layer)
    assert not qgemm.GEMV.supports(layer, torch.device("cuda"), torch.float16)


@settings(max_examples=40 if not CUDA else 150, deadline=None, derandomize=True)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([-1, 32, 64, 128]),
    sym=st.booleans(),
    act_order=st.booleans(),
    bias=st.booleans(),
    k_mult=st.integers(1, 5),
    out_f=st.integers(1, 150),
    m=st.sampled_from([1, 2, 3, 8, 16, 17, 40]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    seed=st.integers(0, 1000),
)
def test_triton_kernels_match_reference(bits, group_size, sym, act_order, bias, k_mult, out_f, m, dtype, seed):
    # per-channel layers take any K (not a multiple of the block: the masked EVEN_K=False path)
    in_f = k_mult * (48 if group_size == -1 else group_size)
    act_order = act_order and in_f > group_size > 0
    layer, _ = make_layer(out_f, in_f, LayerSpec(bits, group_size, sym, act_order), bias, dtype=dtype, seed=seed)
    layer.to(DEVICE)
    x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    with kernels.use_kernel("reference"):
        ref = layer(x)
    # bf16 keeps 8 bits: two roundings of the same sum differ by up to ~2**-8
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
    for name, kernel in TRITON.items():
        if not kernel.runs(layer, torch.device("cuda"), dtype, m):
            continue
        out = run_kernel(layer, x, name)
        assert out.shape == ref.shape and out.dtype == dtype
        assert rel_err(out, ref) < tol, (name, rel_err(out, ref))
    assert int(layer.prepared(qgemm.GEMV, x.device, dtype).counters.abs().sum()) == 0  # split-K left them at zero


@pytest.mark.parametrize("group_size", [-1, 128, 512])
@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_bit_layers_on_the_triton_kernels(group_size, m, dtype):
    """1-bit signs (zero 1/2) are one more width of the block layout: all three kernels against the reference,
    and a whole OneBit layer (in_scales, output LayerNorm, bias after it) through the dispatcher on CUDA."""
    layer, _ = make_layer(37, 1024, LayerSpec(1, group_size, True), bias=True, dtype=dtype, seed=m)
    layer.to(DEVICE)
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    with kernels.use_kernel("reference"):
        ref = layer(x)
    ran = 0
    for name, kernel in TRITON.items():
        if kernel.runs(layer, torch.device("cuda"), dtype, m):
            ran += 1
            assert rel_err(run_kernel(layer, x, name), ref) < 1e-2, name
    assert ran >= 2
    if CUDA:
        from hf_quant.methods.onebit import quantize_onebit
        from hf_quant.runtime import QuantLinear

        spec = LayerSpec(1, -1, True, in_scale=True)
        W = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
        onebit = QuantLinear.from_quantized(quantize_onebit(W, spec, dtype), spec, torch.randn(64).to(dtype),
                                            output_norm=True).to(DEVICE)
        with kernels.use_kernel("reference"):
            ref = onebit(x)
        assert rel_err(onebit(x), ref) < 1e-2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype,scale", [(torch.float16, 1e3), (torch.float16, 1e-5), (torch.bfloat16, 1e13),
                                         (torch.bfloat16, 1e-15)])
def test_gemv_denormal_decode_holds_over_the_activation_range(bits, dtype, scale):
    # the GEMV's codes are fp32 denormals and x is scaled by up to 2**80 (qgemm._gemv_kernel): |x| up
    # to 2**46 and down to 2**-57 must match the reference (fp16: the largest x whose outputs fit)
    layer, _ = make_layer(48, 256, LayerSpec(bits, 128 if bits < 8 else -1, False), bias=False, dtype=dtype, seed=bits)
    layer.to(DEVICE)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(bits))
    x = (x / x.abs().max() * scale).to(DEVICE, dtype)
    with kernels.use_kernel("reference"):
        ref = layer(x)
    out = run_kernel(layer, x, "triton_gemv")
    assert torch.isfinite(out).all() and ref.abs().max() > 0
    assert rel_err(out, ref) < (1e-2 if dtype == torch.bfloat16 else 3e-3), rel_err(out, ref)


def test_split_k_counters_reset_and_repeated_calls_agree():
    layer, _ = make_layer(64, 1024, LayerSpec(4, 128, False), bias=True, dtype=torch.float16)
    layer.to(DEVICE)
    x = torch.randn(3, 1024, dtype=torch.float16, device=DEVICE)
    blocks = layer.prepared(qgemm.GEMV, x.device, x.dtype)
    assert table.gemv_launch(1, blocks.geo, 132).split > 1 and table.splitk_launch(3, blocks.geo, 132).split > 1
    first = run_kernel(layer, x[:1], "triton_gemv")
    assert torch.equal(run_kernel(layer, x[:1], "triton_gemv"), first)
    out = run_kernel(layer, x, "triton_splitk")
    assert torch.equal(run_kernel(layer, x, "triton_splitk"), out)
    assert int(blocks.counters.abs().sum()) == 0


def test_the_three_kernels_share_one_layout_and_leave_codes_untouched():
    layer, _ = make_layer(64, 256, LayerSpec(4, 128, False, True), bias=True, dtype=torch.float16)
    layer.to(DEVICE)
    before = codes_by_group(layer.qweight, layer.spec, 256, None)[0].clone()
    x = torch.randn(2, 5, 256, dtype=torch.float16, device=DEVICE)
    with kernels.use_kernel("reference"):
        ref = layer(x)
    for name in TRITON:
        out = run_kernel(layer, x[:, :1] if name == "triton_gemv" else x, name)
        assert out.shape[-1] == 64 and rel_err(out, ref[:, :1] if name == "triton_gemv" else ref) < 3e-3
    assert len([k for k in layer._prepared if k[0] == "triton_blocks"]) == 1
    assert torch.equal(codes_by_group(layer.qweight, layer.spec, 256, None)[0], before)


def test_dequant_scratch_is_reused_across_layers():
    a, _ = make_layer(64, 256, LayerSpec(4, 128, False), bias=False, dtype=torch.float16)
    b, _ = make_layer(32, 128, LayerSpec(4, 128, False), bias=False, dtype=torch.float16)
    a.to(DEVICE), b.to(DEVICE)
    x = torch.randn(3, 256, dtype=torch.float16, device=DEVICE)
    run_kernel(a, x, "triton_dequant")
    buf = qgemm._SCRATCH[(x.device, x.dtype)]
    run_kernel(b, x[:, :128], "triton_dequant")
    assert qgemm._SCRATCH[(x.device, x.dtype)] is buf  # smaller layer: same buffer


# --- dispatch on CUDA (decided without a device: kernels.base.choose) ------------------------------------


@pytest.mark.parametrize("bits,group", [(2, 128), (3, 128), (4, 128), (4, -1), (8, -1), (4, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_dispatch_never_routes_up_to_128_rows_to_dequant_matmul(bits, group, dtype):
    layer, _ = make_layer(64, 256, LayerSpec(bits, group, False), bias=False, dtype=dtype)
    cuda = torch.device("cuda")
    for rows in range(1, 300):
        name = choose(layer, cuda, dtype, rows).name
        assert name == table.kernel_for(rows, bits) and name.startswith("triton_"), (rows, name)
        assert KERNELS.get(name).runs(layer, cuda, dtype, rows)
    assert choose(layer, cuda, dtype, 1).name == "triton_gemv"
    assert choose(layer, cuda, dtype, 64).name == "triton_splitk"
    assert choose(layer, cuda, dtype, 4096).name == "triton_dequant"
    assert choose(layer, torch.device("cpu"), dtype, 1).name != "triton_gemv"  # CPU keeps its own kernels


def test_dispatch_table_loads_from_json_and_refuses_bad_entries(tmp_path):
    saved = dict(table.DISPATCH)
    try:
        good = tmp_path / "t.json"
        good.write_text(json.dumps([{"rows": "3-4", "bits": 4, "kernel": "triton_gemv"}]))
        table.load_table(str(good))
        assert table.kernel_for(4, 4) == "triton_gemv" and table.kernel_for(4, 2) == "triton_splitk"
        for entry, message in [({"rows": "3-4", "bits": 4, "kernel": "dequant_matmul"}, "not one of"),
                               ({"rows": "65-128", "bits": 4, "kernel": "triton_gemv"}, "at most 8 rows"),
                               ({"rows": "3-5", "bits": 4, "kernel": "triton_gemv"}, "not a row class")]:
            bad = tmp_path / "bad.json"
            bad.write_text(json.dumps([entry]))
            with pytest.raises(ValueError, match=message):
                table.load_table(str(bad))
    finally:
        table.DISPATCH.clear()
        table.DISPATCH.update(saved)
    assert [table.rows_label(c) for c in table.ROW_CUTS] == ["1", "2", "3-4", "5-8", "9-16", "17-32", "33-64",
                                                              "65-128"]
    assert all(table.parse_rows(table.rows_label(c)) == c for c in (*table.ROW_CUTS, None))


def test_launches_fill_the_sms_on_the_goal_shapes():
    for K, N in [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672)]:
        for bits in (2, 3, 4, 8):
            blocks = L.geometry(bits, None if bits == 8 else 128, K, N)
            for M, launch in [(1, table.gemv_launch), (16, table.splitk_launch), (64, table.splitk_launch)]:
                cfg = launch(M, blocks, 132)
                programs = -(-N // cfg.block_n) * table.split_blocks(blocks.n_blocks, cfg.split)[1]
                assert programs >= 132, (K, N, bits, M, programs)
