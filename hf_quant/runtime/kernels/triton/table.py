"""CUDA dispatch for the Triton kernels: which kernel runs each (row class, bits), and how it launches.

The starting point is GemLite's published H100 choice: a GEMV for decode (M <= 8), a split-K
tensor-core GEMM for 16 <= M <= 128, and dequantize + cuBLAS above. `benchmarks/gpu_session.py`
measures every kernel on every goal shape and writes the fastest per (row class, bits) as JSON; a
file named by HF_QUANT_TRITON_TABLE (or passed to `load_table`) replaces entries of `DISPATCH`.
`dequant_matmul` (the device-agnostic fallback) is never in the table.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import NamedTuple

import torch

GEMV_MAX_ROWS = 8
SPLITK_MAX_ROWS = 128
ROW_CUTS = (1, 2, 4, 8, 16, 32, 64, 128)  # row classes: 1, 2, 3-4, 5-8, 9-16, 17-32, 33-64, 65-128, > 128
KERNELS = ("triton_gemv", "triton_splitk", "triton_dequant")

# (largest M of the class or None for "more", bits) -> kernel name; bits None = any
# Offline budgets (benchmarks/kernel_budget.py): the GEMV decodes each weight once per row it keeps
# in registers and converts the activations once per output tile row, so from 2 rows on the split-K
# GEMM (its decode amortized over up to 16 rows by the tensor cores) issues fewer instructions.
DISPATCH: dict[tuple[int | None, int | None], str] = {
    (1, None): "triton_gemv", (2, None): "triton_splitk", (4, None): "triton_splitk", (8, None): "triton_splitk",
    (16, None): "triton_splitk", (32, None): "triton_splitk", (64, None): "triton_splitk",
    (128, None): "triton_splitk", (None, None): "triton_dequant",
}
_LIMITS = {"triton_gemv": GEMV_MAX_ROWS, "triton_splitk": SPLITK_MAX_ROWS, "triton_dequant": None}


def row_class(rows: int) -> int | None:
    """The largest M of the class `rows` falls in (None: above every cut)."""
    for cut in ROW_CUTS:
        if rows <= cut:
            return cut
    return None


def kernel_for(rows: int, bits: int) -> str:
    cls = row_class(rows)
    return DISPATCH.get((cls, bits)) or DISPATCH[(cls, None)]


def load_table(path: str) -> None:
    """Replace entries of DISPATCH from a JSON list of {"rows": "1" | "5-8" | ">128", "bits": b, "kernel": name}
    (the `dispatch` of gpu_session.py's results.json). Unknown kernels and kernels that cannot take the
    class's rows are refused by name."""
    with open(path) as f:
        rows = json.load(f)
    for entry in rows:
        cls = parse_rows(entry["rows"])
        kernel = entry["kernel"]
        if kernel not in KERNELS:
            raise ValueError(f"{path}: kernel {kernel!r} is not one of {KERNELS}")
        limit = _LIMITS[kernel]
        if limit is not None and (cls is None or cls > limit):
            raise ValueError(f"{path}: {kernel} takes at most {limit} rows, not the class {entry['rows']!r}")
        DISPATCH[(cls, entry.get("bits"))] = kernel
    _changed()


def rows_label(cls: int | None) -> str:
    if cls is None:
        return f">{ROW_CUTS[-1]}"
    i = ROW_CUTS.index(cls)
    lo = 1 if i == 0 else ROW_CUTS[i - 1] + 1
    return str(cls) if lo == cls else f"{lo}-{cls}"


def parse_rows(label: str) -> int | None:
    if label.startswith(">"):
        return None
    cls = int(label.split("-")[-1])
    if cls not in ROW_CUTS:
        raise ValueError(f"rows {label!r} is not a row class; use one of {[rows_label(c) for c in ROW_CUTS]} or "
                         f"{rows_label(None)!r}")
    return cls


def _changed() -> None:
    from ..base import _choices_changed  # layers drop their cached choices (their layouts stay)
    _choices_changed()


if os.environ.get("HF_QUANT_TRITON_TABLE"):
    load_table(os.environ["HF_QUANT_TRITON_TABLE"])


class Launch(NamedTuple):
    block_m: int
    block_n: int
    split: int
    num_warps: int
    num_stages: int = 1
    maxnreg: int | None = None  # a register cap per thread (ptxas), or None


@lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The device's SMs (132 on an H100/H200 SXM; also what CPU runs in the interpreter plan for)."""
    if device.type != "cuda":
        return 132
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


def split_blocks(n_blocks: int, split: int) -> tuple[int, int]:
    """(blocks per split, splits) for `split` requested: no split left empty."""
    per_split = -(-n_blocks // split)
    return per_split, -(-n_blocks // per_split)


def _split(n_tiles: int, n_blocks: int, sms: int, waves: float) -> int:
    """K splits so that n_tiles * split programs make about `waves` programs per SM."""
    return max(1, min(n_blocks, round(waves * sms / n_tiles)))


# three 128-thread GEMV programs resident per SM (65536 registers): enough bytes in flight, and a
# goal shape's programs in about one wave; ptxas needs more only for 3 bits, and fits it without spills
GEMV_MAXNREG = 168


def gemv_launch(M: int, geo, sms: int) -> Launch:
    """Rows up to 8: BLOCK_M * BLOCK_N * BW / threads <= 32 words and fp32 partial sums per thread
    (more spills), with several output rows per thread (the activations it converts are reused)."""
    block_m = max(1, 1 << (M - 1).bit_length())
    warps = 4
    block_n = max(16, min(128, 32 * 32 * warps // (block_m * geo.bw)))
    n_tiles = -(-geo.N // block_n)
    return Launch(block_m, block_n, _split(n_tiles, geo.n_blocks, sms, 4), warps,
                  maxnreg=GEMV_MAXNREG if block_m == 1 else None)


def splitk_launch(M: int, geo, sms: int) -> Launch:
    block_m = max(16, 1 << (M - 1).bit_length())
    block_n = 64 if block_m <= 64 else 32
    warps = 4
    n_tiles = -(-geo.N // block_n)
    return Launch(block_m, block_n, _split(n_tiles, geo.n_blocks, sms, 2), warps)
