"""The package's import graph: no cycles, and every import goes down the layering table.

The table (README "Architecture"), bottom first. A module may import modules of lower layers, and
modules of its own package (never a cycle):

    0  core, compat, version   the leaves: import nothing of hf_quant
    1  methods             one module per method, one registry
    2  config              QuantConfig, validated through the methods registry
    3  runtime             QuantLinear, schemes, kernels, dispatch, model surgery
    4  io                  checkpoint formats (codecs + file handling), registry
    5  training            prepare / convert for quantization-aware training
    6  calibration         the block-wise driver
    7  integrations        transformers quantizer, Hub, PEFT
    8  api                 hf_quant/__init__.py, eval.py, eval_outliers.py, eval_gguf.py, cli.py, __main__.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hf_quant

PACKAGE = Path(hf_quant.__file__).parent
LAYERS = {"core": 0, "compat": 0, "version": 0, "methods": 1, "config": 2, "runtime": 3, "io": 4, "training": 5,
          "calibration": 6, "integrations": 7, "__init__": 8, "eval": 8, "eval_outliers": 8, "eval_gguf": 8, "streaming": 8, "cli": 8,
          "__main__": 8}


def module_name(path: Path) -> str:
    parts = ["hf_quant", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """hf_quant modules imported anywhere in `path` (function bodies included), resolved to the module
    file: `from pkg import sub` counts as pkg.sub when sub is a module, else as pkg."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "hf_quant"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "hf_quant":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if _exists(f"{mod}.{a.name}")]
            found |= set(subs) if len(subs) == len(node.names) else set(subs) | {mod}
    return found - {me}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> tuple[int, str]:
    top = module.split(".")[1] if "." in module else "__init__"
    return LAYERS[top], top


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in `graph`, as the list of modules around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        src_layer, src_top = layer_of(src)
        for dst in targets:
            dst_layer, dst_top = layer_of(dst)
            if dst_layer > src_layer or (dst_layer == src_layer and dst_top != src_top and src_layer != 8):
                bad.append(f"{src} (layer {src_layer}, {src_top}) imports {dst} (layer {dst_layer}, {dst_top})")
    return sorted(bad)


def test_every_package_module_has_a_layer():
    tops = {layer_of(m)[1] for m in import_graph()}
    assert tops <= set(LAYERS)


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_imports_follow_the_layering_table():
    assert layering_violations(import_graph()) == []


def test_core_and_compat_are_leaves():
    graph = import_graph()
    for module, targets in graph.items():
        if layer_of(module)[0] == 0:
            assert {t for t in targets if layer_of(t)[1] != layer_of(module)[1]} == set(), module


def test_the_checks_can_fail():
    """The graph walk sees function-level imports, and both checks flag what they should."""
    assert "hf_quant.io.gptq_codec" in imports_of(PACKAGE / "io" / "__init__.py") or \
        "hf_quant.io.gptq" in imports_of(PACKAGE / "io" / "__init__.py")
    assert "hf_quant.integrations.peft_lora" in imports_of(PACKAGE / "integrations" / "peft.py")  # in a function
    cyclic = {"hf_quant.config": {"hf_quant.methods"}, "hf_quant.methods": {"hf_quant.methods.gptq"},
              "hf_quant.methods.gptq": {"hf_quant.config"}}
    assert find_cycle(cyclic) == ["hf_quant.config", "hf_quant.methods", "hf_quant.methods.gptq", "hf_quant.config"]
    assert layering_violations({"hf_quant.core.grid": {"hf_quant.config"}}) == [
        "hf_quant.core.grid (layer 0, core) imports hf_quant.config (layer 2, config)"]
    assert layering_violations({"hf_quant.runtime.convert": {"hf_quant.io.native"}})


@pytest.mark.parametrize("module", ["hf_quant.core", "hf_quant.compat", "hf_quant.version"])
def test_leaves_import_alone(module):
    """The leaves load in a fresh interpreter without the rest of hf_quant."""
    import subprocess
    import sys

    code = (f"import sys, importlib.util, types; sys.modules['hf_quant'] = types.ModuleType('hf_quant'); "
            f"sys.modules['hf_quant'].__path__ = [{str(PACKAGE)!r}]; import {module}; "
            "print(sorted(m for m in sys.modules if m.startswith('hf_quant.') and not m.startswith("
            f"{module!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
