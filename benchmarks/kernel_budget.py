"""Instruction budgets of the Triton kernels, counted offline: no GPU needed.

    python benchmarks/kernel_budget.py            # a table
    python benchmarks/kernel_budget.py --json     # one JSON list on stdout, one row per variant
    python benchmarks/kernel_budget.py --kernels triton_gemv --bits 4 --dtypes fp16

Every kernel variant that dispatch launches (kernel x row class x bits x dtype, with the launch
configuration of `table.py`) is compiled for the sm_90a target (`triton.compile` with a CUDA
`GPUTarget`), with the specializations a real launch gets (16-byte aligned pointers, K, N and
strides divisible by 16, M == 1 as a constant), and its cubin disassembled with the `nvdisasm`
shipped inside Triton's wheel. Printed per variant:

- `sass_per_element`: instructions of the main loop (the largest loop; the whole kernel for the
  loop-free dequantize kernel) x threads per program / weight elements per loop iteration: the
  SASS that the SMs issue per weight element. An H200 issues about 33 T thread-instructions/s, so
  4-bit weights at 4.8 TB/s (9.6 T elements/s) leave about 3.5 per element before the kernel
  stops being bandwidth-bound.
- `smem_bytes` and `registers` (from `cuobjdump -res-usage`) per program;
- the programs each goal shape launches, in waves of 132 SMs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


GOAL_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672)]  # K x N
SMS = 132
# row class label -> the M that stands for it (its largest)
ROW_CLASSES = {"triton_gemv": ["1", "2", "3-4", "5-8"], "triton_splitk": ["9-16", "17-32", "33-64", "65-128"],
               "triton_dequant": [">128"]}
DTYPES = {"fp16": "fp16", "bf16": "bf16"}


def toolchain() -> tuple[str | None, str]:
    """(directory of nvdisasm / cuobjdump / ptxas inside Triton's wheel, or None; why not)."""
    from hf_quant.runtime.kernels import triton as kernels_triton

    if not kernels_triton.AVAILABLE:  # not installed, or too old
        return None, kernels_triton.UNAVAILABLE_REASON
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in ("ptxas", "nvdisasm", "cuobjdump"):
        if not os.path.exists(os.path.join(bin_dir, tool)) and not shutil.which(tool):
            return None, f"{tool} is not in Triton's wheel ({bin_dir}) nor on PATH"
    return bin_dir, ""


def _tool(bin_dir: str, name: str) -> str:
    path = os.path.join(bin_dir, name)
    return path if os.path.exists(path) else shutil.which(name)


def variant_launch(kernel: str, rows: str, bits: int, K: int = 4096, N: int = 4096):
    """(blocks, launch) that dispatch uses for this kernel, row class, bits and shape."""
    from hf_quant.runtime.kernels.triton import table
    from hf_quant.runtime.kernels.triton import layout as L
    blocks = L.geometry(bits, None if bits == 8 else 128, K, N)
    M = int(rows.split("-")[-1]) if not rows.startswith(">") else 4096
    if kernel == "triton_gemv":
        return blocks, table.gemv_launch(M, blocks, SMS)
    if kernel == "triton_splitk":
        return blocks, table.splitk_launch(M, blocks, SMS)
    return blocks, table.Launch(1, 64, 1, 4)


def compile_variant(kernel: str, rows: str, bits: int, dtype: str, bin_dir: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_quant.runtime.kernels.triton import qgemm

    blocks, cfg = variant_launch(kernel, rows, bits)
    common = qgemm._layout_args(blocks)  # as a launch on the 4096-wide shape gets them
    if kernel == "triton_dequant":
        fn = qgemm._dequant_kernel
        sig = dict(w_ptr="*i32", sa_ptr="*fp32", sb_ptr="*fp32", out_ptr=f"*{dtype}", N="i32", K="i32", Np="i32",
                   KW="i32")
        consts = dict(common, BLOCK_N=cfg.block_n)
        elements = cfg.block_n * blocks.kb
    else:
        fn = qgemm._gemv_kernel if kernel == "triton_gemv" else qgemm._splitk_kernel
        sig = dict(x_ptr=f"*{dtype}", w_ptr="*i32", sa_ptr="*fp32", sb_ptr="*fp32", b_ptr=f"*{dtype}",
                   y_ptr=f"*{dtype}", ws_ptr="*fp32", cnt_ptr="*i32", M="i32", N="i32", K="i32", Np="i32", KW="i32",
                   n_blocks="i32", blocks_per_split="i32", stride_xm="i32", stride_ym="i32")
        consts = dict(common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=cfg.split, HAS_BIAS=False)
        if kernel == "triton_splitk":
            consts["DOT_FP32"] = False
        if cfg.block_m == 1:
            consts["M"] = 1  # what Triton's launcher does with an int argument equal to 1
        elements = cfg.block_n * blocks.kb
    for name in consts:
        sig[name] = "constexpr"
    names = list(fn.arg_names)
    aligned = [n for n, t in sig.items() if t.startswith("*") or n in ("N", "K", "Np", "KW", "stride_xm", "stride_ym")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                               **qgemm.launch_options(cfg)))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool(bin_dir, "nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([_tool(bin_dir, "cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    loop, unroll = main_loop(sass, expected_weight_loads(cfg, blocks))
    threads = 32 * cfg.num_warps
    per_element = len(loop) * threads / (elements * unroll)
    return {"kernel": kernel, "bits": bits, "dtype": dtype, "rows": rows,
            "sass_per_element": round(per_element, 2), "smem_bytes": int(compiled.metadata.shared),
            "registers": registers, "loop_instructions": len(loop) // unroll, "threads": threads,
            "elements_per_iteration": elements, "block_n": cfg.block_n, "block_m": cfg.block_m,
            "ctas": {f"{K}x{N}": ctas(kernel, rows, bits, K, N) for K, N in GOAL_SHAPES},
            "mix": mix(loop)}


def expected_weight_loads(cfg, blocks) -> float:
    """Weight (evict-first) load instructions per iteration if every thread loads 16 bytes at a time."""
    return cfg.block_n * blocks.bw * 4 / (32 * cfg.num_warps * 16)


_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):", re.M)


def instructions(text: str) -> list[str]:
    return [m.group(1) for m in _INSN.finditer(text)]


def main_loop(sass: str, expected_loads: float) -> tuple[list[str], int]:
    """The instructions of the largest loop (between a label and a later branch back to it), or of
    the whole kernel if it has no loop; and by how much ptxas unrolled it (from its weight loads)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = instructions("\n".join(lines[labels[m.group(1)]:i + 1]))
            if len(body) > max(len(best), 4):  # not the one-instruction trap loop after EXIT
                best = body
    if not best:
        best = instructions(sass)
    loads = sum(1 for insn in best if re.search(r"\bLDG\.[A-Z0-9.]*EF", insn))
    unroll = max(1, round(loads / expected_loads)) if expected_loads >= 1 else 1
    return best, unroll


def mix(loop: list[str]) -> dict[str, int]:
    """Every opcode of the loop with its count, most frequent first."""
    counts: dict[str, int] = {}
    for insn in loop:
        op = re.sub(r"^@!?U?P[T0-9]\s+", "", insn).split()[0]
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def ctas(kernel: str, rows: str, bits: int, K: int, N: int) -> int:
    blocks, cfg = variant_launch(kernel, rows, bits, K, N)
    if kernel == "triton_dequant":
        return -(-N // cfg.block_n) * blocks.n_blocks
    from hf_quant.runtime.kernels.triton import table
    return -(-N // cfg.block_n) * table.split_blocks(blocks.n_blocks, cfg.split)[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON list on stdout")
    ap.add_argument("--full", action="store_true", help="with --json: every field (loop mix, CTAs, ...)")
    ap.add_argument("--kernels", nargs="+", default=list(ROW_CLASSES))
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 8])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--rows", nargs="+", help="only these row classes (e.g. 1 9-16)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_budget.py compiles kernels: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    bin_dir, why = toolchain()
    if bin_dir is None:
        print(f"kernel_budget.py: cannot compile offline: {why}", file=sys.stderr)
        return 2
    results = []
    for kernel in args.kernels:
        for rows in ROW_CLASSES[kernel]:
            if args.rows and rows not in args.rows:
                continue
            for bits in args.bits:
                for dtype in args.dtypes:
                    row = compile_variant(kernel, rows, bits, dtype, bin_dir)
                    results.append(row)
                    if not args.json:
                        if len(results) == 1:
                            print("| kernel | rows | bits | dtype | SASS / element | loop insns | registers | smem B |"
                                  " BLOCK_M x BLOCK_N | CTAs per goal shape (waves of 132 SMs) | loop mix |")
                            print("|---|---|---:|---|---:|---:|---:|---:|---|---|---|")
                        waves = ", ".join(f"{c} ({c / SMS:.1f})" for c in row["ctas"].values())
                        top = " ".join(f"{k} {v}" for k, v in list(row["mix"].items())[:5])
                        print(f"| {kernel} | {rows} | {bits} | {dtype} | {row['sass_per_element']:.2f} | "
                              f"{row['loop_instructions']} | {row['registers']} | {row['smem_bytes']} | "
                              f"{row['block_m']}x{row['block_n']} | {waves} | {top} |", flush=True)
    if args.json:
        keys = ("kernel", "bits", "dtype", "rows", "sass_per_element", "smem_bytes", "registers")
        print(json.dumps(results if args.full else [{k: r[k] for k in keys} for r in results]))
    else:
        print(f"\ngoal shapes (K x N): {', '.join(f'{K}x{N}' for K, N in GOAL_SHAPES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
