"""Every use of a private attribute of transformers, PEFT or optimum that hf_quant still needs, in one
place, each with the public alternative or the reason there is none. A leaf: imports nothing of hf_quant.

When a library changes one of these, this is the module to fix.
"""

from __future__ import annotations

import functools
from typing import Any, Callable


def keep_in_fp32_modules(model: Any) -> list[str] | None:
    """Modules the model class keeps in fp32 (e.g. T5's `wo`), which must not be quantized.

    transformers computes this from the private class attribute `_keep_in_fp32_modules` and passes it
    to quantizers only through `HfQuantizer.preprocess_model` keyword arguments in some releases; the
    quantizer prefers that keyword (`keep_in_fp32_modules`) where it is given. Outside loading (e.g.
    `import_gptq` checking a model built from its config) no public accessor exists, so the class
    attribute is read here.
    """
    value = getattr(model, "_keep_in_fp32_modules", None)
    return list(value) if value else None


def auto_class_model(auto: Any, config: Any) -> Any:
    """The model class the transformers auto class `auto` builds for `config`, or None if it does not know the
    config. The private `_model_mapping` is the only way to ask without building a model: `from_config` would
    construct it, and the public MODEL_FOR_*_MAPPING constants do not cover every auto class (e.g.
    AutoModelForMultimodalLM)."""
    mapping = getattr(auto, "_model_mapping", None)
    return mapping[type(config)] if mapping is not None and type(config) in mapping else None


# --- PEFT --------------------------------------------------------------------------------------------
# PEFT 0.21 picks a LoRA layer class through a fixed list of dispatchers inside the private
# `LoraModel._create_new_module`; its only third-party hook, `LoraConfig._register_custom_module`, is
# experimental, per config and not saved with the adapter, so every user (and every adapter reload)
# would have to call it. Non-LoRA tuners have no hook at all. hf_quant therefore wraps three private
# methods, each deferring to PEFT's own code for every module that is not an hf_quant layer.

def patch_peft(create_lora_module: Callable[..., Any], check_target: Callable[..., None],
               check_merge: Callable[[Any], None]) -> None:
    """Install hf_quant's hooks in PEFT once (idempotent):

    - `LoraModel._create_new_module` (private staticmethod; no public per-type dispatch):
      `create_lora_module(lora_config, adapter_name, target, **kwargs)` returns hf_quant's LoRA layer
      for an hf_quant base, or None to let PEFT dispatch as usual.
    - `BaseTuner._check_target_module_compatiblity` [sic] (private; the only check every tuner type
      runs per target): `check_target(peft_config, model, target_name)` may raise.
    - `BaseTuner._check_merge_allowed` (private; the only check that runs before any layer is
      merged, so a refusal leaves the model unchanged): `check_merge(tuner)` may raise.
    """
    from peft.tuners.lora import LoraModel
    from peft.tuners.tuners_utils import BaseTuner

    if getattr(BaseTuner, "_hf_quant_installed", False):
        return
    create = LoraModel._create_new_module

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new = create_lora_module(lora_config, adapter_name, target, **kwargs)
        return new if new is not None else create(lora_config, adapter_name, target, **kwargs)

    LoraModel._create_new_module = staticmethod(functools.wraps(create)(_create_new_module))

    check_target_orig = getattr(BaseTuner, "_check_target_module_compatiblity", None)
    if check_target_orig is not None:
        @functools.wraps(check_target_orig)
        def _check_target_module_compatiblity(self, peft_config, model, target_name):
            check_target(peft_config, model, target_name)
            return check_target_orig(self, peft_config, model, target_name)

        BaseTuner._check_target_module_compatiblity = _check_target_module_compatiblity

    check_merge_orig = getattr(BaseTuner, "_check_merge_allowed", None)
    if check_merge_orig is not None:
        @functools.wraps(check_merge_orig)
        def _check_merge_allowed(self):
            check_merge(self)
            return check_merge_orig(self)

        BaseTuner._check_merge_allowed = _check_merge_allowed
    BaseTuner._hf_quant_installed = True


def when_imported(module: str, callback: Callable[[], None]) -> None:
    """Run `callback` now if `module` is imported, else right after its first import completes.

    Python has no public post-import hook; this puts a finder at the front of `sys.meta_path` that
    wraps the module's loader (`exec_module`) once. hf_quant uses it to put its PEFT hooks in place
    without importing PEFT (which imports bitsandbytes and torch's inductor: seconds per process) in
    runs that never use it."""
    import sys

    if module in sys.modules:
        callback()
        return
    _AfterImport.install(module, callback)


class _AfterImport:
    """The meta-path finder behind `when_imported` (one per module name, removed once it fired)."""

    def __init__(self, module: str):
        self.module, self.callbacks = module, []

    @classmethod
    def install(cls, module: str, callback: Callable[[], None]) -> None:
        import sys

        finder = next((f for f in sys.meta_path if isinstance(f, cls) and f.module == module), None)
        if finder is None:
            finder = cls(module)
            sys.meta_path.insert(0, finder)
        if callback not in finder.callbacks:
            finder.callbacks.append(callback)

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != self.module:
            return None
        import importlib.util
        import sys

        sys.meta_path.remove(self)  # fires once; the real finders locate the module
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):  # not importable: nothing to run after
            return spec
        exec_module, callbacks = loader.exec_module, list(self.callbacks)

        def exec_then_callback(mod: Any) -> None:
            exec_module(mod)
            for cb in callbacks:
                cb()

        loader.exec_module = exec_then_callback
        return spec


