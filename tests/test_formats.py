import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_quant.config import LayerSpec
from hf_quant.core import buffer_specs, pack_codes, unpack_codes
from hf_quant.io.checkpoint import check_module_tensors, index_checkpoint, read_safetensors_header


@settings(max_examples=40, deadline=None, derandomize=True)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 9), cols8=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, rows, cols8, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols8 * 8), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, cols8 * bits)
    assert torch.equal(unpack_codes(packed, bits, cols8 * 8), codes)


def test_documented_bit_order():
    # code i occupies bits [bits*i, bits*(i+1)) of the row's little-endian bit stream
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]
    assert pack_codes(codes % 4, 2).tolist() == [[0b00111001, 0b00111001]]  # 1,2,3,0 | 1,2,3,0
    c3 = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(int(v) << (3 * i) for i, v in enumerate(c3[0]))
    assert pack_codes(c3, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]]
    assert torch.equal(pack_codes(codes, 8), codes)


def test_pack_rejects_ragged_rows():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(torch.zeros(2, 12, dtype=torch.uint8), 4)


def test_buffer_specs():
    specs = buffer_specs(256, 64, LayerSpec(3, 128, False), torch.bfloat16)
    assert specs == {"qweight": ((64, 96), torch.uint8), "scales": ((64, 2), torch.bfloat16), "qzeros": ((64, 2), torch.uint8)}
    assert "qzeros" not in buffer_specs(256, 64, LayerSpec(4, -1, True), torch.float16)


def _write_safetensors(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def test_header_check_detects_truncation(tmp_path):
    p = _write_safetensors(tmp_path / "a.safetensors", {"x.qweight": torch.zeros(16, 16, dtype=torch.uint8)})
    assert "x.qweight" in read_safetensors_header(str(p))
    data = p.read_bytes()
    for cut in (4, 20, len(data) - 1):
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            read_safetensors_header(str(p))


def test_header_check_rejects_corrupt_header(tmp_path):
    p = tmp_path / "b.safetensors"
    p.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ValueError, match="corrupt"):
        read_safetensors_header(str(p))


def test_index_refuses_pickles(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    p.write_bytes(b"anything")
    with pytest.raises(ValueError, match="safetensors only"):
        index_checkpoint([str(p)])


def test_module_tensor_check(tmp_path):
    spec = LayerSpec(4, 32, False)
    expected = buffer_specs(64, 16, spec, None)
    good = {"m.qweight": torch.zeros(16, 32, dtype=torch.uint8), "m.scales": torch.ones(16, 2, dtype=torch.bfloat16),
            "m.qzeros": torch.zeros(16, 2, dtype=torch.uint8)}
    entries = index_checkpoint([str(_write_safetensors(tmp_path / "g.safetensors", good))])
    check_module_tensors(entries, "m", expected)
    check_module_tensors(entries, "m", expected, prefixes=("", "model."))
    entries_prefixed = {"model." + k: v for k, v in entries.items()}
    check_module_tensors(entries_prefixed, "m", expected, prefixes=("", "model."))
    missing = {k: v for k, v in entries.items() if k != "m.qzeros"}
    with pytest.raises(ValueError, match=r"^m: the checkpoint has no 'qzeros'"):
        check_module_tensors(missing, "m", expected)
    wrong = dict(entries, **{"m.qweight": dict(entries["m.qweight"], shape=[16, 64])})
    with pytest.raises(ValueError, match="'qweight' is U8\\[16, 64\\], expected U8\\[16, 32\\]"):
        check_module_tensors(wrong, "m", expected)
    json.dumps(entries)  # headers are plain JSON
