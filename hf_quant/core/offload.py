"""Modules whose weights accelerate keeps off the execution device (disk offload, or CPU offload beside a
GPU): what `from_pretrained(..., device_map=...)` leaves when the float model does not fit.

accelerate's `AlignDevicesHook(offload=True)` loads such a module's tensors from its weights map before
each forward and returns them to the meta device after it. Calibration holds one block at a time in
memory through the same hook, by its public `pre_forward` / `post_forward`:

- `onload(module)` loads every offloaded tensor under `module` onto its execution device and keeps it
  there (the hook stops offloading); it returns what `offload_again` needs to undo that.
- `offload_again(records)` sends them back to the meta device and lets the hooks offload again (a
  float layer replaced by its quantized one, or a failed run left as it was loaded).
- `keep_onloaded(model)` loads what is still offloaded, removes the offloading hooks and updates
  `model.hf_device_map`: the quantized model is then an ordinary in-memory model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


def _align_hooks(module: nn.Module) -> list[Any]:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    from accelerate.hooks import AlignDevicesHook

    hooks = list(getattr(hook, "hooks", [hook]))  # a SequentialHook holds several
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def offloading(module: nn.Module) -> list[tuple[nn.Module, Any]]:
    """(submodule, hook) for every submodule of `module` (itself included) whose tensors a hook offloads."""
    return [(sub, h) for sub in module.modules() for h in _align_hooks(sub) if h.offload and h.weights_map is not None]


def is_offloaded(module: nn.Module) -> bool:
    return bool(offloading(module))


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its offloading hook's execution device, else the device of its first tensor."""
    for _, hook in offloading(module):
        return torch.device(hook.execution_device if not isinstance(hook.execution_device, int)
                            else f"cuda:{hook.execution_device}")
    t = next(iter(module.parameters()), None)
    return t.device if t is not None else torch.device("cpu")


def onload(module: nn.Module) -> list[tuple[nn.Module, Any]]:
    """Load every offloaded tensor under `module` onto its execution device and keep it there."""
    records = offloading(module)
    for sub, hook in records:
        hook.pre_forward(sub)  # the hook's own loading (its weights map, dtype, tied tensors)
        hook.offload = False  # a forward now leaves them in place
    return records


def offload_again(records: list[tuple[nn.Module, Any]]) -> None:
    """Undo `onload`: the tensors back to the meta device, the hooks offloading again."""
    for sub, hook in records:
        hook.offload = True
        hook.post_forward(sub, None)


def keep_onloaded(model: nn.Module) -> None:
    """Everything still offloaded loaded for good, the offloading hooks removed, `hf_device_map` saying where
    each module now is: an ordinary in-memory model (what save_pretrained, generate and PEFT expect)."""
    from accelerate.hooks import remove_hook_from_module

    onload(model)
    if hasattr(model, "tie_weights"):  # tensors loaded apart that the model ties (embeddings, lm_head): one again
        model.tie_weights()
    for sub in model.modules():
        hooks = _align_hooks(sub)
        if hooks and all(h.weights_map is not None for h in hooks):  # the offloading hooks (now idle)
            remove_hook_from_module(sub)
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict):
        return
    for name, where in list(device_map.items()):
        if where in ("disk", "cpu"):
            module = model.get_submodule(name) if name else model
            t = next((t for t in (*module.parameters(), *module.buffers()) if t.device.type != "meta"), None)
            if t is not None:
                device_map[name] = t.device.type if t.device.type == "cpu" else t.device.index
    if len(set(device_map.values())) == 1:  # one device: no hook has work left, and no map (save_pretrained takes
        from accelerate.hooks import remove_hook_from_submodules  # "cpu" in a map for offloading)

        remove_hook_from_submodules(model)
        del model.hf_device_map
