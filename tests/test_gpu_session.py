"""benchmarks/gpu_session.py's dry run: the GPU session's code paths on CPU (Triton's interpreter,
tiny shapes), in a subprocess, checked through the results.json it leaves. The GPU numbers themselves
are measured only on a GPU (benchmarks/README.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TRITON_KERNELS_UNAVAILABLE  # noqa: E402

if TRITON_KERNELS_UNAVAILABLE:
    pytest.skip(TRITON_KERNELS_UNAVAILABLE, allow_module_level=True)

from hf_quant.runtime.kernels.triton import table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["versions", "correctness", "goal_table", "tune", "int8", "lowbit", "overhead", "generate", "gptq"]
# 120 s: every stage, host_cpu included, runs in about 90 s on an idle 2-core AVX2 Zen 1 (55 s on a Zen 4); on a
# busier machine the last stages record themselves as skipped (and their tests skip, saying so)
BUDGET_S = "120"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_session")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run even on a GPU machine
    proc = subprocess.run([sys.executable, "benchmarks/gpu_session.py", "--dry-run", "--out", str(out),
                           "--budget-s", BUDGET_S], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert (out / "results.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), proc


def _ran(session, stage: str) -> dict:
    """The stage's record; the test skips, with the stage's reason, if the dry run's budget skipped it."""
    rec = session[1]["stages"][stage]
    if rec["status"] == "skipped":
        pytest.skip(f"{stage} stage skipped: {rec.get('reason')}")
    return rec


def test_every_stage_ran_or_says_why_not(session):
    out, res, proc = session
    assert res["meta"]["dry_run"] is True
    for name in STAGES:
        rec = res["stages"][name]
        assert rec["status"] in ("ok", "skipped"), (name, rec.get("error"), rec.get("traceback", "")[-2000:],
                                                   rec.get("errors"))
        if rec["status"] == "skipped":
            assert rec.get("reason"), name
    assert proc.returncode == 0, proc.stdout[-3000:]
    log = (out / "log.txt").read_text()
    assert "== summary" in log and "== goal_table" in log
    assert res["stages"]["versions"]["result"]["read_GB_s"] > 0


def test_correctness_stage_checked_kernels_without_failures(session):
    _, res, _ = session
    rec = res["stages"]["correctness"]
    assert rec["status"] == "ok", rec.get("result", {}).get("failures")
    r = rec["result"]
    assert r["n_failures"] == 0 and r["n_checks"] > 0
    assert {c["kernel"] for c in r["checks"]} <= set(table.KERNELS)
    assert all(c["ok"] and c["rel_err"] < 1e-2 for c in r["checks"])


def test_goal_table_rows_have_the_columns(session):
    _, res, _ = session
    g = res["stages"]["goal_table"]["result"]
    rows = g["rows"]
    assert rows
    for row in rows:
        assert set(g["columns"]) <= set(row), set(g["columns"]) - set(row)
    kernels = {r["kernel"] for r in rows}
    assert {"F.linear fp16", "F.linear bf16", "auto", "triton_gemv", "triton_splitk", "triton_dequant"} <= kernels
    quant = [r for r in rows if r["kernel"] in table.KERNELS or r["kernel"] == "auto"]
    assert all(r["ok"] and r["ms"] > 0 and r["x_fp16"] > 0 and r["pct_floor"] > 0 for r in quant)
    assert all(r["kernel"] != "triton_gemv" or r["M"] <= table.GEMV_MAX_ROWS for r in rows)
    skipped = {p["what"] for p in res["stages"]["goal_table"].get("skipped_parts", [])}
    assert "tinygemm" in skipped  # no CUDA: recorded, with the reason


def test_dispatch_loads_and_never_names_the_generic_kernel(session, tmp_path):
    out, res, _ = session
    dispatch = res["dispatch"]
    assert isinstance(dispatch, list) and dispatch
    assert json.loads((out / "dispatch_table.json").read_text()) == dispatch
    for entry in dispatch:
        cls = table.parse_rows(entry["rows"])
        assert entry["kernel"] in table.KERNELS
        if cls is not None:  # rows <= 128
            assert entry["kernel"] != "dequant_matmul"
    saved = dict(table.DISPATCH)
    try:
        table.load_table(str(out / "dispatch_table.json"))
    finally:
        table.DISPATCH.clear()
        table.DISPATCH.update(saved)
        table._changed()


def test_only_the_documented_files_are_written(session):
    out, res, _ = session
    # a stage's own output file is there where the stage started (a soft cap was set), whatever its end: one that
    # ran past its cap is recorded as skipped with its partial output kept; one the budget skipped wrote nothing
    outputs = [f for stage, f in (("gptq", "gptq_output.txt"), ("host_cpu", "host_cpu.txt"))
               if "cap_s" in res["stages"][stage]]
    assert sorted(p.name for p in out.iterdir()) == sorted(["dispatch_table.json", "log.txt", "results.json"]
                                                           + outputs)


def test_int8_stage_checks_the_cuda_int8_kernel(session):
    rec = _ran(session, "int8")
    rows = rec["result"]["rows"]
    assert rows and rec["result"]["n_failures"] == 0, rows
    assert {r["threshold"] for r in rows} == {0.0, 6.0}
    assert all(r["ok"] and r["rel_err"] < 2e-2 and r["ms"] > 0 and r["x_bf16"] > 0 for r in rows)


def test_lowbit_stage_checks_onebit_and_bitnet_layers(session):
    rec = _ran(session, "lowbit")
    rows = rec["result"]["rows"]
    assert rows and rec["result"]["n_failures"] == 0, rows
    assert {r["layer"] for r in rows} == {"onebit", "bitnet"}
    assert all(r["ok"] and r["ms"] > 0 and r["x_bf16"] > 0 for r in rows)


def test_overhead_stage_times_each_layer_of_the_launch_path(session):
    rec = _ran(session, "overhead")
    rows = rec["result"]["rows"]
    assert [r["call"] for r in rows] == ["F.linear fp16", "layer(x) (auto)", "kernel.forward (no dispatch)",
                                         "launch_matmul (precomputed launch)", "layer(x) (auto, fast relaunch)",
                                         "launch_matmul (fast relaunch)"]
    assert all("error" not in r and r["host_us"] > 0 and r["timer_ms"] > 0 for r in rows), rows
    fast = [r for r in rows if "fast relaunch" in r["call"]]
    assert all(r["same_output"] and not r["fast_path_on"] for r in fast)  # the interpreter never relaunches
    assert "cProfile" not in rec["result"]["profile_layer_call"] and "calls of layer(x)" in rec["result"]["profile_layer_call"]
