"""The decode GEMV's instruction budget, counted offline (benchmarks/kernel_budget.py): compiled for
sm_90a with the ptxas inside Triton's wheel and disassembled with its nvdisasm. No GPU needed.
Runs the script in a subprocess: the test session itself has Triton's interpreter turned on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_budget  # noqa: E402

BIN_DIR, WHY = kernel_budget.toolchain()
pytestmark = pytest.mark.skipif(BIN_DIR is None, reason=f"offline CUDA toolchain missing: {WHY}")


def budget(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_budget.py"), "--json", *args], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def gemv_m1():
    rows = budget("--full", "--kernels", "triton_gemv", "--rows", "1")
    return {(r["bits"], r["dtype"]): r for r in rows}


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_decode_gemv_budget(gemv_m1, dtype):
    per = {bits: gemv_m1[(bits, dtype)]["sass_per_element"] for bits in (2, 3, 4, 8)}
    assert per[4] <= 5.0, per  # the 3x goal at M=1 needs about 5 or fewer
    assert per[2] < per[4] and per[3] < per[4], per  # fewer bytes must not cost more instructions
    assert per[4] <= 3.6 and per[8] <= 4.2, per  # regression guards near the measured values
    for bits in (2, 3, 4, 8):
        row = gemv_m1[(bits, dtype)]
        assert row["registers"] <= 168, row  # >= 3 programs of 128 threads resident per SM
        assert not any(op.startswith(("LDL", "STL", "BAR")) for op in row["mix"]), row["mix"]  # no spills, syncs
        assert "STS" not in " ".join(row["mix"]), row["mix"]  # nor layout conversions through shared memory
        assert min(row["ctas"].values()) >= 132, row["ctas"]  # every goal shape fills the SMs


def test_json_output_has_one_row_per_variant():
    rows = budget("--kernels", "triton_dequant", "--bits", "4", "--dtypes", "fp16")
    assert [sorted(r) for r in rows] == [sorted(["kernel", "bits", "dtype", "rows", "sass_per_element", "smem_bytes",
                                                 "registers"])]
    assert rows[0]["kernel"] == "triton_dequant" and rows[0]["rows"] == ">128" and rows[0]["sass_per_element"] > 1