def register_custom_lora_module(lora_config: Any, mapping: dict) -> Any:
    """PEFT's documented (experimental) route: `LoraConfig._register_custom_module(mapping)`."""
    lora_config._register_custom_module(mapping)
    return lora_config


# --- transformers API renames (public names; which ones exist depends on the release) ---------------

def activation_checkpointing_arguments(**checkpoint_kwargs: Any) -> dict[str, Any]:
    """`TrainingArguments` keywords that turn activation checkpointing on: `activation_checkpointing`
    (transformers >= 5.24, which deprecates the old name) or `gradient_checkpointing` before it."""
    import dataclasses

    from transformers import TrainingArguments

    new = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if new else "gradient_checkpointing"
    args: dict[str, Any] = {name: True}
    if checkpoint_kwargs:
        args[f"{name}_kwargs"] = dict(checkpoint_kwargs)
    return args


def enable_activation_checkpointing(model: Any, **checkpoint_kwargs: Any) -> None:
    """`model.activation_checkpointing_enable(...)`, or `gradient_checkpointing_enable(...)` on releases before it."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs or None)


# --- transformers' checkpoint key conversion ----------------------------------------------------------

def _conversion_transforms(model: Any) -> tuple[list, list, Callable] | None:
    """(renamings, converters, rename_source_key) of transformers' conversion mapping for `model`, or None where
    transformers has none of these calls (`checkpoint_key_renamer` says which and why)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        transforms = get_model_conversion_mapping(model)
    except (ImportError, AttributeError, TypeError):
        return None
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)], rename_source_key)


def checkpoint_key_renamer(model: Any) -> Callable[[str], tuple[str, bool]]:
    """key -> (the model's name for a checkpoint tensor key, whether a converter made it), as `from_pretrained`
    renames keys: transformers 5 keeps per-architecture renamings (GPT-NeoX's `embed_out` is the module
    `lm_head`) and converters (per-expert MoE tensors stacked into one) that `save_pretrained` reverses on the
    way out. hf_quant reads checkpoint headers and tensors by the model's names before or without
    `from_pretrained` (its checks, the streaming quantizer), so it needs the same renaming. A converted key
    names one source of a tensor built from several: it cannot be read as that tensor.

    The module-level `conversion_mapping.get_model_conversion_mapping` and `core_model_loading.rename_source_key`
    are what `from_pretrained` calls (unchanged from 5.17 through 5.25); they are not documented API. Where they
    are missing the keys are taken as they are (the behaviour of releases without conversions)."""
    found = _conversion_transforms(model)
    if found is None or not (found[0] or found[1]):
        return lambda key: (key, False)
    renamings, converters, rename_source_key = found

    def rename(key: str) -> tuple[str, bool]:
        name, converter = rename_source_key(key, renamings, converters)
        return name, converter is not None

    return rename


def checkpoint_converters(model: Any, keys: Any) -> dict[str, Callable[[Callable[[str], Any]], dict[str, Any]]]:
    """The model's tensors that transformers builds from several checkpoint keys (per-expert MoE tensors stacked
    into one 3-D weight: Mixtral's `experts.<e>.w1.weight` and `w3` make `experts.gate_up_proj`): model name ->
    build(read), where read(key) returns a checkpoint tensor and build returns {model name: tensor} as
    `from_pretrained` computes it, by transformers' own converter (its operations, e.g. MergeModulelist and
    Concatenate). For readers that load one block at a time (the streaming quantizer).

    Uses the same calls as `checkpoint_key_renamer` plus `WeightConverter.add_tensor` / `convert` (checked on
    5.17 and 5.25); where they are missing, nothing is converted (an empty dict)."""
    import copy

    found = _conversion_transforms(model)
    if found is None:
        return {}
    renamings, converters, rename_source_key = found
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        name, pattern = rename_source_key(key, renamings, converters)
        if pattern is not None and pattern in by_pattern:
            groups.setdefault(name, []).append((key, pattern))

    def builder(name: str, items: list[tuple[str, str]]):
        def build(read: Callable[[str], Any]) -> dict[str, Any]:
            converter = copy.deepcopy(by_pattern[items[0][1]])
            for key, pattern in items:
                converter.add_tensor(name, key, pattern, read(key))
            out = converter.convert(name, model=model, config=getattr(model, "config", None))
            return {k: v[0] if isinstance(v, list) else v for k, v in out.items()}
        return build

    return {name: builder(name, items) for name, items in groups.items()}


def recompute_non_persistent_buffers(model: Any) -> None:
    """Compute the model's non-persistent buffers (rotary tables, ...) again, as `from_pretrained` does after
    loading: it builds the model under the dtype's default-dtype context, then re-initialises every module whose
    tensors the checkpoint did not fill (its non-persistent buffers) outside that context. A model built with
    `from_config(config, dtype=...)` keeps the values computed inside it: GPT-J's and CodeGen's sinusoid tables
    then differ in the last bits from the loaded model's. Parameters on the meta device stay there.

    Needs the module flag `_is_hf_initialized` (private) that `initialize_weights` (public) skips on, and
    torch's `_non_persistent_buffers_set` (private, unchanged for years). Without them nothing is done."""
    if not hasattr(model, "initialize_weights"):
        return
    touched = False
    for module in model.modules():
        names = getattr(module, "_non_persistent_buffers_set", None)
        if not names:
            continue
        module.__dict__.pop("_is_hf_initialized", None)
        for name in names:
            buf = module._buffers.get(name)
            if buf is not None and "_is_hf_initialized" in getattr(buf, "__dict__", {}):
                del buf._is_hf_initialized
        touched = True
    if touched:
        model.initialize_weights()
